"""Selection: scores + cost table + library -> the MIP problem, its solution and the Pareto front.

Builds one `mip.LayerOptions` per layer (an Option per candidate, named by its variant key, with
its replace-1-block score and its measured costs), turns the config's targets into budgets
relative to the parent's predicted totals, solves, and sweeps the decode-speed target for the
Pareto front. It does not care where the cost table came from (JAX here, or the PyTorch/H100
harness), only that it covers every variant of the library.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Mapping, Sequence

from puzzle_jax import artifacts
from puzzle_jax.search import mip
from puzzle_jax.search.candidates import CandidateSet
from puzzle_jax.search.realize import parent_choices

COST_FIELDS = ("decode_s", "prefill_s", "weight_bytes", "kv_bytes", "params")


@dataclasses.dataclass(frozen=True)
class Targets:
  decode_speedup: float = 1.3  # 0 = unconstrained
  prefill_speedup: float = 0.0
  max_memory_gb: float = 0.0
  max_params: int = 0
  keep_first_attn: bool = True
  engine: str = "transformers"  # serving target: variants it cannot load are forbidden (export.engines)


def _costs(entry: Mapping[str, float]) -> dict[str, float]:
  out = {k: float(entry.get(k, 0.0)) for k in COST_FIELDS}
  out["memory_bytes"] = out["weight_bytes"] + out["kv_bytes"]
  return out


def layer_options(library: CandidateSet, scores: Mapping[str, Mapping[str, float]], table: Mapping[str, Any],
                  metric: str = "kl") -> list[mip.LayerOptions]:
  """One Option per candidate; KL is clipped at 0 (the parent's own is 0 up to rounding).

  `library`: a `library.Library`, or a bare `candidates.CandidateSet` where scores come from elsewhere."""
  missing = [c.id for c in library.candidates if c.id not in scores]
  if missing:
    raise KeyError(f"{len(missing)} candidates have no score (e.g. {missing[:3]}); re-run the score stage")
  out = []
  for layer in range(library.arch.num_layers):
    opts = {}
    for sub in ("attn", "ffn"):
      opts[sub] = tuple(
          mip.Option(c.key, max(scores[c.id][metric], 0.0) if metric == "kl" else scores[c.id][metric],
                     _costs(table["variants"][c.key]))
          for c in library.at(layer, sub))
    out.append(mip.LayerOptions(**opts))
  return out


def fixed_costs(table: Mapping[str, Any]) -> dict[str, float]:
  return _costs(table["fixed"])


def budgets(parent_totals: Mapping[str, float], t: Targets, decode_speedup: float | None = None) -> dict:
  speed = t.decode_speedup if decode_speedup is None else decode_speedup
  out = {}
  if speed:
    out["decode_s"] = mip.speedup_budget(parent_totals["decode_s"], speed)
  if t.prefill_speedup:
    out["prefill_s"] = mip.speedup_budget(parent_totals["prefill_s"], t.prefill_speedup)
  if t.max_memory_gb:
    out["memory_bytes"] = t.max_memory_gb * 2**30
  if t.max_params:
    out["params"] = float(t.max_params)
  return out


@dataclasses.dataclass
class Problem:
  """Everything needed to solve for any target: options, fixed costs, parent totals, rules."""
  layers: list[mip.LayerOptions]
  fixed: dict[str, float]
  parent_totals: dict[str, float]
  forced: dict[tuple[int, str], str]
  targets: Targets
  forbidden: dict[tuple[int, str], list[str]] = dataclasses.field(default_factory=dict)

  def solve(self, decode_speedup: float | None = None, **kw) -> mip.Solution:
    return mip.solve(self.layers, budgets(self.parent_totals, self.targets, decode_speedup),
                     fixed=self.fixed, forced=self.forced, forbidden=self.forbidden, **kw)

  def totals(self, choices: Sequence[tuple[str, str]]) -> tuple[float, dict[str, float]]:
    return mip.evaluate(self.layers, choices, fixed=self.fixed)

  def fits(self, choices, decode_speedup: float | None = None) -> bool:
    b = budgets(self.parent_totals, self.targets, decode_speedup)
    totals = self.totals(choices)[1]
    return all(totals[k] <= v * (1 + 1e-9) for k, v in b.items())


def build_problem(library: CandidateSet, scores, table, metric: str, targets: Targets) -> Problem:
  layers = layer_options(library, scores, table, metric)
  fixed = fixed_costs(table)
  _, parent_totals = mip.evaluate(layers, parent_choices(library.arch), fixed=fixed)
  forced = {}
  if targets.keep_first_attn:
    forced[(0, "attn")] = parent_choices(library.arch)[0][0]
  return Problem(layers, fixed, parent_totals, forced, targets,
                 engine_forbidden(layers, targets.engine, library.arch.hidden_size))


def engine_forbidden(layers: Sequence[mip.LayerOptions], engine: str,
                     hidden_size: int) -> dict[tuple[int, str], list[str]]:
  """{(layer, sub): variant names} the serving engine cannot load (linear sub-blocks on vLLM, windows
  and widths that do not survive ffn_mult rounding on vLLM / TensorRT-LLM)."""
  from puzzle_jax.core.arch import spec_from_key
  from puzzle_jax.export import engines
  out = {}
  for l, lo in enumerate(layers):
    for sub in ("attn", "ffn"):
      bad = [o.name for o in getattr(lo, sub) if not engines.loadable(spec_from_key(o.name), engine, hidden_size)]
      if bad:
        out[(l, sub)] = bad
  return out


def solution_doc(sol: mip.Solution, problem: Problem) -> dict[str, Any]:
  return {"choices": [list(c) for c in sol.choices], "objective": sol.objective, "totals": dict(sol.totals),
          "parent_totals": problem.parent_totals,
          "predicted_decode_speedup": problem.parent_totals["decode_s"] / sol.totals["decode_s"],
          "predicted_prefill_speedup": problem.parent_totals["prefill_s"] / max(sol.totals["prefill_s"], 1e-30),
          "status": sol.status, "gap": sol.gap, "solve_s": sol.solve_s}


def solve_and_plot(problem: Problem, out: pathlib.Path, *, num_solutions: int = 1, solver: str = "HIGHS",
                   pareto_speedups: Sequence[float] = (), metric: str = "kl") -> dict[str, Any]:
  """Solve for the problem's targets (with `num_solutions - 1` diverse alternatives) and sweep the
  Pareto front; writes `out` (solution.json), pareto.png and choices.png beside it."""
  sols = mip.diverse_solutions(problem.layers, budgets(problem.parent_totals, problem.targets),
                               num_solutions, fixed=problem.fixed, forced=problem.forced,
                               forbidden=problem.forbidden, solver=solver)
  best = sols[0]
  front = [(t, _solve_or_none(problem, t)) for t in pareto_speedups]
  doc = solution_doc(best, problem)
  doc["alternatives"] = [solution_doc(s, problem) for s in sols[1:]]
  doc["pareto"] = [{"target_speedup": t, **(solution_doc(s, problem) if s else {"infeasible": True})}
                   for t, s in front]
  artifacts.write_json(out, doc)
  mip.plot_pareto([("MIP (predicted)", d["predicted_decode_speedup"], d["objective"])
                   for d in doc["pareto"] if "choices" in d], out.with_name("pareto.png"),
                  xlabel="predicted decode speedup", ylabel=f"sum of replace-1-block {metric}")
  mip.plot_choices(best, problem.layers, out.with_name("choices.png"),
                   title=f"chosen child: {doc['predicted_decode_speedup']:.2f}x predicted decode speedup")
  print(f"mip: {best.status}, objective {best.objective:.4f}, predicted decode speedup "
        f"{doc['predicted_decode_speedup']:.3f}x, solved in {best.solve_s:.2f}s")
  return doc


def _solve_or_none(problem: Problem, speedup: float) -> mip.Solution | None:
  try:
    return problem.solve(speedup)
  except mip.InfeasibleError:
    return None
