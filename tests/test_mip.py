"""The architecture-search MIP against brute-force enumeration, plus its error messages and plots."""

import itertools
import math

import numpy as np
import pytest

from puzzle_jax.search import mip
from puzzle_jax.search.mip import InfeasibleError, LayerOptions, Option

PARENT = ("attn/parent", "ffn/parent")


def _instance(seed: int, n_layers: int = 4, n_opts: int = 3):
  """Unstructured random options; seconds (~1e-5) and bytes (~1e9) side by side, like real costs."""
  rng = np.random.default_rng(seed)

  def opts(sub):
    return tuple(Option(f"{sub}{j}", float(rng.uniform(0, 1)),
                        {"time_s": float(rng.uniform(0, 3e-5)), "bytes": float(rng.uniform(0, 2e9))})
                 for j in range(n_opts))

  layers = tuple(LayerOptions(opts("a"), opts("f")) for _ in range(n_layers))
  fixed = {"time_s": 1e-4, "bytes": 5e8}
  budgets = {c: float(rng.uniform(*_range(layers, fixed, c))) for c in ("time_s", "bytes")}
  return layers, fixed, budgets


def _range(layers, fixed, c):
  """(least, largest) achievable total of cost c."""
  per = [[o.costs.get(c, 0.0) for o in getattr(lo, s)] for lo in layers for s in mip.SUBBLOCKS]
  return fixed.get(c, 0.0) + sum(map(min, per)), fixed.get(c, 0.0) + sum(map(max, per))


def _assert_feasible(sol, budgets, rtol=1e-7):
  for c, b in budgets.items():
    assert sol.totals[c] <= b * (1 + rtol), (c, sol.totals[c], b)


def _all_feasible(layers, budgets, fixed):
  """Every feasible (choices, objective) pair, by plain itertools enumeration."""
  groups = [getattr(lo, s) for lo in layers for s in mip.SUBBLOCKS]
  out = []
  for combo in itertools.product(*groups):
    tot = {c: fixed.get(c, 0.0) + sum(o.costs.get(c, 0.0) for o in combo) for c in budgets}
    if all(tot[c] <= budgets[c] for c in budgets):
      names = [o.name for o in combo]
      out.append((tuple(zip(names[0::2], names[1::2])), sum(o.score for o in combo)))
  return out


# ------------------------------------------------------------------ optimality
@pytest.mark.parametrize("seed", range(26))  # 24 feasible; seeds 11 and 14 are jointly infeasible.
def test_matches_brute_force(seed):
  layers, fixed, budgets = _instance(seed)
  want = mip.brute_force(layers, budgets, fixed=fixed)
  if want is None:
    with pytest.raises(InfeasibleError, match="not all together"):
      mip.solve(layers, budgets, fixed=fixed)
    return
  got = mip.solve(layers, budgets, fixed=fixed)
  assert got.objective == pytest.approx(want.objective, abs=1e-6)
  assert got.status == "optimal" and got.gap == 0.0
  _assert_feasible(got, budgets)
  objective, totals = mip.evaluate(layers, got.choices, fixed=fixed)  # totals are the real sums.
  assert objective == pytest.approx(got.objective) and totals == pytest.approx(dict(got.totals))


@pytest.mark.parametrize("seed", range(4))
def test_structured_three_constraints_and_scipy(seed):
  layers = mip.random_layers(seed, 4, 3, 3)
  fixed = {"decode_s": 1e-4, "memory_bytes": 2e8, "params": 5e7}
  rng = np.random.default_rng(100 + seed)
  budgets = {c: float(rng.uniform(*_range(layers, fixed, c))) for c in ("decode_s", "memory_bytes", "params")}
  want = mip.brute_force(layers, budgets, fixed=fixed)
  for solver in ("HIGHS", "SCIPY"):
    if want is None:
      with pytest.raises(InfeasibleError):
        mip.solve(layers, budgets, fixed=fixed, solver=solver)
      continue
    got = mip.solve(layers, budgets, fixed=fixed, solver=solver)
    assert got.objective == pytest.approx(want.objective, abs=1e-6) and got.status == "optimal"
    _assert_feasible(got, budgets)


def test_budget_exactly_at_parent_total_keeps_parent():
  layers = mip.random_layers(7, 6, 4, 4)
  fixed = {"decode_s": 1e-4}
  _, parent = mip.evaluate(layers, [PARENT] * 6, fixed=fixed)
  sol = mip.solve(layers, {"decode_s": mip.speedup_budget(parent["decode_s"], 1.0)}, fixed=fixed)
  assert sol.objective == 0.0 and sol.totals["decode_s"] == pytest.approx(parent["decode_s"])


def test_fixed_costs_are_added_and_unconstrained_costs_reported():
  layers, fixed, budgets = _instance(3)
  sol = mip.solve(layers, {"time_s": budgets["time_s"]}, fixed=fixed)
  _, totals = mip.evaluate(layers, sol.choices)
  assert sol.totals["bytes"] == pytest.approx(totals["bytes"] + fixed["bytes"])
  assert sol.totals["time_s"] == pytest.approx(totals["time_s"] + fixed["time_s"])


