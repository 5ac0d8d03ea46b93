"""Pure-functional heterogeneous decoder: sub-block `init`/`apply`, forward, KV cache, generate.

Params are nested dicts that mirror Hugging Face tensor names ("model.layers.3.mlp.up_proj.weight"
is `params["model"]["layers"][3]["mlp"]["up_proj"]["weight"]`), with torch's [out, in] weight
layout, so import/export is a rename. Each sub-block is a pure function of (params, x, spec) and
works under `jax.vmap` over stacked params of one spec (what BLD relies on).

Axis legend: B batch, L queries, S keys/cache slots, D hidden, N query heads, K kv heads,
G = N/K query heads per kv head, H head dim, F FFN width, V vocab.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from puzzle_jax.core.arch import (Arch, AttnSpec, ArchError, FFNSpec, RopeSpec, fuse_ffn_run, fusable_groups,
                                  parallel_runs)
from puzzle_jax.moe import layer as moe_layer

Params = dict[str, Any]
Cache = dict[str, Any]
NEG_INF = -1e30  # finite, so fully-masked (padding) rows give uniform weights, not NaN.

ATTN_KEYS = ("input_layernorm", "self_attn")
FFN_KEYS = ("post_attention_layernorm", "mlp")


# ----------------------------------------------------------------------------- primitives
def linear(p: Params, x: jax.Array) -> jax.Array:
  """torch.nn.Linear semantics: weight is [out, in]."""
  y = jnp.einsum("...i,oi->...o", x, p["weight"].astype(x.dtype))
  if "bias" not in p:
    return y
  return y + p["bias"].astype(x.dtype).reshape((1,) * (y.ndim - 1) + (-1,))


def rms_norm(p: Params, x_BxLxD: jax.Array, eps: float) -> jax.Array:
  """Llama RMSNorm: normalize in float32, cast back, then scale (HF's order of operations)."""
  x32 = x_BxLxD.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  w = p["weight"].astype(x_BxLxD.dtype)
  return w.reshape((1,) * (x_BxLxD.ndim - 1) + w.shape) * y.astype(x_BxLxD.dtype)


@functools.lru_cache(maxsize=None)
def rope_inv_freq(rope: RopeSpec, head_dim: int) -> np.ndarray:
  """Inverse frequencies [H/2] in float32, with Llama-3 scaling when configured."""
  inv = 1.0 / (rope.theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim))
  inv = inv.astype(np.float32)
  if rope.rope_type == "llama3":
    low_wl = rope.original_max_position / rope.low_freq_factor
    high_wl = rope.original_max_position / rope.high_freq_factor
    wavelen = 2 * np.pi / inv
    scaled = np.where(wavelen > low_wl, inv / rope.factor, inv)
    smooth = (rope.original_max_position / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
    inv = np.where(medium, smoothed, scaled).astype(np.float32)
  if rope.rope_type == "yarn":
    inv = _yarn_inv_freq(rope, head_dim)
  return inv


def _yarn_inv_freq(rope: RopeSpec, head_dim: int) -> np.ndarray:
  """YaRN (transformers' `_compute_yarn_parameters`): interpolate low frequencies by `factor`,
  keep high ones, with a linear ramp between the beta_fast / beta_slow rotation counts."""
  pos = rope.theta ** (np.arange(0, head_dim, 2).astype(np.float32) / head_dim)

  def corr_dim(rot):
    return head_dim * np.log(rope.original_max_position / (rot * 2 * np.pi)) / (2 * np.log(rope.theta))
  low, high = corr_dim(rope.beta_fast), corr_dim(rope.beta_slow)
  if rope.truncate:
    low, high = np.floor(low), np.ceil(high)
  low, high = max(low, 0), min(high, head_dim - 1)
  high = high + 0.001 if low == high else high
  ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
  extrapolate = 1 - ramp
  return (1 / (rope.factor * pos) * ramp + 1 / pos * extrapolate).astype(np.float32)


def rope_attention_scaling(rope: RopeSpec) -> float:
  """YaRN multiplies cos/sin by 0.1 ln(factor) + 1 (sharper attention at long range)."""
  return 0.1 * float(np.log(rope.factor)) + 1.0 if rope.rope_type == "yarn" and rope.factor > 1 else 1.0


def rope_cos_sin(arch: Arch, positions_BxL: jax.Array) -> tuple[jax.Array, jax.Array]:
  inv_freq = jnp.asarray(rope_inv_freq(arch.rope, arch.head_dim))
  freqs_BxLxH2 = positions_BxL.astype(jnp.float32)[..., None] * inv_freq[None, None, :]
  emb_BxLxH = jnp.concatenate([freqs_BxLxH2, freqs_BxLxH2], axis=-1)
  scale = rope_attention_scaling(arch.rope)
  return jnp.cos(emb_BxLxH) * scale, jnp.sin(emb_BxLxH) * scale


def apply_rope(x_BxLxNxH: jax.Array, cos_BxLxH: jax.Array, sin_BxLxH: jax.Array) -> jax.Array:
  """HF's non-interleaved rotate-half RoPE."""
  half = x_BxLxNxH.shape[-1] // 2
  rot = jnp.concatenate([-x_BxLxNxH[..., half:], x_BxLxNxH[..., :half]], axis=-1)
  cos, sin = cos_BxLxH[:, :, None].astype(x_BxLxNxH.dtype), sin_BxLxH[:, :, None].astype(x_BxLxNxH.dtype)
  return x_BxLxNxH * cos + rot * sin


# ----------------------------------------------------------------------------- context
class Ctx:
  """Per-call values every attention layer shares: RoPE tables, masks, cache write slot."""

  def __init__(self, arch: Arch, positions_BxL, key_valid_BxS, q_slots_L, write_index):
    self.cos, self.sin = rope_cos_sin(arch, positions_BxL)
    self.key_valid_BxS = key_valid_BxS
    self.q_slots_L = q_slots_L
    self.write_index = write_index
    self._masks: dict[int | None, jax.Array] = {}

  def mask(self, window: int | None) -> jax.Array:
    """[B, L, S] boolean: causal by slot, valid keys only, within the window if any."""
    if window not in self._masks:
      k_slots_S = jnp.arange(self.key_valid_BxS.shape[1])
      rel_LxS = self.q_slots_L[:, None] - k_slots_S[None, :]
      ok_LxS = rel_LxS >= 0
      if window is not None:
        ok_LxS &= rel_LxS < window
      self._masks[window] = ok_LxS[None] & self.key_valid_BxS[:, None, :]
    return self._masks[window]


# ----------------------------------------------------------------------------- sub-blocks
def attn_apply(p: Params, h_BxLxD: jax.Array, spec: AttnSpec, arch: Arch, ctx: Ctx,
               cache_layer: Params | None = None) -> tuple[jax.Array, Params | None]:
  """Attention sub-block output (the residual delta, input norm included)."""
  if spec.kind == "noop":
    return jnp.zeros_like(h_BxLxD), cache_layer
  x = rms_norm(p["input_layernorm"], h_BxLxD, arch.rms_eps)
  if spec.kind == "linear":
    return linear(p["self_attn"]["linear_attn"], x), cache_layer
  if spec.num_sink_tokens:
    raise ArchError("nemotron-nas num_sink_tokens is not implemented; gpt-oss sinks are AttnSpec.sinks")
  a = p["self_attn"]
  B, L, _ = x.shape
  N, K, H = arch.num_heads, spec.num_kv_heads, arch.head_dim
  q = apply_rope(linear(a["q_proj"], x).reshape(B, L, N, H), ctx.cos, ctx.sin)
  k = apply_rope(linear(a["k_proj"], x).reshape(B, L, K, H), ctx.cos, ctx.sin)
  v = linear(a["v_proj"], x).reshape(B, L, K, H)
  if spec.kv_dtype == "fp8":
    k, v = fp8_quantize(k, a["k_scale"]), fp8_quantize(v, a["v_scale"])
  if cache_layer is not None:
    idx = (0, ctx.write_index, 0, 0)
    k = jax.lax.dynamic_update_slice(cache_layer["k"], k.astype(cache_layer["k"].dtype), idx)
    v = jax.lax.dynamic_update_slice(cache_layer["v"], v.astype(cache_layer["v"].dtype), idx)
    cache_layer = {"k": k, "v": v}
  mask = ctx.mask(spec.window)
  if cache_layer is not None and spec.window is not None:
    k, v, mask = _window_slots(k, v, mask, ctx.write_index, spec.window + L - 1)
  if spec.kv_dtype == "fp8":
    k, v = fp8_dequantize(k, a["k_scale"], q.dtype), fp8_dequantize(v, a["v_scale"], q.dtype)
  out = grouped_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask, a["sinks"] if spec.sinks else None)
  return linear(a["o_proj"], out.reshape(B, L, N * H)), cache_layer


