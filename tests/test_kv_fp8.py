"""FP8 KV cache: calibrated scales beat unit scales on real text through SmolLM2; KV bytes halve;
cached decoding with an fp8 cache equals the fake-quantized full forward."""

import jax
import jax.numpy as jnp
import numpy as np

from puzzle_jax.core import model
from puzzle_jax.search import kv_fp8


def _kl(ref_logits, logits):
  p = jax.nn.log_softmax(ref_logits, -1)
  q = jax.nn.log_softmax(logits, -1)
  return float(jnp.mean(jnp.sum(jnp.exp(p) * (p - q), -1)))


def test_calibrated_scales_beat_unit_scales(smollm2_small, real_tokens):
  arch, params = smollm2_small
  calib, held = real_tokens[:4, :64], real_tokens[8:12, :64]
  ref = model.forward(arch, params, held)
  c_arch, c_params = kv_fp8.calibrate(arch, params, [calib])
  u_arch, u_params = kv_fp8.to_fp8(arch, params, None)
  kl_cal, kl_unit = _kl(ref, model.forward(c_arch, c_params, held)), _kl(ref, model.forward(u_arch, u_params, held))
  print(f"KL vs parent: calibrated {kl_cal:.2e}, unit scales {kl_unit:.2e}")
  assert 0 < kl_cal < kl_unit
  assert c_arch.kv_bytes_per_token("bfloat16") * 2 == arch.kv_bytes_per_token("bfloat16")
  assert c_arch.kv_cache_bytes(8, 1024) * 2 == arch.kv_cache_bytes(8, 1024)
  k_scale = c_params["model"]["layers"][0]["self_attn"]["k_scale"]
  assert k_scale.shape == () and float(k_scale) > 0


def test_fp8_cache_decode_equals_forward(smollm2_small, real_tokens):
  arch, params = smollm2_small
  f_arch, f_params = kv_fp8.calibrate(arch, params, [real_tokens[:2, :32]])
  tokens = jnp.asarray(real_tokens[2:4, :12])
  full = model.forward(f_arch, f_params, tokens)
  cache = model.init_cache(f_arch, 2, 12, jnp.float32)
  assert cache["layers"][0]["k"].dtype == jnp.float8_e4m3fn
  extend = jax.jit(model.extend, static_argnums=0)
  _, cache = extend(f_arch, f_params, tokens[:, :8], cache)
  step, _ = extend(f_arch, f_params, tokens[:, 8:], cache)
  np.testing.assert_allclose(np.asarray(step), np.asarray(full[:, 8:]), atol=2e-4, rtol=1e-4)
