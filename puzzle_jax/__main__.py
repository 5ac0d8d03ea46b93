"""Command line: `python -m puzzle_jax STAGE --config configs/X.py [--config.key=value ...]`.

Intentionally thin: parse the config, call the stage's `run(config)`. Stages, in pipeline order:
import, bld, score, costs, mip, realize, evaluate; plus generate and export; `run` does the
whole search, skipping stages whose artifacts already exist.
"""

from __future__ import annotations

from absl import app
from ml_collections import config_flags

from puzzle_jax.stages import STAGES, stage_fn

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config (configs/*.py[:switches])",
                                          lock_config=True)


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
  try:
    fn = stage_fn(argv[1])
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  fn(config)


def main() -> None:
  app.run(_main)


if __name__ == "__main__":
  main()
