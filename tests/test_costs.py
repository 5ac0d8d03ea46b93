"""Cost tables: exact memory accounting, structure of measured tables, analytic monotonicity,
JSON round trip and the loader's fix-it errors. No "A is faster than B" on measured CPU times."""

import json
import math
import pathlib

import jax
import pytest

from puzzle_jax.search import costs
from puzzle_jax.core import model
from puzzle_jax.core.arch import ArchError, AttnSpec, FFNSpec, spec_from_key, uniform_arch

# head_dim 24 != hidden / heads = 16, so any D/N slip shows in the KV bytes.
ARCH = uniform_arch(vocab_size=256, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2,
                    intermediate_size=128, head_dim=24)
SC = costs.Scenario(batch=2, prompt_len=16, gen_len=8, repeats=2, warmup=1, min_call_s=0.0, flush_bytes=0)
KEYS = ["attn/gqa_kv2", "attn/linear", "attn/noop", "ffn/swiglu_128", "ffn/linear", "ffn/noop"]  # timed.
MORE = ["attn/gqa_kv1", "attn/gqa_kv4", "ffn/swiglu_64"]  # analytic only (each timed variant compiles).
ROOF = dict(peak_flops=1e12, bandwidth=1e11)


@pytest.fixture(scope="module")
def table():
  return costs.cost_table(ARCH, KEYS + KEYS[:2], SC, progress=False)  # duplicates measured once.


def _child():
  return ARCH.replace_block(1, attn=AttnSpec("noop"), ffn=FFNSpec("linear")).replace_block(
      2, attn=AttnSpec("linear"), ffn=FFNSpec("noop"))


def test_table_structure(table):
  assert table["format"] == costs.FORMAT and table["backend"] == jax.default_backend()
  assert list(table["variants"]) == KEYS
  assert table["model"] == {"hidden_size": 64, "num_heads": 4, "head_dim": 24, "vocab_size": 256}
  assert table["scenario"]["decode_context"] == 16 + 4
  costs.validate_cost_table(table, ARCH, KEYS, scenario=SC)
  for k, v in table["variants"].items():
    times = [v[f] for f in ("prefill_s", "decode_s", "prefill_s_min", "decode_s_min")]
    if k.endswith("noop"):
      assert times == [0.0] * 4 and v["weight_bytes"] == v["kv_bytes"] == v["params"] == 0
    else:
      assert all(math.isfinite(t) and t > 0 for t in times), (k, times)
      assert v["prefill_reps"] >= 1 and v["decode_reps"] >= 1
  assert table["fixed"]["prefill_s"] > 0 and table["fixed"]["decode_s"] > 0


def test_kv_bytes_from_head_dim(table):
  assert ARCH.head_dim != ARCH.hidden_size // ARCH.num_heads
  analytic = costs.analytic_table(ARCH, KEYS + MORE, SC, **ROOF)["variants"]
  for k in ("attn/gqa_kv2", "attn/gqa_kv1", "attn/gqa_kv4"):
    kv = spec_from_key(k).num_kv_heads
    want = 2 * kv * 24 * 2 * SC.batch * (SC.prompt_len + SC.gen_len)
    assert analytic[k]["kv_bytes"] == want
    assert table["variants"].get(k, analytic[k])["kv_bytes"] == want
  assert all(table["variants"][k]["kv_bytes"] == 0 for k in KEYS if not k.startswith("attn/gqa"))


def test_window_kv_bytes_count_the_window():
  t = costs.analytic_table(ARCH, ["attn/gqa_kv2_w4", "attn/gqa_kv2_w100"], SC, **ROOF)["variants"]
  assert t["attn/gqa_kv2_w4"]["kv_bytes"] == 2 * 2 * 24 * 2 * SC.batch * 4
  assert t["attn/gqa_kv2_w100"]["kv_bytes"] == 2 * 2 * 24 * 2 * SC.batch * SC.max_context


def test_weight_bytes_match_accounting_and_params(table):
  for k in KEYS:
    spec, v = spec_from_key(k), table["variants"][k]
    is_attn = isinstance(spec, AttnSpec)
    want = ARCH.attn_params(spec) if is_attn else ARCH.ffn_params(spec)
    init = model.attn_init if is_attn else model.ffn_init
    shapes = jax.eval_shape(lambda k: init(k, spec, ARCH), jax.random.PRNGKey(0))
    assert v["params"] == want == model.count_params(shapes)
    assert v["weight_bytes"] == 2 * want
  assert table["fixed"]["params"] == ARCH.fixed_params()
  assert table["fixed"]["weight_bytes"] == 2 * ARCH.fixed_params()


def test_analytic_monotone():
  t = costs.analytic_table(ARCH, KEYS + MORE, SC, **ROOF)
  v = t["variants"]
  costs.validate_cost_table(t, ARCH, KEYS + MORE)
  for f in ("kv_bytes", "weight_bytes", "prefill_flops", "decode_flops", "decode_io_bytes", "decode_s"):
    assert v["attn/gqa_kv1"][f] < v["attn/gqa_kv2"][f], f
  for f in ("weight_bytes", "prefill_flops", "decode_flops", "prefill_s", "decode_s"):
    assert v["ffn/swiglu_64"][f] < v["ffn/swiglu_128"][f], f
  assert v["ffn/linear"]["decode_s"] < v["ffn/swiglu_64"]["decode_s"]
  assert all(v[k][f] == 0 for k in ("attn/noop", "ffn/noop") for f in ("prefill_s", "decode_s", "decode_flops"))


