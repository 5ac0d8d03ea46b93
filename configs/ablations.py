r"""Ablations around the Puzzle search and GKD (experiments/ablations.py runs them).

  python experiments/ablations.py --config configs/ablations.py            # CPU, minutes
  python experiments/ablations.py --config configs/ablations.py:tiny       # test-sized
  python experiments/ablations.py --config configs/ablations.py:gpu        # accelerator budgets
  python experiments/ablations.py --config configs/ablations.py --sweeps=metric,gkd_mix
Each sweep writes <out_dir>/<sweep>.json (rows), .md (table) and .png; notebooks/02_ablations.ipynb
plots them together.
"""

import pathlib
import sys

import ml_collections

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import smollm2_135m  # noqa: E402  (the search these ablations vary)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = smollm2_135m._parse_arg(arg, gpu=False, tiny=False)
  c = ml_collections.ConfigDict()
  c.search = smollm2_135m.get_config(",".join(k for k in ("gpu", "tiny") if args[k]) or None)
  c.search.workdir += "_ablations"  # the shared base run (import, BLD, scores, costs)
  # Analytic costs: every sweep point compares children at the same, reproducible predicted cost.
  c.search.costs.backend = "analytic"
  c.out_dir = "workdirs/ablations"  # tables and plots; one sub-folder per trained point.
  c.sweeps = ("bld_tokens", "metric", "gkd_mix", "gkd_tokens")  # which sweeps run, in this order.
  c.target_speedup = 1.3  # predicted decode speedup every child is chosen at (fixed cost).

  c.bld_steps = (2, 5, 10, 20)  # BLD optimizer steps per point (tokens = steps x batch x seq_len).
  c.metrics = ("kl", "lm_loss_delta", "one_minus_top1", "nmse")  # MIP objectives (nmse = BLD loss).

  c.gkd = ml_collections.ConfigDict()
  c.gkd.steps = 10  # GKD steps of every gkd_mix point.
  c.gkd.step_grid = (0, 5, 10, 20)  # GKD steps per gkd_tokens point (0 = the child before GKD).
  # Loss mixes, "name": (kl_weight, lm_weight, hidden_weight); hidden = cosine at block outputs.
  c.gkd.mixes = ml_collections.ConfigDict({"kl": (1.0, 0.0, 0.0), "lm": (0.0, 1.0, 0.0),
                                           "kl+lm": (1.0, 1.0, 0.0), "kl+cosine": (1.0, 0.0, 1.0)})

  if args.gpu:
    c.out_dir += "_gpu"
    c.target_speedup = 1.5
    c.bld_steps = (25, 50, 100, 200, 400)
    c.gkd.steps, c.gkd.step_grid = 500, (0, 100, 250, 500, 1000)
  if args.tiny:
    c.out_dir += "_tiny"
    c.target_speedup = 1.2
    c.bld_steps = (1, 4)
    c.metrics = ("kl", "nmse")
    c.gkd.steps, c.gkd.step_grid = 2, (0, 2)
    c.gkd.mixes = ml_collections.ConfigDict({"kl": (1.0, 0.0, 0.0), "kl+cosine": (1.0, 0.0, 1.0)})
  return c
