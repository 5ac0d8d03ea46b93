"""Stage name -> the function that runs it (what the CLI and `run` dispatch on)."""

from __future__ import annotations

import importlib

# stage -> "module:function"; imported lazily so `--help` and light stages start fast.
STAGES = {
    "import": "puzzle_jax.workdir:run_import",
    "bld": "puzzle_jax.search.bld:run",
    "score": "puzzle_jax.search.scoring:run",
    "costs": "puzzle_jax.search.costs:run",
    "mip": "puzzle_jax.search.select:run",
    "realize": "puzzle_jax.search.realize:run",
    "evaluate": "puzzle_jax.search.evaluate:run",
    "generate": "puzzle_jax.generate:run",
    "export": "puzzle_jax.export.nemotron_nas:run",
    "fusion-deps": "puzzle_jax.fusion.stage:run_deps",
    "run": "puzzle_jax.workdir:run_all",
}


def stage_fn(name: str):
  if name not in STAGES:
    raise ValueError(f"unknown stage {name!r}; choose one of {', '.join(STAGES)}")
  module, fn = STAGES[name].split(":")
  return getattr(importlib.import_module(module), fn)