def test_analytic_flops_match_arch_accounting():
  t = costs.analytic_table(ARCH, costs.arch_keys(ARCH), SC, **ROOF)
  per_layer = sum(t["variants"][k]["decode_flops"] for k in costs.arch_keys(ARCH))
  total = t["fixed"]["decode_flops"] + ARCH.num_layers * per_layer
  assert total == SC.batch * ARCH.flops_per_token(SC.decode_context, "decode")


def test_save_load_round_trip(table, tmp_path):
  path = tmp_path / "sub" / "costs.json"
  costs.save_cost_table(table, path)
  assert costs.load_cost_table(path, ARCH, KEYS, scenario=SC) == json.loads(json.dumps(table))
  assert not list(path.parent.glob("*.tmp"))


@pytest.mark.parametrize("edit, kwargs, match", [
    (lambda t: t.update(format="other/v1"), {}, "not a puzzle_jax cost table"),
    (lambda t: t.update(format="puzzle_jax.costs/v0"), {}, "not supported.*re-run the costs stage"),
    (lambda t: t["variants"]["ffn/linear"].pop("decode_s"), {}, "lacks field"),
    (lambda t: t["variants"]["ffn/linear"].update(decode_s=-1.0), {}, "not finite non-negative"),
    (lambda t: None, dict(arch=uniform_arch(vocab_size=256, hidden_size=128, num_layers=1, num_heads=4,
                                            num_kv_heads=2, intermediate_size=128, head_dim=24)),
     "measured for another model.*hidden_size: table 64 vs model 128"),
    (lambda t: None, dict(keys=["ffn/swiglu_128", "attn/gqa_kv4", "ffn/swiglu_32"]),
     r"lacks 2 needed variant\(s\): \['attn/gqa_kv4', 'ffn/swiglu_32'\].*re-run the costs stage"),
    (lambda t: None, dict(scenario=costs.Scenario(batch=4)), "another scenario.*batch: table 2 vs wanted 4"),
])
def test_load_rejects(table, tmp_path, edit, kwargs, match):
  t = json.loads(json.dumps(table))
  edit(t)
  path = tmp_path / "costs.json"
  path.write_text(json.dumps(t))
  with pytest.raises(costs.CostTableError, match=match):
    costs.load_cost_table(path, **kwargs)


def test_load_rejects_bad_json(tmp_path):
  (tmp_path / "c.json").write_text("{")
  with pytest.raises(costs.CostTableError, match="not valid JSON"):
    costs.load_cost_table(tmp_path / "c.json")


def test_predicted_totals(table):
  fixed, v = table["fixed"], table["variants"]
  p = costs.predicted_totals(ARCH, table)
  for f in ("prefill_s", "decode_s", "weight_bytes", "params"):
    assert p[f] == pytest.approx(fixed[f] + 3 * (v["attn/gqa_kv2"][f] + v["ffn/swiglu_128"][f]))
  assert p["weight_bytes"] == ARCH.weight_bytes("bfloat16")
  assert p["params"] == ARCH.num_params()
  child = _child()
  pc = costs.predicted_totals(child, table)
  assert pc["kv_bytes"] == child.kv_cache_bytes(SC.batch, SC.max_context, "bfloat16") < p["kv_bytes"]
  assert pc["params"] == child.num_params()
  assert pc["decode_s"] == pytest.approx(fixed["decode_s"] + sum(
      v[k]["decode_s"] for k in ("attn/gqa_kv2", "ffn/swiglu_128", "attn/noop", "ffn/linear",
                                 "attn/linear", "ffn/noop")))


def test_predicted_totals_missing_key(table):
  arch = ARCH.replace_block(0, ffn=FFNSpec("swiglu", 96))
  with pytest.raises(costs.CostTableError, match="ffn/swiglu_96"):
    costs.predicted_totals(arch, table)


def test_bad_keys_fail_before_timing():
  with pytest.raises(ArchError, match="not canonical"):
    costs.cost_table(ARCH, ["attn/gqa_kv02"], SC, progress=False)
  with pytest.raises(ArchError, match="bad variant key"):
    costs.analytic_table(ARCH, ["mlp/relu"], SC, **ROOF)


def test_measure_model():
  child = _child()
  r = costs.measure_model(child, None, SC)
  assert all(math.isfinite(r[f]) and r[f] > 0 for f in ("prefill_s", "decode_s"))
  assert r["weight_bytes"] == child.weight_bytes("bfloat16")


def test_calibrated_loop_with_copies():
  """The calibration path: >= min_call_s per call, several weight copies cycled in the loop."""
  sc = costs.Scenario(batch=2, prompt_len=8, gen_len=4, repeats=2, warmup=1, min_call_s=2e-3,
                      flush_bytes=1 << 20, max_copies=3)
  r = costs.measure_variant(ARCH, "ffn/linear", sc)
  assert r["decode_reps"] > 1 and r["decode_reps"] % 3 == 0
  assert math.isfinite(r["decode_s"]) and r["decode_s"] > 0


def test_costs_stage_rejects_unknown_backend(tmp_path):
  import sys
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "configs"))
  import smollm2_135m
  c = smollm2_135m.get_config("tiny")
  c.workdir, c.costs.backend = str(tmp_path), "roofline"
  from puzzle_jax import stages
  with pytest.raises(ValueError, match="'measure' or 'analytic'"):
    stages.validate_or_raise(c)
