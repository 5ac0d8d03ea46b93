"""Command line: `python -m puzzle_jax STAGE --config configs/X.py [--config.key=value ...]`.

Intentionally thin: parse the config, call the stage's `run(config)`. Stages, in pipeline order:
import, bld, score, costs, mip, realize, evaluate; plus generate and export; `run` does the
whole search, skipping stages whose artifacts already exist.
"""

from __future__ import annotations

import importlib

from absl import app
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config (configs/*.py[:switches])",
                                          lock_config=True)

# stage -> "module:function"; imported lazily so `--help` and light stages start fast.
STAGES = {
    "import": "puzzle_jax.workdir:run_import",
    "bld": "puzzle_jax.bld:run",
    "score": "puzzle_jax.scoring:run",
    "costs": "puzzle_jax.costs:run",
    "mip": "puzzle_jax.search:run",
    "realize": "puzzle_jax.realize:run",
    "evaluate": "puzzle_jax.evaluate:run",
    "generate": "puzzle_jax.generate:run",
    "export": "puzzle_jax.export:run",
    "run": "puzzle_jax.workdir:run_all",
}


def stage_fn(name: str):
  if name not in STAGES:
    raise app.UsageError(f"unknown stage {name!r}; choose one of {', '.join(STAGES)}")
  module, fn = STAGES[name].split(":")
  return getattr(importlib.import_module(module), fn)


def _main(argv) -> None:
  if len(argv) != 2:
    raise app.UsageError(f"usage: python -m puzzle_jax STAGE --config configs/X.py; stages: {', '.join(STAGES)}")
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config configs/smollm2_135m.py")
  from absl import logging
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it touches at INFO
  from puzzle_jax import workdir
  workdir.maybe_init_distributed(config)
  stage_fn(argv[1])(config)


def main() -> None:
  app.run(_main)


if __name__ == "__main__":
  main()