def _window_slots(k_BxSxKxH, v_BxSxKxH, mask_BxLxS, write_index, span: int):
  """The `span` cache slots a windowed layer's new queries can see (ending at the newest one), so
  a windowed decode step reads its window, not the whole cache; no-op when the cache is shorter."""
  S, L = k_BxSxKxH.shape[1], mask_BxLxS.shape[1]
  if span >= S:
    return k_BxSxKxH, v_BxSxKxH, mask_BxLxS
  start = jnp.clip(write_index + L - span, 0, S - span)
  cut = lambda x, axis: jax.lax.dynamic_slice_in_dim(x, start, span, axis=axis)
  return cut(k_BxSxKxH, 1), cut(v_BxSxKxH, 1), cut(mask_BxLxS, 2)


FP8_MAX = 448.0  # largest finite float8_e4m3fn


def fp8_quantize(x: jax.Array, scale: jax.Array) -> jax.Array:
  """x / scale saturated to the e4m3 range, stored as float8_e4m3fn (what vLLM's k_scale means).

  `scale` is a scalar (per layer) or [K] (per KV head, broadcast over [..., K, H])."""
  s = jnp.asarray(scale, jnp.float32)
  s = s[:, None] if s.ndim == 1 else s
  return jnp.clip(x.astype(jnp.float32) / s, -FP8_MAX, FP8_MAX).astype(jnp.float8_e4m3fn)


