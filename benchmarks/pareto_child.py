r"""A child from a MIP stage's Pareto sweep as a weightless HF directory (speed runs use random
weights: `python -m puzzle_jax.serving measure --random-weights`).

  python benchmarks/pareto_child.py workdirs/torchcost/mip/solution.json benchmarks/data/smollm2_parent \
      1.5 benchmarks/data/torchcost_child15
"""

from __future__ import annotations

import json
import pathlib
import sys

from puzzle_jax import export
from puzzle_jax.search import realize
from puzzle_jax.core import hf_config


def main(solution: str, parent_dir: str, target: str, out: str) -> pathlib.Path:
  doc = json.loads(pathlib.Path(solution).read_text())
  entries = [p for p in doc["pareto"] if abs(p["target_speedup"] - float(target)) < 1e-9 and "choices" in p]
  if not entries:
    raise SystemExit(f"{solution}: no feasible Pareto entry at target {target} "
                     f"(have {[p['target_speedup'] for p in doc['pareto']]})")
  parent = hf_config.arch_from_hf(json.loads((pathlib.Path(parent_dir) / "config.json").read_text()))
  child = realize.child_arch(parent, [tuple(c) for c in entries[0]["choices"]])
  path = export.export_config(child, out, code=False)  # the harness brings the modeling code
  print(f"{path}: predicted decode speedup {entries[0]['predicted_decode_speedup']:.3f}x")
  return path


if __name__ == "__main__":
  main(*sys.argv[1:5])
