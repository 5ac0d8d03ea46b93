"""Puzzle's mixed-integer program: pick one attention and one FFN candidate per layer.

Formulation. Layer l has attention candidates a ∈ A_l and FFN candidates f ∈ F_l; call each
(layer, sub-block) pair a *group* g (2 per layer) and its candidates O_g. A boolean x_{g,o}
says candidate o is chosen for group g:

  minimize    Σ_g Σ_{o∈O_g} score_{g,o} · x_{g,o}                  (e.g. replace-1-block KL)
  subject to  Σ_{o∈O_g} x_{g,o} = 1                        ∀ g     (exactly one per group)
              fixed_c + Σ_g Σ_o cost_{g,o,c} · x_{g,o} ≤ budget_c   ∀ c     (decode time, memory, ...)
              Σ_{(g,o)∈S_e} x_{g,o} ≤ 2L − min_hamming     ∀ e     (differ from excluded e)

S_e is the set of choices of an excluded solution e, so the last row forces the new solution
to change at least `min_hamming` of its 2L sub-block choices (used for diverse solutions).
Forced / forbidden candidates are removed from O_g before the model is built.

Numerics: seconds (~1e-5) and bytes (~1e9) share one model, so each budget row is shifted by
its per-group minimum (the one-hot rows make this exact) and divided by its largest
coefficient; scores are shifted and scaled the same way. Totals and objectives are always
recomputed from the chosen names in the caller's units, never read back from the solver.

Before solving, each budget is checked on its own against its least achievable total (fixed +
Σ_g min_o cost); a failure, or a solver-proven joint infeasibility, raises InfeasibleError with
a per-constraint table. Solved with HiGHS through cvxpy by default; `brute_force` enumerates
every combination and is the reference the tests compare against.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from typing import Callable, Iterable, Mapping, Sequence

import cvxpy as cp
import numpy as np
import scipy.sparse as sp

SUBBLOCKS = ("attn", "ffn")
_FEAS_RTOL = 1e-9  # relative slack when comparing a total with its budget (float round-off).
_BRUTE_MAX = 5_000_000  # combinations `brute_force` will enumerate.


class InfeasibleError(ValueError):
  """No choice of candidates meets the budgets; the message lists the least achievable totals."""


@dataclasses.dataclass(frozen=True)
class Option:
  """One candidate sub-block: its quality loss (lower is better) and resource costs."""
  name: str
  score: float
  costs: Mapping[str, float]


@dataclasses.dataclass(frozen=True)
class LayerOptions:
  attn: tuple[Option, ...]
  ffn: tuple[Option, ...]


@dataclasses.dataclass(frozen=True)
class Solution:
  choices: tuple[tuple[str, str], ...]  # (attn name, ffn name) per layer.
  objective: float  # Σ score of the chosen candidates.
  totals: Mapping[str, float]  # fixed + Σ cost, per cost name, in the caller's units.
  status: str  # cvxpy status ("optimal", "user_limit" on a time limit, ...).
  gap: float | None  # relative optimality gap; 0.0 when proven optimal.
  solve_s: float  # wall time of the whole call (model build + solve).


# ------------------------------------------------------------------ flattened problem
@dataclasses.dataclass(frozen=True, eq=False)
class _Problem:
  """Candidates flattened to vectors; group g = 2 * layer + (0 attn | 1 ffn)."""
  names: tuple[str, ...]  # per candidate.
  group: np.ndarray  # (n,) group id per candidate.
  scores: np.ndarray  # (n,)
  costs: np.ndarray  # (n, C)
  allowed: np.ndarray  # (n,) bool: not removed by forced / forbidden.
  cost_names: tuple[str, ...]  # C names: every cost any option, `fixed` or budget mentions.
  fixed: np.ndarray  # (C,)
  budgets: np.ndarray  # (C,), +inf where unconstrained.
  n_groups: int


def _finite(x: float, what: str) -> float:
  try:
    v = float(x)
  except (TypeError, ValueError):
    raise ValueError(f"{what} must be a number, got {x!r}") from None
  if not math.isfinite(v):
    raise ValueError(f"{what} is {v}; scores and costs must be finite")
  return v


def _validate_layers(layers: Sequence[LayerOptions]) -> None:
  if not layers:
    raise ValueError("layers is empty; pass one LayerOptions per layer")
  for l, lo in enumerate(layers):
    for sub in SUBBLOCKS:
      opts = getattr(lo, sub)
      if not opts:
        raise ValueError(f"layer {l} has no {sub} candidates; give it at least one (e.g. the parent's)")
      names = [o.name for o in opts]
      dup = {n for n in names if names.count(n) > 1}
      if dup:
        raise ValueError(f"layer {l} {sub}: duplicate candidate names {sorted(dup)}")
      for o in opts:
        _finite(o.score, f"layer {l} {sub} {o.name!r} score")
        for c, v in o.costs.items():
          _finite(v, f"layer {l} {sub} {o.name!r} cost {c!r}")


def _cost_names(layers: Sequence[LayerOptions], fixed: Mapping[str, float],
                budgets: Mapping[str, float]) -> tuple[str, ...]:
  seen = dict.fromkeys(c for lo in layers for sub in SUBBLOCKS for o in getattr(lo, sub) for c in o.costs)
  seen.update(dict.fromkeys(fixed))
  # A budget on a cost nobody reports is almost surely a typo; a silent 0 would hide it.
  unknown = [b for b in budgets if b not in seen]
  if unknown:
    raise ValueError(f"budgets {unknown} name costs that no option and no `fixed` entry has; "
                     f"known costs: {sorted(seen)}")
  return tuple(seen)


def _check_budgets(budgets: Mapping[str, float]) -> None:
  for c, b in budgets.items():
    try:
      v = float(b)
    except (TypeError, ValueError):
      raise ValueError(f"budget {c!r} must be a number, got {b!r}") from None
    if math.isnan(v) or v < 0:
      raise ValueError(f"budget {c!r} is {v}; budgets are non-negative upper bounds (inf = unconstrained)")

def _names_of(value: str | Iterable[str]) -> tuple[str, ...]:
  return (value,) if isinstance(value, str) else tuple(value)


def _allowed_mask(layers: Sequence[LayerOptions], forced, forbidden) -> np.ndarray:
  """Per-candidate mask after pinning `forced` choices and removing `forbidden` ones."""
  mask = [[np.ones(len(getattr(lo, sub)), bool) for sub in SUBBLOCKS] for lo in layers]
  for kind, table in (("forced", forced or {}), ("forbidden", forbidden or {})):
    for key, value in table.items():
      if not (isinstance(key, tuple) and len(key) == 2 and key[1] in SUBBLOCKS
              and isinstance(key[0], (int, np.integer)) and 0 <= key[0] < len(layers)):
        raise ValueError(f"{kind} key {key!r} must be (layer index in [0, {len(layers)}), 'attn' | 'ffn')")
      l, sub = int(key[0]), key[1]
      names = [o.name for o in getattr(layers[l], sub)]
      want = _names_of(value)
      if kind == "forced" and len(want) != 1:
        raise ValueError(f"forced[{key!r}] must be one candidate name, got {value!r}")
      for n in want:
        if n not in names:
          raise ValueError(f"{kind}[{key!r}] = {n!r} is not a candidate of layer {l} {sub}; "
                           f"candidates: {names}")
      m = mask[l][SUBBLOCKS.index(sub)]
      hit = np.isin(names, want)
      m &= hit if kind == "forced" else ~hit
  for l, pair in enumerate(mask):
    for sub, m in zip(SUBBLOCKS, pair):
      if not m.any():
        raise ValueError(f"forced/forbidden leave layer {l} {sub} with no candidate "
                         f"(a forbidden name is also forced, or every candidate is forbidden)")
  return np.concatenate([m for pair in mask for m in pair])


def _prepare(layers, budgets, fixed=None, forced=None, forbidden=None) -> _Problem:
  _validate_layers(layers)
  fixed = dict(fixed or {})
  for c, v in fixed.items():
    _finite(v, f"fixed[{c!r}]")
  _check_budgets(budgets)
  cost_names = _cost_names(layers, fixed, budgets)
  opts = [(2 * l + s, o) for l, lo in enumerate(layers) for s, sub in enumerate(SUBBLOCKS)
          for o in getattr(lo, sub)]
  costs = np.array([[float(o.costs.get(c, 0.0)) for c in cost_names] for _, o in opts])
  return _Problem(
      names=tuple(o.name for _, o in opts),
      group=np.array([g for g, _ in opts]),
      scores=np.array([float(o.score) for _, o in opts]),
      costs=costs.reshape(len(opts), len(cost_names)),
      allowed=_allowed_mask(layers, forced, forbidden),
      cost_names=cost_names,
      fixed=np.array([float(fixed.get(c, 0.0)) for c in cost_names]),
      budgets=np.array([float(budgets.get(c, math.inf)) for c in cost_names]),
      n_groups=2 * len(layers))


def _group_min(p: _Problem, values: np.ndarray) -> np.ndarray:
  """(G, ...) minimum of `values` over each group's allowed candidates."""
  out = np.full((p.n_groups,) + values.shape[1:], np.inf)
  np.minimum.at(out, p.group[p.allowed], values[p.allowed])
  return out