def fp8_dequantize(x_fp8: jax.Array, scale: jax.Array, dtype) -> jax.Array:
  s = jnp.asarray(scale, jnp.float32)
  s = s[:, None] if s.ndim == 1 else s
  return (x_fp8.astype(jnp.float32) * s).astype(dtype)


def grouped_attention(q_BxLxNxH, k_BxSxKxH, v_BxSxKxH, mask_BxLxS, sinks_N=None) -> jax.Array:
  """Softmax attention with GQA; scores and softmax in float32.

  `sinks_N` (gpt-oss): one extra logit per head joins each row's softmax and is dropped after it,
  so a head can put weight on "nothing" instead of renormalizing over the keys it sees."""
  B, L, N, H = q_BxLxNxH.shape
  K = k_BxSxKxH.shape[2]
  q_BxLxKxGxH = q_BxLxNxH.reshape(B, L, K, N // K, H)
  s = jnp.einsum("blkgh,bskh->bkgls", q_BxLxKxGxH, k_BxSxKxH,
                 preferred_element_type=jnp.float32) * (H ** -0.5)
  s = jnp.where(mask_BxLxS[:, None, None], s, NEG_INF)
  if sinks_N is None:
    w = jax.nn.softmax(s, axis=-1).astype(v_BxSxKxH.dtype)
  else:
    sink_BxKxGxLx1 = jnp.broadcast_to(sinks_N.astype(jnp.float32).reshape(1, K, N // K, 1, 1), s.shape[:-1] + (1,))
    w = jax.nn.softmax(jnp.concatenate([s, sink_BxKxGxLx1], axis=-1), axis=-1)[..., :-1].astype(v_BxSxKxH.dtype)
  return jnp.einsum("bkgls,bskh->blkgh", w, v_BxSxKxH).reshape(B, L, N, H)


def ffn_apply(p: Params, h_BxLxD: jax.Array, spec: FFNSpec, arch: Arch) -> jax.Array:
  """FFN sub-block output (the residual delta, post-attention norm included)."""
  if spec.kind == "noop":
    return jnp.zeros_like(h_BxLxD)
  x = rms_norm(p["post_attention_layernorm"], h_BxLxD, arch.rms_eps)
  m = p["mlp"]
  if spec.kind == "linear":
    return linear(m["linear_mlp"], x)
  if spec.kind == "swiglu":
    return linear(m["down_proj"], jax.nn.silu(linear(m["gate_proj"], x)) * linear(m["up_proj"], x))
  return moe_layer.moe_apply(m, x, spec.top_k)


def _dense(key, out_dim: int, in_dim: int, dtype) -> Params:
  return {"weight": (jax.random.normal(key, (out_dim, in_dim), jnp.float32) * in_dim ** -0.5).astype(dtype)}


def _norm(d: int, dtype) -> Params:
  return {"weight": jnp.ones((d,), dtype)}


def attn_init(key: jax.Array, spec: AttnSpec, arch: Arch, dtype=jnp.float32) -> Params:
  D, N, H = arch.hidden_size, arch.num_heads, arch.head_dim
  if spec.kind == "noop":
    return {}
  if spec.kind == "linear":
    return {"input_layernorm": _norm(D, dtype), "self_attn": {"linear_attn": _dense(key, D, D, dtype)}}
  K = spec.num_kv_heads
  kq, kk, kv, ko = jax.random.split(key, 4)
  a = {"q_proj": _dense(kq, N * H, D, dtype), "k_proj": _dense(kk, K * H, D, dtype),
       "v_proj": _dense(kv, K * H, D, dtype), "o_proj": _dense(ko, D, N * H, dtype)}
  if spec.bias:
    for name, proj in a.items():
      proj["bias"] = jnp.zeros((proj["weight"].shape[0],), dtype)
  if spec.sinks:
    a["sinks"] = jnp.zeros((N,), dtype)
  if spec.kv_dtype == "fp8":
    a["k_scale"], a["v_scale"] = jnp.ones((), jnp.float32), jnp.ones((), jnp.float32)
  return {"input_layernorm": _norm(D, dtype), "self_attn": a}


def ffn_init(key: jax.Array, spec: FFNSpec, arch: Arch, dtype=jnp.float32) -> Params:
  D = arch.hidden_size
  if spec.kind == "noop":
    return {}
  if spec.kind == "linear":
    return {"post_attention_layernorm": _norm(D, dtype), "mlp": {"linear_mlp": _dense(key, D, D, dtype)}}
  if spec.kind == "moe":
    return {"post_attention_layernorm": _norm(D, dtype),
            "mlp": moe_layer.init(key, D, spec.num_experts, spec.intermediate_size, dtype)}
  F = spec.intermediate_size
  kg, ku, kd = jax.random.split(key, 3)
  return {"post_attention_layernorm": _norm(D, dtype),
          "mlp": {"gate_proj": _dense(kg, F, D, dtype), "up_proj": _dense(ku, F, D, dtype),
                  "down_proj": _dense(kd, D, F, dtype)}}


def split_layer(layer: Params) -> tuple[Params, Params]:
  """A layer's params -> (attention sub-block params, FFN sub-block params)."""
  return ({k: v for k, v in layer.items() if k in ATTN_KEYS},
          {k: v for k, v in layer.items() if k in FFN_KEYS})


def fuse_ffn_params(arch: Arch, params: Params, run) -> Params:
  """Params for `fuse_ffn_run(arch, run)`: one SwiGLU whose gate/up rows and down columns are the
  members' concatenated. Each member normalizes with its own RMSNorm weight w_j, and
  gate_j(w_j * n) = (gate_j * w_j) n, so the weights fold into the gate/up columns and the fused
  FFN's norm is ones: exact, no extra FLOPs. Other params are shared, not copied."""
  fused_arch = fuse_ffn_run(arch, run)  # validates the run
  run = list(run)
  layers = list(params["model"]["layers"])
  mlps = [layers[i]["mlp"] for i in run]
  norms = [layers[i]["post_attention_layernorm"]["weight"] for i in run]
  dtype = mlps[0]["gate_proj"]["weight"].dtype

  def folded(name: str) -> jax.Array:
    return jnp.concatenate([m[name]["weight"].astype(jnp.float32) * w.astype(jnp.float32)[None, :]
                            for m, w in zip(mlps, norms)], axis=0).astype(dtype)
  down = jnp.concatenate([m["down_proj"]["weight"] for m in mlps], axis=1)
  layers[run[0]] = {"post_attention_layernorm": {"weight": jnp.ones_like(norms[0])},
                    "mlp": {"gate_proj": {"weight": folded("gate_proj")}, "up_proj": {"weight": folded("up_proj")},
                            "down_proj": {"weight": down}}}
  for i in run[1:]:
    layers[i] = {}
  assert fused_arch.blocks[run[0]].ffn.intermediate_size == down.shape[1]
  return {**params, "model": {**params["model"], "layers": layers}}


def fuse_parallel_ffns(arch: Arch, params: Params) -> tuple[Arch, Params]:
  """Every parallel group made only of FFN-only blocks, fused into one wide FFN (the engine layout);
  other groups (whole-block parallelism) are left as they are."""
  for run in fusable_groups(arch):
    params = fuse_ffn_params(arch, params, run)
    arch = fuse_ffn_run(arch, run)
  return arch, params


def init_params(key: jax.Array, arch: Arch, dtype=jnp.float32) -> Params:
  """Random params for any architecture (tests, speed benchmarks, random-init baselines)."""
  ke, kh, *kl = jax.random.split(key, 2 + 2 * arch.num_layers)
  layers = [{**attn_init(kl[2 * i], b.attn, arch, dtype), **ffn_init(kl[2 * i + 1], b.ffn, arch, dtype)}
            for i, b in enumerate(arch.blocks)]
  params = {"model": {"embed_tokens": _dense(ke, arch.vocab_size, arch.hidden_size, dtype),
                      "layers": layers, "norm": _norm(arch.hidden_size, dtype)}}
  if not arch.tie_embeddings:
    params["lm_head"] = _dense(kh, arch.vocab_size, arch.hidden_size, dtype)
  return params


def expected_shapes(arch: Arch) -> dict[str, tuple[int, ...]]:
  """{HF tensor name: shape} for every tensor `arch` owns (what `init_params` makes), without
  allocating any: what checkpoints are checked against on import and on export."""
  from puzzle_jax.core import names
  abstract = jax.eval_shape(lambda: init_params(jax.random.PRNGKey(0), arch))
  return names.shapes(abstract)


def truncate(arch: Arch, params: Params, max_layers: int) -> tuple[Arch, Params]:
  """Keep the first `max_layers` blocks (0 = all): fast experiments on a real parent."""
  if not max_layers or max_layers >= arch.num_layers:
    return arch, params
  arch = dataclasses.replace(arch, blocks=arch.blocks[:max_layers])
  return arch, {**params, "model": {**params["model"], "layers": params["model"]["layers"][:max_layers]}}


def count_params(params: Params) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))


# ----------------------------------------------------------------------------- the stack
def block_apply(layer: Params, h_BxLxD: jax.Array, i: int, arch: Arch, ctx: Ctx,
                cache_layer: Params | None) -> tuple[jax.Array, jax.Array, jax.Array, Params | None]:
  """One block. Returns (attn delta, post-attention residual, FFN delta, new cache layer)."""
  spec = arch.blocks[i]
  a, cache_layer = attn_apply(layer, h_BxLxD, spec.attn, arch, ctx, cache_layer)
  mid = h_BxLxD + a
  return a, mid, ffn_apply(layer, mid, spec.ffn, arch), cache_layer


def run_blocks(arch: Arch, params: Params, h_BxLxD: jax.Array, ctx: Ctx,
               cache_layers: list | None = None, *, hook=None) -> tuple[jax.Array, list | None]:
  """All blocks in order; blocks that share a parallel_group read one input and sum their deltas.

  `hook(i, h_in, attn_delta, mid, ffn_delta)` (trace-time callback) lets BLD/scoring collect
  per-layer activations without a second implementation of the forward.
  """
  layers = params["model"]["layers"]
  new_cache = list(cache_layers) if cache_layers is not None else None
  for run in parallel_runs(arch.blocks):
    delta = 0.0
    for i in run:
      c = cache_layers[i] if cache_layers is not None else None
      a, mid, f, c = block_apply(layers[i], h_BxLxD, i, arch, ctx, c)
      if hook is not None:
        hook(i, h_BxLxD, a, mid, f)
      if new_cache is not None:
        new_cache[i] = c
      delta = delta + a + f
    h_BxLxD = h_BxLxD + delta
  return h_BxLxD, new_cache


def embed(params: Params, tokens_BxL: jax.Array, dtype=None) -> jax.Array:
  table = params["model"]["embed_tokens"]["weight"]
  return jnp.take(table, tokens_BxL, axis=0).astype(dtype or table.dtype)


def lm_head(arch: Arch, params: Params, h_BxLxD: jax.Array) -> jax.Array:
  """Final norm + LM head; logits in float32."""
  h = rms_norm(params["model"]["norm"], h_BxLxD, arch.rms_eps)
  w = params["model"]["embed_tokens"] if arch.tie_embeddings else params["lm_head"]
  return jnp.einsum("bld,vd->blv", h, w["weight"].astype(h.dtype), preferred_element_type=jnp.float32)


def positions_from_mask(mask_BxL: jax.Array) -> jax.Array:
  """RoPE positions that skip left padding: 0 at each sequence's first real token."""
  return jnp.maximum(jnp.cumsum(mask_BxL.astype(jnp.int32), axis=1) - 1, 0)


def forward_ctx(arch: Arch, tokens_BxL: jax.Array, attention_mask_BxL: jax.Array | None = None) -> Ctx:
  B, L = tokens_BxL.shape
  mask = jnp.ones((B, L), bool) if attention_mask_BxL is None else attention_mask_BxL.astype(bool)
  return Ctx(arch, positions_from_mask(mask), mask, jnp.arange(L), 0)


def forward(arch: Arch, params: Params, tokens_BxL: jax.Array,
            attention_mask_BxL: jax.Array | None = None, *, dtype=None, hook=None) -> jax.Array:
  """Full-sequence forward -> float32 logits [B, L, V]. `dtype` sets the activation dtype."""
  ctx = forward_ctx(arch, tokens_BxL, attention_mask_BxL)
  h, _ = run_blocks(arch, params, embed(params, tokens_BxL, dtype), ctx, hook=hook)
  return lm_head(arch, params, h)


# ----------------------------------------------------------------------------- KV cache
def init_cache(arch: Arch, batch: int, max_len: int, dtype=jnp.float32) -> Cache:
  """Preallocated cache: one [B, S, K, H] pair per layer that has attention, None elsewhere."""
  def kv(a: AttnSpec):
    dt = jnp.float8_e4m3fn if a.kv_dtype == "fp8" else dtype
    return jnp.zeros((batch, max_len, a.num_kv_heads, arch.head_dim), dt)
  layers = [{"k": kv(b.attn), "v": kv(b.attn)} if b.attn.has_cache else None for b in arch.blocks]
  return {"layers": layers, "index": jnp.zeros((), jnp.int32),
          "valid": jnp.zeros((batch, max_len), bool), "next_pos": jnp.zeros((batch,), jnp.int32)}


def extend(arch: Arch, params: Params, tokens_BxL: jax.Array, cache: Cache,
           attention_mask_BxL: jax.Array | None = None, *, dtype=None) -> tuple[jax.Array, Cache]:
  """Feed L new tokens (prefill or one decode step) through the cache -> (logits, cache)."""
  B, L = tokens_BxL.shape
  m = jnp.ones((B, L), bool) if attention_mask_BxL is None else attention_mask_BxL.astype(bool)
  idx = cache["index"]
  positions = cache["next_pos"][:, None] + positions_from_mask(m)
  valid = jax.lax.dynamic_update_slice(cache["valid"], m, (0, idx))
  ctx = Ctx(arch, positions, valid, idx + jnp.arange(L), idx)
  h, layers = run_blocks(arch, params, embed(params, tokens_BxL, dtype), ctx, cache["layers"])
  new = {"layers": layers, "index": idx + L, "valid": valid,
         "next_pos": cache["next_pos"] + m.sum(axis=1).astype(jnp.int32)}
  return lm_head(arch, params, h), new


# ----------------------------------------------------------------------------- sampling
def sample(logits_BxV: jax.Array, key: jax.Array, temperature: float, top_p: float) -> jax.Array:
  if temperature == 0.0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits = logits_BxV / temperature
  if top_p < 1.0:
    sorted_BxV = jnp.sort(logits, axis=-1)[:, ::-1]
    cum = jnp.cumsum(jax.nn.softmax(sorted_BxV, axis=-1), axis=-1)
    # Smallest logit still inside the nucleus (the first token is always kept).
    cutoff_idx = jnp.sum(cum - jax.nn.softmax(sorted_BxV, axis=-1) < top_p, axis=-1) - 1
    cutoff = jnp.take_along_axis(sorted_BxV, cutoff_idx[:, None], axis=-1)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("arch", "max_new_tokens", "temperature", "top_p",
                                             "stop_tokens", "dtype", "cache_dtype"))
