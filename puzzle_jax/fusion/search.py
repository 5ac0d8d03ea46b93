"""Fusion-aware search: choose attention removal and FFN Fusion together, in one MIP.

Puzzle's MIP (`search.mip`) picks one attention and one FFN variant per layer. Removing attention in
consecutive layers leaves FFN-only runs that can be fused into one wide FFN, which is cheaper than
its members in sequence (one matmul chain, one all-reduce) but changes the model (the members read
one input). Here a boolean z_R per candidate run R joins the per-candidate booleans x:

  minimize    Σ score·x + Σ_R penalty_R · z_R
  subject to  one candidate per (layer, sub-block)                       (as in search.mip)
              fixed_c + Σ cost_c·x − Σ_R saving_{R,c} · z_R ≤ budget_c      ∀ c
              z_R ≤ x[l, attn/noop],  z_R ≤ x[l, fusable FFN]            ∀ l ∈ R
              Σ_{R ∋ l} z_R ≤ 1                                          ∀ l   (runs disjoint)

penalty_R is the measured quality cost of fusing R (KL of the child with R's attention removed and
its FFNs parallel, minus KL with R's attention removed only: `run_penalties`); saving_R is the
measured cost of R's members minus the fused FFN's (`run_savings`). "Puzzle first, fuse after"
(`fuse_after`) fuses whatever FFN-only runs the plain MIP child happens to have; comparing both at
the same speed is `experiments/fusion_joint.py`. `brute_force_joint` is the reference for tests.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Callable, Mapping, Sequence

import cvxpy as cp
import numpy as np

from puzzle_jax.core import model
from puzzle_jax.core.arch import Arch, AttnSpec, parallel_arch
from puzzle_jax.search import mip

NOOP_ATTN = "attn/noop"


@dataclasses.dataclass(frozen=True)
class FusionRun:
  layers: tuple[int, ...]
  penalty: float  # score added when fused (same units as the options' scores)
  saving: Mapping[str, float]  # cost removed when fused, per cost name


@dataclasses.dataclass(frozen=True)
class JointSolution:
  choices: tuple[tuple[str, str], ...]
  runs: tuple[tuple[int, ...], ...]  # fused runs
  objective: float
  totals: Mapping[str, float]


def candidate_runs(num_layers: int, max_run: int, first: int = 1) -> list[tuple[int, ...]]:
  """Every window of 2..max_run consecutive layers from layer `first` on."""
  return [tuple(range(s, s + k)) for k in range(2, max_run + 1) for s in range(first, num_layers - k + 1)]


def _eligible(choices: Sequence[tuple[str, str]], run: Sequence[int], ffn: str) -> bool:
  return all(choices[l] == (NOOP_ATTN, ffn) for l in run)


def evaluate_joint(layers: Sequence[mip.LayerOptions], runs: Sequence[FusionRun],
                   choices: Sequence[tuple[str, str]], fused: Sequence[int], *,
                   fixed: Mapping[str, float] | None = None) -> tuple[float, dict[str, float]]:
  """(objective, totals) of `choices` with the runs indexed by `fused` fused."""
  obj, totals = mip.evaluate(layers, choices, fixed=fixed)
  for r in fused:
    obj += runs[r].penalty
    for c, v in runs[r].saving.items():
      totals[c] = totals.get(c, 0.0) - v
  return obj, totals


def _fits(totals: Mapping[str, float], budgets: Mapping[str, float]) -> bool:
  return all(totals.get(c, 0.0) <= b * (1 + 1e-9) + 1e-15 for c, b in budgets.items())


def solve_joint(layers: Sequence[mip.LayerOptions], runs: Sequence[FusionRun], budgets: Mapping[str, float],
                fusable_ffn: str, *, fixed: Mapping[str, float] | None = None,
                forced: Mapping[tuple[int, str], str] | None = None,
                forbidden: Mapping[tuple[int, str], Sequence[str]] | None = None,
                solver: str = "HIGHS") -> JointSolution:
  """The least-score (choices, fused runs) within `budgets` (see the module docstring)."""
  fixed = dict(fixed or {})
  names = [[[o.name for o in getattr(lo, sub)] for sub in mip.SUBBLOCKS] for lo in layers]
  index, allowed = {}, []
  for l, pair in enumerate(names):
    for s, sub in enumerate(mip.SUBBLOCKS):
      for n in pair[s]:
        ok = (forced is None or (l, sub) not in forced or forced[(l, sub)] == n)
        ok &= n not in (forbidden or {}).get((l, sub), ())
        index[(l, s, n)] = len(allowed)
        allowed.append(ok)
  opts = [(l, s, o) for l, lo in enumerate(layers) for s, sub in enumerate(mip.SUBBLOCKS) for o in getattr(lo, sub)]
  x = cp.Variable(len(opts), boolean=True)
  z = cp.Variable(len(runs), boolean=True) if runs else None
  cons = [x[np.flatnonzero(~np.asarray(allowed))] == 0] if not all(allowed) else []
  for l in range(len(layers)):
    for s in range(2):
      cons.append(cp.sum(x[[index[(l, s, n)] for n in names[l][s]]]) == 1)
  for r, run in enumerate(runs):
    for l in run.layers:
      for s, n in ((0, NOOP_ATTN), (1, fusable_ffn)):
        cons.append(z[r] <= (x[index[(l, s, n)]] if (l, s, n) in index else 0))
  for l in range(len(layers)):
    mine = [r for r, run in enumerate(runs) if l in run.layers]
    if len(mine) > 1:
      cons.append(cp.sum(z[mine]) <= 1)
  for c, b in budgets.items():
    if not math.isfinite(b):
      continue
    cost = np.array([float(o.costs.get(c, 0.0)) for _, _, o in opts])
    scale = max(abs(b), np.abs(cost).max(initial=0.0), 1e-30)  # seconds and bytes share one model
    expr = (fixed.get(c, 0.0) + cost @ x) / scale
    if runs:
      expr = expr - np.array([run.saving.get(c, 0.0) for run in runs]) @ z / scale
    cons.append(expr <= b / scale)
  score = np.array([float(o.score) for _, _, o in opts])
  objective = score @ x + (np.array([r.penalty for r in runs]) @ z if runs else 0)
  prob = cp.Problem(cp.Minimize(objective), cons)
  prob.solve(solver=solver)
  if prob.status in cp.settings.INF_OR_UNB or x.value is None:
    raise mip.InfeasibleError(f"joint fusion MIP: no choice meets the budgets {dict(budgets)} ({prob.status})")
  chosen = [["", ""] for _ in layers]
  for i, (l, s, o) in enumerate(opts):
    if x.value[i] > 0.5:
      chosen[l][s] = o.name
  choices = tuple(tuple(p) for p in chosen)
  fused = [r for r in range(len(runs)) if z.value[r] > 0.5] if runs else []
  obj, totals = evaluate_joint(layers, runs, choices, fused, fixed=fixed)
  return JointSolution(choices, tuple(runs[r].layers for r in fused), obj, totals)


def brute_force_joint(layers: Sequence[mip.LayerOptions], runs: Sequence[FusionRun], budgets: Mapping[str, float],
                      fusable_ffn: str, *, fixed: Mapping[str, float] | None = None) -> JointSolution:
  """Every choice x every disjoint set of eligible runs (tests only: tiny problems)."""
  best = None
  per_layer = [list(itertools.product([o.name for o in lo.attn], [o.name for o in lo.ffn])) for lo in layers]
  for choices in itertools.product(*per_layer):
    ok = [r for r, run in enumerate(runs) if _eligible(choices, run.layers, fusable_ffn)]
    for k in range(len(ok) + 1):
      for subset in itertools.combinations(ok, k):
        used = [l for r in subset for l in runs[r].layers]
        if len(used) != len(set(used)):
          continue
        obj, totals = evaluate_joint(layers, runs, choices, subset, fixed=fixed)
        if _fits(totals, budgets) and (best is None or obj < best.objective - 1e-12):
          best = JointSolution(tuple(choices), tuple(runs[r].layers for r in subset), obj, totals)
  if best is None:
    raise mip.InfeasibleError("no choice meets the budgets")
  return best


def fuse_after(choices: Sequence[tuple[str, str]], runs: Sequence[FusionRun], fusable_ffn: str,
               max_run: int) -> list[int]:
  """"Puzzle first, fuse after": split every maximal FFN-only stretch of the chosen child into runs
  of at most `max_run` layers (left to right) and fuse those that are candidate runs."""
  by_layers = {r.layers: i for i, r in enumerate(runs)}
  out, stretch = [], []
  for l in range(len(choices) + 1):
    if l < len(choices) and choices[l] == (NOOP_ATTN, fusable_ffn):
      stretch.append(l)
      continue
    for s in range(0, len(stretch), max_run):
      piece = tuple(stretch[s:s + max_run])
      if piece in by_layers:
        out.append(by_layers[piece])
    stretch = []
  return out


# ----------------------------------------------------------------------------- measuring runs
def drop_attention(arch: Arch, params: model.Params, layers: Sequence[int]) -> tuple[Arch, model.Params]:
  """`arch` with attention removed in `layers` (their attention params dropped)."""
  ps = list(params["model"]["layers"])
  for l in layers:
    arch = arch.replace_block(l, attn=AttnSpec("noop"))
    ps[l] = model.split_layer(ps[l])[1]
  return arch, {**params, "model": {**params["model"], "layers": ps}}


def run_penalties(arch: Arch, params: model.Params, runs: Sequence[Sequence[int]],
                  kl: Callable[[Arch, model.Params], float]) -> list[float]:
  """Per run: kl(R's attention removed, FFNs parallel) - kl(R's attention removed), clipped at 0."""
  out = []
  from tqdm.auto import tqdm
  for run in tqdm(runs, desc="fusion penalties", leave=False):
    a, p = drop_attention(arch, params, run)
    out.append(max(kl(parallel_arch(a, run), p) - kl(a, p), 0.0))
  return out


def run_savings(variant_costs: Mapping[str, Mapping[str, float]], runs: Sequence[Sequence[int]], width: int,
                fields: Sequence[str] = ("decode_s", "prefill_s")) -> list[dict[str, float]]:
  """Per run of k FFNs of `width`: k x cost(ffn/swiglu_width) - cost(ffn/swiglu_{k*width}), from a
  cost table's `variants` (it must hold the fused widths: measure them like any variant)."""
  out = []
  for run in runs:
    k = len(run)
    member, fused = f"ffn/swiglu_{width}", f"ffn/swiglu_{k * width}"
    missing = [key for key in (member, fused) if key not in variant_costs]
    if missing:
      raise KeyError(f"cost table lacks {missing}; measure the fused widths (costs.cost_table / analytic_table)")
    out.append({c: k * variant_costs[member][c] - variant_costs[fused][c] for c in fields})
  return out
