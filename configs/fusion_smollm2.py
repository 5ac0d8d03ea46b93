"""FFN Fusion and block-parallelism ablations on SmolLM2-135M-Instruct (`experiments/fusion.py`).

  python experiments/fusion.py --config configs/fusion_smollm2.py          # CPU, the whole parent
  python experiments/fusion.py --config configs/fusion_smollm2.py:tiny     # test size (4-block slice)
  python experiments/fusion.py --config configs/fusion_smollm2.py:gpu      # accelerator budgets

Everything of `configs/smollm2_135m.py` (the search whose child and library the experiments reuse;
missing stages are run first) plus the `fusion_exp` section below.
"""

import importlib.util
import pathlib

import ml_collections


def _base():
  path = pathlib.Path(__file__).with_name("smollm2_135m.py")
  spec = importlib.util.spec_from_file_location("smollm2_135m", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = _base().get_config(arg)
  e = c.fusion_exp = ml_collections.ConfigDict()
  e.run_starts = (8, 16, 24)  # run-length ablation: first layers of the fused runs.
  e.max_run_length = 6  # run-length ablation: runs of 1..this many layers (1 = attention removal only).
  e.parallel_pairs = True  # block-parallelism ablation over every adjacent pair of full blocks.
  e.max_run = 4  # joint search / fuse-after: longest fused run.
  e.speedups = (1.2, 1.3, 1.5)  # joint vs sequential: decode-speed targets of the plain MIP.
  e.search = True  # run the parts that need the search (child fusion, joint vs sequential; runs it first).
  e.out_dir = ""  # "" = <workdir>/fusion/experiments.
  if "tiny" in (arg or ""):
    e.run_starts, e.max_run_length, e.max_run, e.speedups = (1,), 3, 3, (1.2, 1.5)
  return c
