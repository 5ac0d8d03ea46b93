r"""Export an architecture (a config.json) with random weights: speed measurements need the shapes,
not the values (the MIP's child choice comes from real scores elsewhere).

  python benchmarks/export_random.py benchmarks/data/torchcost_child OUT_DIR
"""

from __future__ import annotations

import json
import pathlib
import sys

import jax
import numpy as np

from puzzle_jax.core import hf_config
from puzzle_jax.core import model
from puzzle_jax.export.nemotron_nas import export


def main(src: str, out: str) -> pathlib.Path:
  arch = hf_config.arch_from_hf(json.loads((pathlib.Path(src) / "config.json").read_text()))
  rng = np.random.default_rng(0)
  abstract = jax.eval_shape(lambda: model.init_params(jax.random.PRNGKey(0), arch))
  draw = lambda x: (np.ones(x.shape, np.float32) if len(x.shape) == 1 else
                    (rng.standard_normal(x.shape, np.float32) / np.sqrt(x.shape[1])))
  return export(arch, jax.tree_util.tree_map(draw, abstract), out, dtype="bfloat16")


if __name__ == "__main__":
  print(main(*sys.argv[1:3]))