def _least_totals(p: _Problem) -> np.ndarray:
  """Least achievable total per cost, each minimized on its own (forced choices respected)."""
  return p.fixed + _group_min(p, p.costs).sum(0)


def _over(total: np.ndarray, budget: np.ndarray) -> np.ndarray:
  return total > budget + _FEAS_RTOL * np.maximum(np.abs(budget), 1e-300)


# ------------------------------------------------------------------ infeasibility reports
def _infeasibility_message(p: _Problem, joint: bool, n_cuts: int) -> str:
  least = _least_totals(p)
  alone = _over(least, p.budgets)
  lines = ["no choice of candidates meets the budgets (least achievable = fixed + the cheapest "
           "allowed candidate of every sub-block, forced choices included):"]
  for c, name in enumerate(p.cost_names):
    if math.isfinite(p.budgets[c]):
      verdict = "IMPOSSIBLE even alone" if alone[c] else "achievable alone"
      lines.append(f"  {name:<14} budget {p.budgets[c]:.6g}   least achievable {least[c]:.6g} "
                   f"(fixed {p.fixed[c]:.6g})   {verdict}")
  if alone.any():
    bad = [p.cost_names[c] for c in np.flatnonzero(alone)]
    lines.append(f"constraints impossible on their own: {bad}.")
  elif joint:
    lines.append("each constraint is achievable alone, but not all together (joint infeasibility).")
    if n_cuts:
      lines.append(f"  ({n_cuts} exclude/min_hamming cut(s) may have removed the last feasible choices.)")
  lines.append("hint: raise the budget, lower the target speedup, relax forced choices, "
               "or add cheaper candidates (e.g. linear / noop sub-blocks) to more layers.")
  return "\n".join(lines)