@pytest.mark.parametrize("seed", range(4))
def test_forced_and_forbidden_match_brute_force(seed):
  layers, fixed, budgets = _instance(50 + seed)
  budgets = {c: _range(layers, fixed, c)[1] * 0.9 for c in budgets}  # loose, so restrictions bite.
  forced = {(0, "attn"): "a2", (3, "ffn"): "f0"}
  forbidden = {(1, "attn"): ["a0", "a1"], (2, "ffn"): "f1"}
  want = mip.brute_force(layers, budgets, fixed=fixed, forced=forced, forbidden=forbidden)
  got = mip.solve(layers, budgets, fixed=fixed, forced=forced, forbidden=forbidden)
  assert want is not None and got.objective == pytest.approx(want.objective, abs=1e-6)
  assert got.choices[0][0] == "a2" and got.choices[3][1] == "f0"
  assert got.choices[1][0] == "a2" and got.choices[2][1] != "f1"


def test_time_limit_and_gap_are_passed_through():
  layers = mip.random_layers(0, 80, 8, 8)
  fixed = {"decode_s": 1e-4, "memory_bytes": 2e8, "params": 5e7}
  _, parent = mip.evaluate(layers, [PARENT] * 80, fixed=fixed)
  budgets = {"decode_s": parent["decode_s"] / 2, "memory_bytes": 0.6 * parent["memory_bytes"]}
  exact = mip.solve(layers, budgets, fixed=fixed)
  loose = mip.solve(layers, budgets, fixed=fixed, time_limit_s=30, mip_gap=0.05)
  assert exact.status == "optimal" and exact.gap == 0.0
  assert loose.gap is not None and loose.gap <= 0.05 + 1e-9
  assert exact.objective <= loose.objective <= exact.objective * 1.05 + 1e-12


@pytest.mark.filterwarnings("ignore:Solution may be inaccurate")
def test_time_limit_stops_early_or_says_so():
  layers = mip.random_layers(0, 200, 12, 12)
  fixed = {"decode_s": 1e-4, "memory_bytes": 2e8, "params": 5e7}
  _, parent = mip.evaluate(layers, [PARENT] * 200, fixed=fixed)
  budgets = {c: 0.6 * v for c, v in parent.items()}
  try:
    sol = mip.solve(layers, budgets, fixed=fixed, time_limit_s=0.01)
  except RuntimeError as e:  # stopped before any architecture within budget.
    assert "time_limit_s" in str(e)
  else:
    assert sol.status != "optimal" or sol.gap == 0.0
    _assert_feasible(sol, budgets)


# ------------------------------------------------------------------ infeasibility
def test_individually_infeasible_lists_least_achievable():
  layers, fixed, _ = _instance(1)
  least_t, _ = _range(layers, fixed, "time_s")
  least_b, max_b = _range(layers, fixed, "bytes")
  budgets = {"time_s": 0.5 * least_t, "bytes": max_b}
  with pytest.raises(InfeasibleError) as err:
    mip.solve(layers, budgets, fixed=fixed)
  msg = str(err.value)
  assert f"{least_t:.6g}" in msg and f"{least_b:.6g}" in msg
  assert "impossible on their own: ['time_s']" in msg and "raise the budget" in msg
  assert mip.brute_force(layers, budgets, fixed=fixed) is None


def test_forced_choice_counts_in_least_achievable():
  a = (Option("big", 0.0, {"t": 10.0}), Option("small", 1.0, {"t": 1.0}))
  f = (Option("f", 0.0, {"t": 0.0}),)
  layers = (LayerOptions(a, f),) * 2
  mip.solve(layers, {"t": 2.0})  # both small: feasible.
  with pytest.raises(InfeasibleError, match="least achievable 11"):
    mip.solve(layers, {"t": 2.0}, forced={(0, "attn"): "big"})


def test_joint_infeasibility_is_detected():
  a = (Option("fast", 1.0, {"t": 0.0, "m": 1.0}), Option("small", 1.0, {"t": 1.0, "m": 0.0}))
  f = (Option("f", 0.0, {}),)
  layers = (LayerOptions(a, f),)
  with pytest.raises(InfeasibleError) as err:
    mip.solve(layers, {"t": 0.5, "m": 0.5})
  assert "not all together" in str(err.value) and "IMPOSSIBLE" not in str(err.value)


