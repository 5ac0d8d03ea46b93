"""Window-attention and FP8-KV candidates: costs grow with context for full attention only, so the
cheaper choice depends on the serving scenario; FP8 halves KV bytes (analytic cost model)."""

import pytest

from puzzle_jax.core.arch import AttnSpec, variant_key
from puzzle_jax.search import costs
from tests.gpt_oss_fixtures import CFG


def _arch():
  from puzzle_jax.core import hf_gpt_oss
  return hf_gpt_oss.arch_from_gpt_oss({**CFG, "num_hidden_layers": 2})


@pytest.mark.parametrize("kv_dtype", [None, "fp8"])
def test_window_costs_depend_on_context(kv_dtype):
  arch = _arch()
  full = AttnSpec("gqa", num_kv_heads=2, bias=True, sinks=True, kv_dtype=kv_dtype)
  win = AttnSpec("gqa", num_kv_heads=2, bias=True, sinks=True, window=128, kv_dtype=kv_dtype)
  keys = [variant_key(full), variant_key(win)]
  ratio = {}
  for ctx in (128, 32768):
    t = costs.analytic_table(arch, keys, costs.Scenario(batch=8, prompt_len=ctx, gen_len=64),
                             peak_flops=1e15, bandwidth=4e12)["variants"]
    f, w = t[keys[0]], t[keys[1]]
    ratio[ctx] = (f["decode_s"] / w["decode_s"], f["kv_bytes"] / w["kv_bytes"])
    assert w["kv_bytes"] == 8 * 128 * 2 * 2 * 16 * (1 if kv_dtype else 2)  # capped at the window
  assert ratio[128][1] == pytest.approx((128 + 64) / 128)  # short context: the window barely saves
  assert ratio[32768][0] > 10 * ratio[128][0] and ratio[32768][1] > 200


def test_fp8_kv_halves_bytes():
  arch = _arch()
  bf16 = AttnSpec("gqa", num_kv_heads=2, bias=True, sinks=True)
  fp8 = AttnSpec("gqa", num_kv_heads=2, bias=True, sinks=True, kv_dtype="fp8")
  t = costs.analytic_table(arch, [variant_key(bf16), variant_key(fp8)], costs.Scenario(batch=4, prompt_len=4096),
                           peak_flops=1e15, bandwidth=4e12)["variants"]
  assert t[variant_key(bf16)]["kv_bytes"] == 2 * t[variant_key(fp8)]["kv_bytes"]
  assert t[variant_key(fp8)]["decode_s"] < t[variant_key(bf16)]["decode_s"]