def _check_alone(p: _Problem) -> None:
  if _over(_least_totals(p), p.budgets).any():
    raise InfeasibleError(_infeasibility_message(p, joint=False, n_cuts=0))


# ------------------------------------------------------------------ model building
def _budget_rows(p: _Problem, var: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Shifted, row-scaled budget constraints over the candidates `var` (A x ≤ b)."""
  gmin = _group_min(p, p.costs)  # (G, C)
  a = (p.costs[var] - gmin[p.group[var]]).T  # (C, n_var) ≥ 0
  b = p.budgets - p.fixed - gmin.sum(0)  # slack above the cheapest choice.
  gmax = np.zeros_like(gmin)
  np.maximum.at(gmax, p.group[var], a.T)
  # Keep only rows that can bind: finite, and tighter than picking every group's dearest.
  keep = np.isfinite(b) & (b < gmax.sum(0) * (1 - 1e-12)) & (a.max(1, initial=0) > 0)
  a, b = a[keep], np.maximum(b[keep], 0.0)  # b < 0 only by round-off once _check_alone passed.
  scale = np.maximum(a.max(1, initial=0), b)
  return a / scale[:, None], b / scale


def _hamming_rows(p: _Problem, var: np.ndarray, exclude: Sequence[np.ndarray],
                  min_hamming: int) -> tuple[np.ndarray, np.ndarray]:
  a = np.array([np.isin(var, e) for e in exclude], float).reshape(len(exclude), len(var))
  return a, np.full(len(exclude), float(p.n_groups - min_hamming))


def _objective(p: _Problem, var: np.ndarray) -> tuple[np.ndarray, float, float]:
  """Scaled, shifted score vector c with score·x = offset + scale · c·x."""
  gmin = _group_min(p, p.scores)
  c = p.scores[var] - gmin[p.group[var]]
  scale = float(c.max(initial=0.0)) or 1.0
  return c / scale, float(gmin.sum()), scale


# ------------------------------------------------------------------ solving
def _solver_options(solver: str, time_limit_s: float | None, mip_gap: float) -> dict:
  s = solver.upper()
  if s == "HIGHS":
    # HiGHS' defaults (1e-6 feasibility on the scaled rows, 1e-6 absolute gap) let it overshoot
    # a budget by ~1e-6 relative, and so "beat" the true optimum; 1e-9 costs no time here.
    opts = {"mip_rel_gap": mip_gap, "mip_abs_gap": 1e-9 if mip_gap == 0 else 1e-6,
            "mip_feasibility_tolerance": 1e-9, "primal_feasibility_tolerance": 1e-9}
    return opts | ({"time_limit": float(time_limit_s)} if time_limit_s is not None else {})
  if s == "SCIPY":
    opts = {"mip_rel_gap": mip_gap} | ({"time_limit": float(time_limit_s)} if time_limit_s else {})
    return {"scipy_options": opts}
  if time_limit_s is not None or mip_gap:
    warnings.warn(f"solver {solver!r}: time_limit_s / mip_gap are only passed to HIGHS and SCIPY")
  return {}


def _stat(stats, key: str) -> float | None:
  v = stats.get(key) if isinstance(stats, Mapping) else getattr(stats, key, None)
  return float(v) if v is not None and math.isfinite(float(v)) else None


def _solve_mip(p: _Problem, cuts: Sequence[np.ndarray], min_hamming: int, solver: str,
               opts: dict) -> tuple[np.ndarray, str, float | None]:
  """Build and solve the model; return chosen candidate indices, status, dual bound (caller's units)."""
  var = np.flatnonzero(p.allowed)
  c, offset, scale = _objective(p, var)
  a_b, b_b = _budget_rows(p, var)
  a_h, b_h = _hamming_rows(p, var, cuts, min_hamming)
  a_ub, b_ub = np.vstack([a_b, a_h]), np.concatenate([b_b, b_h])
  onehot = sp.csr_matrix((np.ones(len(var)), (p.group[var], np.arange(len(var)))),
                         shape=(p.n_groups, len(var)))
  x = cp.Variable(len(var), boolean=True)
  cons = [onehot @ x == 1] + ([sp.csr_matrix(a_ub) @ x <= b_ub] if len(b_ub) else [])
  prob = cp.Problem(cp.Minimize(c @ x), cons)
  try:
    prob.solve(solver=solver, **opts)
  except cp.error.SolverError as e:
    raise RuntimeError(f"solver {solver} failed ({e}); if time_limit_s is set, raise it") from e
  if prob.status in cp.settings.INF_OR_UNB:
    raise InfeasibleError(_infeasibility_message(p, joint=True, n_cuts=len(cuts)))
  if x.value is None:
    raise RuntimeError(f"solver {solver} stopped with status {prob.status!r} and no feasible "
                       "architecture; raise time_limit_s or mip_gap")
  chosen = np.empty(p.n_groups, int)
  for g in range(p.n_groups):
    in_g = np.flatnonzero(p.group[var] == g)
    chosen[g] = var[in_g[np.argmax(x.value[in_g])]]
  stats = prob.solver_stats.extra_stats if prob.solver_stats else None
  bound = _stat(stats, "mip_dual_bound") if stats is not None else None
  return chosen, prob.status, (offset + scale * bound if bound is not None else None)


def _gap(objective: float, bound: float | None, status: str) -> float | None:
  """Relative gap (objective − dual bound) / |objective|; 0.0 when closed to round-off."""
  if bound is None:
    return 0.0 if status == "optimal" else None
  abs_gap = max(0.0, objective - bound)
  if abs_gap <= 1e-9 * max(1.0, abs(objective)):
    return 0.0
  return abs_gap / max(abs(objective), 1e-12)


def _verify(p: _Problem, chosen: np.ndarray, status: str, cuts: Sequence[np.ndarray],
            min_hamming: int, solver: str) -> None:
  """Reject what the solver returns when it stopped early with an infeasible point."""
  totals = p.fixed + p.costs[chosen].sum(0)
  # Scaled rows carry a 1e-9 (HIGHS) to 1e-6 (SCIPY) feasibility tolerance; more is no solution.
  span = np.maximum(np.abs(p.budgets), np.abs(p.fixed) + np.abs(p.costs).max(0) * p.n_groups)
  over = [p.cost_names[c] for c in np.flatnonzero(totals > p.budgets + 1e-6 * span)]
  close = [i for i, cut in enumerate(cuts) if p.n_groups - np.isin(chosen, cut).sum() < min_hamming]
  if over or close:
    why = f"over budget on {over}" if over else f"within min_hamming of excluded solutions {close}"
    hint = ("raise time_limit_s" if status != "optimal" else "numerical trouble; try solver='SCIPY'")
    raise RuntimeError(f"solver {solver} stopped ({status}) with a point {why}; {hint}")


def _solution(p: _Problem, chosen: np.ndarray, status: str, bound: float | None, t0: float) -> Solution:
  totals = p.fixed + p.costs[chosen].sum(0)
  objective = float(p.scores[chosen].sum())
  names = [p.names[i] for i in chosen]
  return Solution(choices=tuple(zip(names[0::2], names[1::2])), objective=objective,
                  totals=dict(zip(p.cost_names, map(float, totals))), status=status,
                  gap=_gap(objective, bound, status), solve_s=time.perf_counter() - t0)


def _indices_of(p: _Problem, choices: Sequence[tuple[str, str]]) -> np.ndarray:
  if len(choices) * 2 != p.n_groups:
    raise ValueError(f"an excluded solution has {len(choices)} layers, the problem {p.n_groups // 2}")
  lookup = {(int(g), n): i for i, (g, n) in enumerate(zip(p.group, p.names))}
  try:
    return np.array([lookup[(2 * l + s, name)] for l, pair in enumerate(choices)
                     for s, name in enumerate(pair)])
  except KeyError as e:
    raise ValueError(f"an excluded solution names a candidate the layers lack: {e}") from None


def solve(layers: Sequence[LayerOptions], budgets: Mapping[str, float], *,
          fixed: Mapping[str, float] | None = None,
          forced: Mapping[tuple[int, str], str] | None = None,
          forbidden: Mapping[tuple[int, str], str | Sequence[str]] | None = None,
          exclude: Sequence[Solution] = (), min_hamming: int = 1, solver: str = "HIGHS",
          time_limit_s: float | None = None, mip_gap: float = 0.0) -> Solution:
  """The least-score architecture within `budgets` (see the module docstring).

  Raises InfeasibleError (a ValueError) with the least achievable totals when no choice fits,
  and ValueError on malformed inputs. `forbidden` values are one name or a list of names.
  """
  t0 = time.perf_counter()
  p = _prepare(layers, budgets, fixed, forced, forbidden)
  if not 1 <= min_hamming <= p.n_groups:
    raise ValueError(f"min_hamming must be in [1, {p.n_groups}] (2 sub-blocks x layers), got {min_hamming}")
  if not 0 <= mip_gap < 1 or (time_limit_s is not None and not time_limit_s > 0):
    raise ValueError(f"need 0 <= mip_gap < 1 and time_limit_s > 0; got {mip_gap}, {time_limit_s}")
  _check_alone(p)
  cuts = [_indices_of(p, e.choices) for e in exclude]
  chosen, status, bound = _solve_mip(p, cuts, min_hamming, solver,
                                     _solver_options(solver, time_limit_s, mip_gap))
  _verify(p, chosen, status, cuts, min_hamming, solver)
  return _solution(p, chosen, status, bound, t0)


def brute_force(layers: Sequence[LayerOptions], budgets: Mapping[str, float],
                fixed: Mapping[str, float] | None = None,
                forced: Mapping[tuple[int, str], str] | None = None,
                forbidden: Mapping[tuple[int, str], str | Sequence[str]] | None = None) -> Solution | None:
  """Exact optimum by enumerating every combination (tests only); None when none fits."""
  t0 = time.perf_counter()
  p = _prepare(layers, budgets, fixed, forced, forbidden)
  sizes = [int((p.allowed & (p.group == g)).sum()) for g in range(p.n_groups)]
  if math.prod(sizes) > _BRUTE_MAX:
    raise ValueError(f"{math.prod(sizes):,} combinations; brute_force enumerates at most {_BRUTE_MAX:,}")
  idx = np.zeros((1, 0), int)
  for g in range(p.n_groups):  # Cartesian product, one group at a time.
    cand = np.flatnonzero(p.allowed & (p.group == g))
    idx = np.hstack([np.repeat(idx, len(cand), 0), np.tile(cand, len(idx))[:, None]])
  totals = p.fixed + p.costs[idx].sum(1)
  objective = np.where(_over(totals, p.budgets).any(1), np.inf, p.scores[idx].sum(1))
  best = int(np.argmin(objective))
  if not math.isfinite(objective[best]):
    return None
  return _solution(p, idx[best], "optimal", None, t0)


def diverse_solutions(layers: Sequence[LayerOptions], budgets: Mapping[str, float], k: int, *,
                      min_hamming: int = 1, **kw) -> list[Solution]:
  """Up to k solutions, each optimal among those ≥ min_hamming sub-block changes from all before.

  Fewer than k come back when the cuts exhaust the feasible set; infeasible budgets raise.
  """
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}")
  found: list[Solution] = []
  base = list(kw.pop("exclude", ()))
  for _ in range(k):
    try:
      found.append(solve(layers, budgets, exclude=base + found, min_hamming=min_hamming, **kw))
    except InfeasibleError:
      if not found:
        raise
      break
  return found


def pareto_front(layers: Sequence[LayerOptions], constraint: str, budgets_list: Sequence[float],
                 other_budgets: Mapping[str, float] | None = None, **kw) -> list[Solution | None]:
  """Optimal solutions as `constraint`'s budget sweeps `budgets_list` (None where infeasible)."""
  out: list[Solution | None] = []
  for b in budgets_list:
    try:
      out.append(solve(layers, {**(other_budgets or {}), constraint: b}, **kw))
    except InfeasibleError:
      out.append(None)
  return out


def speedup_budget(parent_total: float, speedup: float) -> float:
  """Budget on a time-like cost for a target speedup over the parent: parent / speedup."""
  if not speedup > 0 or not parent_total >= 0:
    raise ValueError(f"need speedup > 0 and parent_total >= 0, got {speedup}, {parent_total}")
  return parent_total / speedup


def hamming(a: Solution | Sequence[tuple[str, str]], b: Solution | Sequence[tuple[str, str]]) -> int:
  """Number of sub-block choices (2 per layer) in which two solutions differ."""
  ca, cb = (getattr(s, "choices", s) for s in (a, b))
  return sum(x != y for pa, pb in zip(ca, cb, strict=True) for x, y in zip(pa, pb))


def evaluate(layers: Sequence[LayerOptions], choices: Sequence[tuple[str, str]], *,
             fixed: Mapping[str, float] | None = None) -> tuple[float, dict[str, float]]:
  """(objective, totals) of a given per-layer choice, e.g. the parent, for baselines."""
  p = _prepare(layers, {}, fixed)
  idx = _indices_of(p, choices)
  return float(p.scores[idx].sum()), dict(zip(p.cost_names, map(float, p.fixed + p.costs[idx].sum(0))))


# ------------------------------------------------------------------ synthetic instances
# Illustrative parent costs per sub-block (memory = bf16 weights + KV cache), for synthetic instances.
_PARENT_COSTS = {"attn": {"decode_s": 2e-5, "memory_bytes": 6e7, "params": 1.6e7},
                 "ffn": {"decode_s": 3e-5, "memory_bytes": 1e8, "params": 5e7}}


def _random_options(rng: np.random.Generator, sub: str, n: int, importance: float) -> tuple[Option, ...]:
  """Parent (score 0, full cost), n − 2 cheaper variants, and a free but lossy noop."""
  frac = np.concatenate([[1.0], np.sort(rng.uniform(0.05, 0.95, max(n - 2, 0)))[::-1], [0.0]])[:n]
  opts = []
  for j, f in enumerate(frac):
    name = f"{sub}/parent" if j == 0 else f"{sub}/noop" if f == 0 else f"{sub}/v{j}"
    if j == 0:
      costs, score = dict(_PARENT_COSTS[sub]), 0.0
    else:  # Each cost shrinks by its own jittered fraction so the constraints are not redundant.
      costs = {c: v * min(1.0, f * rng.uniform(0.7, 1.3)) for c, v in _PARENT_COSTS[sub].items()}
      score = importance * (1 - f) ** 1.5 * rng.uniform(0.5, 1.5)
    opts.append(Option(name, float(score), costs))
  return tuple(opts)


def random_layers(seed: int, n_layers: int, n_attn: int = 3, n_ffn: int = 3) -> tuple[LayerOptions, ...]:
  """A synthetic search space with costs decode_s / memory_bytes / params (tests, benchmarks)."""
  rng = np.random.default_rng(seed)
  importance = rng.lognormal(-3.0, 1.0, n_layers)  # how much removing layer l hurts.
  return tuple(LayerOptions(_random_options(rng, "attn", n_attn, imp), _random_options(rng, "ffn", n_ffn, imp))
               for imp in importance)


# ------------------------------------------------------------------ plots
Point = tuple[str, float, float]  # (series label, x = cost or speedup, y = score)
NamePair = tuple[Sequence[str], Sequence[str]]  # one layer's (attention names, FFN names)


def pareto_points(label: str, solutions: Sequence[Solution | None],
                  x: str | Callable[[Solution], float]) -> list[Point]:
  """(label, x, objective) per feasible solution; `x` is a totals key or a function of the solution."""
  fx = (lambda s: s.totals[x]) if isinstance(x, str) else x
  return [(label, float(fx(s)), s.objective) for s in solutions if s is not None]


def _figure(width: float, height: float):
  # A bare Figure renders through Agg without touching pyplot's global backend (safe in notebooks).
  from matplotlib.figure import Figure
  return Figure(figsize=(width, height), dpi=110, layout="constrained")


def plot_pareto(points: Sequence[Point] | Mapping[str, Sequence[tuple[float, float]]], path,
                *, baselines: Sequence[Point] = (), xlabel: str = "cost",
                ylabel: str = "score (lower is better)", title: str | None = None) -> str:
  """Quality-vs-cost curves, one line per label, plus labelled baseline markers; writes a PNG."""
  if isinstance(points, Mapping):
    points = [(lab, x, y) for lab, xy in points.items() for x, y in xy]
  fig = _figure(6.4, 4.2)
  ax = fig.add_subplot()
  labels = list(dict.fromkeys(p[0] for p in points))
  for i, label in enumerate(labels):
    xy = sorted((x, y) for lab, x, y in points if lab == label)
    ax.plot(*zip(*xy), marker="o", ms=4, color=f"C{i % 10}", label=label)
  for i, (label, x, y) in enumerate(baselines, start=len(labels)):
    ax.scatter([x], [y], marker="*", s=120, zorder=3, color=f"C{i % 10}", label=label)
    ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
  ax.set(xlabel=xlabel, ylabel=ylabel, title=title or "")
  ax.grid(alpha=0.3)
  if points or baselines:
    ax.legend(fontsize=8)
  fig.savefig(path)
  return str(path)


def _option_names(layer_option_names, sub: int) -> list[str]:
  """Candidate names of one sub-block in first-seen order across layers (stable colours)."""
  if layer_option_names is None:
    return []
  rows = [((o.name for o in getattr(lo, SUBBLOCKS[sub])) if isinstance(lo, LayerOptions) else lo[sub])
          for lo in layer_option_names]
  return list(dict.fromkeys(n for r in rows for n in r))


def plot_choices(choices: Solution | Sequence[tuple[str, str]],
                 layer_option_names: Sequence[LayerOptions] | Sequence[NamePair] | None,
                 path, *, title: str | None = None) -> str:
  """Two stripes (attention, FFN) of per-layer chosen candidates, one colour per name; writes a PNG."""
  import matplotlib
  from matplotlib.patches import Patch
  choices = getattr(choices, "choices", choices)
  n = len(choices)
  fig = _figure(max(6.0, 0.16 * n + 2.5), 3.2)
  axes = fig.subplots(2, 1, sharex=True)
  for s, ax in enumerate(axes):
    chosen = [c[s] for c in choices]
    names = list(dict.fromkeys(_option_names(layer_option_names, s) + chosen))
    cmap = matplotlib.colormaps["tab20" if len(names) > 10 else "tab10"]
    colours = [cmap(names.index(c) % cmap.N) for c in chosen]
    ax.bar(range(n), 1.0, width=1.0, color=colours, edgecolor="white", linewidth=0.5)
    ax.set(yticks=[], xlim=(-0.5, n - 0.5), ylim=(0, 1))
    ax.set_ylabel(SUBBLOCKS[s], rotation=0, ha="right", va="center")
    used = [u for u in names if u in set(chosen)]
    handles = [Patch(color=cmap(names.index(u) % cmap.N), label=u) for u in used]
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
  axes[1].set_xlabel("layer")
  fig.suptitle(title or "chosen candidates per layer", fontsize=10)
  fig.savefig(path)
  return str(path)