# ------------------------------------------------------------------ diversity
@pytest.mark.parametrize("min_hamming", [1, 2, 3])
def test_diverse_solutions_are_sequentially_optimal(min_hamming):
  layers, fixed, budgets = _instance(11, n_layers=3)
  sols = mip.diverse_solutions(layers, budgets, 5, min_hamming=min_hamming, fixed=fixed)
  feasible = _all_feasible(layers, budgets, fixed)
  assert len(sols) == min(5, len(feasible)) or min_hamming > 1
  assert sols[0].objective == pytest.approx(mip.brute_force(layers, budgets, fixed=fixed).objective)
  for i, s in enumerate(sols):
    # Each is the best feasible choice at least min_hamming away from all earlier ones.
    rest = [obj for ch, obj in feasible if all(mip.hamming(ch, t) >= min_hamming for t in sols[:i])]
    assert s.objective == pytest.approx(min(rest), abs=1e-6)
    assert all(mip.hamming(s, t) >= min_hamming for t in sols[:i])
  assert all(a.objective <= b.objective + 1e-9 for a, b in zip(sols, sols[1:]))


def test_diverse_solutions_stop_when_exhausted():
  a = (Option("x", 0.0, {"t": 1.0}), Option("y", 1.0, {"t": 2.0}))
  layers = (LayerOptions(a, (Option("f", 0.0, {}),)),)
  sols = mip.diverse_solutions(layers, {"t": 5.0}, 10)
  assert [s.choices[0][0] for s in sols] == ["x", "y"]


# ------------------------------------------------------------------ Pareto and plots
def test_pareto_front_is_monotone_and_plots(tmp_path):
  layers = mip.random_layers(3, 12, 4, 4)
  fixed = {"decode_s": 1e-4, "memory_bytes": 2e8}
  _, parent = mip.evaluate(layers, [PARENT] * 12, fixed=fixed)
  speedups = [20.0, 4.0, 3.0, 2.0, 1.5, 1.2, 1.0]  # 20x is below the fixed cost.
  budgets = [mip.speedup_budget(parent["decode_s"], s) for s in speedups]  # loosening.
  front = mip.pareto_front(layers, "decode_s", budgets, {"memory_bytes": 0.9 * parent["memory_bytes"]},
                           fixed=fixed)
  assert front[0] is None and all(s is not None for s in front[1:])
  objs = [s.objective for s in front[1:]]
  assert all(b <= a + 1e-9 for a, b in zip(objs, objs[1:]))
  points = mip.pareto_points("mip", front, lambda s: parent["decode_s"] / s.totals["decode_s"])
  png = mip.plot_pareto(points, tmp_path / "pareto.png", baselines=[("parent", 1.0, 0.0)], xlabel="speedup")
  png2 = mip.plot_choices(front[3], layers, tmp_path / "choices.png")
  png3 = mip.plot_choices(front[3].choices, None, tmp_path / "choices_bare.png")
  for p in (png, png2, png3):
    data = open(p, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_helpers():
  assert mip.speedup_budget(2.0, 4.0) == 0.5
  with pytest.raises(ValueError):
    mip.speedup_budget(1.0, 0.0)
  assert mip.hamming([("a", "b"), ("c", "d")], [("a", "x"), ("y", "d")]) == 2


# ------------------------------------------------------------------ bad inputs
def _layers(**over):
  a = (Option("a0", 0.0, {"t": 1.0}), Option("a1", 0.5, {"t": 0.5}))
  f = (Option("f0", 0.0, {"t": 1.0}),)
  lo = LayerOptions(over.get("attn", a), over.get("ffn", f))
  return (lo, LayerOptions(a, f))


@pytest.mark.parametrize("layers, kw, match", [
    ((), {}, "layers is empty"),
    (_layers(attn=()), {}, "layer 0 has no attn candidates"),
    (_layers(ffn=(Option("f0", math.nan, {}),)), {}, "'f0' score is nan"),
    (_layers(ffn=(Option("f0", 0.0, {"t": math.inf}),)), {}, "cost 't' is inf"),
    (_layers(attn=(Option("a", 0.0, {}), Option("a", 1.0, {}))), {}, "duplicate candidate names"),
    (_layers(), {"budgets": {"t": -1.0}}, "budget 't' is -1.0"),
    (_layers(), {"budgets": {"t": math.nan}}, "budget 't' is nan"),
    (_layers(), {"budgets": {"tt": 1.0}}, r"budgets \['tt'\] name costs"),
    (_layers(), {"forced": {(0, "attn"): "zz"}}, "'zz' is not a candidate of layer 0 attn"),
    (_layers(), {"forced": {(5, "attn"): "a0"}}, "forced key"),
    (_layers(), {"forbidden": {(1, "ffn"): "f0"}}, "no candidate"),
    (_layers(), {"min_hamming": 0}, "min_hamming"),
    (_layers(), {"fixed": {"t": math.nan}}, r"fixed\['t'\] is nan"),
])
def test_bad_inputs_raise_value_error(layers, kw, match):
  kw = {"budgets": {"t": 10.0}} | kw
  with pytest.raises(ValueError, match=match) as err:
    mip.solve(layers, kw.pop("budgets"), **kw)
  assert not isinstance(err.value, InfeasibleError)
