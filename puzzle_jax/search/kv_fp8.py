"""FP8 KV cache with calibrated scales (gpt-oss-puzzle).

K and V are stored as float8_e4m3fn of `x / scale`; attention multiplies back (`model.fp8_quantize`,
`model.fp8_dequantize`, selected by `AttnSpec.kv_dtype="fp8"`). The scale is what vLLM reads as
`self_attn.k_scale` / `v_scale`: real value = stored value * scale. A good scale maps the largest
value seen on calibration text (times a margin, for outliers calibration missed) to e4m3's largest
finite value, 448, so the cache uses the whole range instead of wasting its precision near 0 or
saturating; with unit scales small V entries land in e4m3's subnormals.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from puzzle_jax.core import model
from puzzle_jax.core.arch import Arch, AttnSpec

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class FP8Settings:
  margin: float = 1.25  # amax * margin maps to 448: headroom for values calibration did not see.
  per_head: bool = False  # one scale per KV head ([K]) instead of one per layer (what vLLM reads).


def kv_amax(arch: Arch, params: Params, batches: Iterable[np.ndarray], per_head: bool = False) -> dict[int, dict]:
  """{layer: {"k": amax, "v": amax}} of the post-RoPE keys and the values over calibration batches."""
  found: dict[int, dict[str, np.ndarray]] = {}
  for tokens in batches:
    for i, kv in _layer_kv(arch, params, jnp.asarray(tokens)).items():
      axes = (0, 1, 3) if per_head else None
      for name, x in kv.items():
        a = np.asarray(jnp.max(jnp.abs(x), axis=axes))
        found.setdefault(i, {})[name] = np.maximum(found.get(i, {}).get(name, 0), a)
  return found


@functools.partial(jax.jit, static_argnums=0)
def _layer_kv(arch: Arch, params: Params, tokens_BxL: jax.Array) -> dict[int, dict[str, jax.Array]]:
  """Every cached layer's K (after RoPE, what the cache holds) and V, from one parent pass."""
  ctx = model.forward_ctx(arch, tokens_BxL)
  out: dict[int, dict[str, jax.Array]] = {}

  def hook(i, h_in, *_):
    spec = arch.blocks[i].attn
    if not spec.has_cache:
      return
    p = params["model"]["layers"][i]
    x = model.rms_norm(p["input_layernorm"], h_in, arch.rms_eps)
    B, L, _ = x.shape
    a = p["self_attn"]
    k = model.linear(a["k_proj"], x).reshape(B, L, spec.num_kv_heads, arch.head_dim)
    out[i] = {"k": model.apply_rope(k, ctx.cos, ctx.sin),
              "v": model.linear(a["v_proj"], x).reshape(B, L, spec.num_kv_heads, arch.head_dim)}
  model.run_blocks(arch, params, model.embed(params, tokens_BxL), ctx, hook=hook)
  return out


def scales_from_amax(amax: dict[int, dict], margin: float) -> dict[int, dict[str, np.ndarray]]:
  return {i: {n: np.maximum(a * margin / model.FP8_MAX, 1e-12).astype(np.float32) for n, a in kv.items()}
          for i, kv in amax.items()}


def to_fp8(arch: Arch, params: Params, scales: dict[int, dict[str, Any]] | None,
           layers: Iterable[int] | None = None) -> tuple[Arch, Params]:
  """The same model with an FP8 KV cache on `layers` (default: every cached layer). `scales` None =
  unit scales (the uncalibrated baseline)."""
  layers = [i for i, b in enumerate(arch.blocks) if b.attn.has_cache] if layers is None else list(layers)
  new_layers = list(params["model"]["layers"])
  for i in layers:
    arch = arch.replace_block(i, attn=dataclasses.replace(arch.blocks[i].attn, kv_dtype="fp8"))
    s = scales[i] if scales is not None else {"k": np.float32(1), "v": np.float32(1)}
    attn = {**new_layers[i]["self_attn"], "k_scale": jnp.asarray(s["k"]), "v_scale": jnp.asarray(s["v"])}
    new_layers[i] = {**new_layers[i], "self_attn": attn}
  return arch, {**params, "model": {**params["model"], "layers": new_layers}}


def calibrate(arch: Arch, params: Params, batches: Iterable[np.ndarray],
              settings: FP8Settings = FP8Settings()) -> tuple[Arch, Params]:
  """Parent -> the same model with a calibrated FP8 KV cache on every attention layer."""
  amax = kv_amax(arch, params, batches, settings.per_head)
  return to_fp8(arch, params, scales_from_amax(amax, settings.margin))


def fp8_spec(spec: AttnSpec) -> AttnSpec:
  """The FP8-KV variant of an attention spec (a search candidate: same weights, half the KV bytes)."""
  return dataclasses.replace(spec, kv_dtype="fp8")