def _generate(arch, params, tokens_BxL, mask_BxL, key, *, max_new_tokens, temperature,
              top_p, stop_tokens, dtype, cache_dtype):
  B, L = tokens_BxL.shape
  # Allocated inside the jit, so XLA updates it in place across the scan.
  cache = init_cache(arch, B, L + max_new_tokens, cache_dtype)
  logits, cache = extend(arch, params, tokens_BxL, cache, mask_BxL, dtype=dtype)
  stops = jnp.asarray(stop_tokens or (-1,), jnp.int32)

  def step(carry, key_t):
    logits_BxV, cache, done_B = carry
    tok_B = sample(logits_BxV, key_t, temperature, top_p)
    tok_B = jnp.where(done_B, stops[0], tok_B)  # finished rows repeat a stop token
    done_B = done_B | jnp.isin(tok_B, stops)
    logits, cache = extend(arch, params, tok_B[:, None], cache, dtype=dtype)
    return (logits[:, -1], cache, done_B), tok_B

  carry = (logits[:, -1], cache, jnp.zeros((B,), bool))
  _, out_TxB = jax.lax.scan(step, carry, jax.random.split(key, max_new_tokens))
  return out_TxB.T


def generate(arch: Arch, params: Params, tokens_BxL, attention_mask_BxL=None, *,
             max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
             stop_tokens: tuple[int, ...] = (), key: jax.Array | None = None, dtype=None,
             cache_dtype=None) -> jax.Array:
  """Prefill, then the whole decode loop inside one jit (no host round trip per token).

  Batches are left-padded (mask 0 on the left). Returns new tokens [B, max_new_tokens];
  after a stop token a row repeats the first stop token.
  """
  tokens_BxL = jnp.asarray(tokens_BxL, jnp.int32)
  B, L = tokens_BxL.shape
  mask = jnp.ones((B, L), bool) if attention_mask_BxL is None else jnp.asarray(attention_mask_BxL, bool)
  cdt = cache_dtype or dtype or params["model"]["embed_tokens"]["weight"].dtype
  key = jax.random.PRNGKey(0) if key is None else key
  return _generate(arch, params, tokens_BxL, mask, key, cache_dtype=jnp.dtype(cdt), max_new_tokens=max_new_tokens,
                   temperature=float(temperature), top_p=float(top_p),
                   stop_tokens=tuple(int(t) for t in stop_tokens), dtype=dtype)
