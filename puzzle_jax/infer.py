"""Fast inference: a bf16 prefill and a fully-jitted decode loop over heterogeneous children.

Same semantics as `puzzle_jax.core.model` (the reference: same RoPE, norms, masks, sampling and
`generate` conventions), laid out for speed:

* `prepare(arch, params, dtype)` converts `model` params once, outside jit, into `InferParams`:
  weights cast, kept in the HF [out, in] layout (a batch-1 matrix-vector product then reads each
  output's weights contiguously), q/k/v fused into one matrix and gate/up into another
  (one matmul each; at decode batch 1 every launch counts), and each run of consecutive identical
  blocks stacked, so that one `lax.scan` covers the run and compile time grows with the number of
  distinct runs, not layers. Parallel groups (blocks that read one input and add their deltas) are
  python-unrolled. `scan=False` keeps every layer its own buffer and unrolls everything: no
  per-layer dynamic-slice of stacked weights at decode time, at the price of compile time.
* Prefill attention is `jax.nn.dot_product_attention`: cuDNN flash attention on GPU for bf16/f16
  with head_dim 64 or 128, XLA elsewhere. It is always plain causal (`is_causal=True`, plus
  `local_window_size` for sliding windows), never a dense mask: a padded batch is first compacted
  (each row's real tokens moved to the front, in order), which for a causal LM computes exactly
  what the left-padded batch computes at its real positions; results are moved back afterwards.
* Decode runs every new token inside one jit: `lax.fori_loop` for a fixed length, or a
  `lax.while_loop` that stops once every row has hit a stop token. The KV cache is allocated
  inside that jit (so XLA owns it and updates it in place: no donation needed, no host round
  trip per token), per attention layer with its own kv-head count, stacked [n, ...] for a scanned
  run; no-op and linear attention own none. Layout [n, B, K, S, H]: the decode score and value
  einsums are batched over (B, K) with contiguous [S, H] per batch, so they read the cache
  directly, and each step writes one [B, K, 1, H] slot with `dynamic_update_slice`. Per step the
  work is one pass over the cache (O(cache length)) plus the weights.
* Small-batch decode (latency-bound: launches, not bytes, set the speed) runs on the Pallas
  kernels of `puzzle_jax.kernels` instead (`decode_impl`), on the same cache: "persistent" runs
  each run of identical blocks as one kernel (grid barriers between its phases), "pallas" each
  block as five fused kernels (also the fallback for parallel groups under "persistent"). Their
  knobs are a `kernels.KernelConfig`, a static field of `InferParams` (part of jit's cache key).
* The layout (`scan`) defaults to the fastest measured on the GPU for the model and batch
  (`default_scan`): stacked runs where the persistent kernel decodes (it runs a stacked run as
  one kernel), else one buffer per layer, unrolled: XLA's scan copies each layer's weights out of
  the stack every step (BENCHMARKS.md, "Inference"). Off the GPU it scans (compile time).

Axis legend: as in `puzzle_jax.core.arch` (B batch, L tokens, S cache slots, D hidden, N query heads,
K kv heads, G = N/K, H head dim, F FFN width, V vocab), plus n = layers in a scanned run,
A = N*H attention width, E = (N + 2K)*H fused q/k/v width, T new tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any

import jax
import jax.numpy as jnp

from puzzle_jax import kernels
from puzzle_jax.core import model
from puzzle_jax.core.arch import Arch, ArchError, AttnSpec, BlockSpec, FFNSpec, parallel_runs

Params = dict[str, Any]
Cache = dict[str, Any]
ATTN_IMPLS = ("auto", "cudnn", "xla")
DECODE_IMPLS = ("auto", "persistent", "pallas", "xla")
CUDNN_HEAD_DIMS = (64, 128)
CACHE_MULTIPLE = kernels.BLOCK_S  # cache slots are rounded up to this (whole kernel blocks; extra slots stay masked)


# ----------------------------------------------------------------------------- params
@dataclasses.dataclass(frozen=True)
class Segment:
  """Consecutive layers run as one unit: a run of identical blocks (scanned when longer than
  one), or a parallel group (its blocks read one input and add their deltas; unrolled)."""
  layers: tuple[int, ...]
  parallel: bool = False


def plan_segments(arch: Arch, scan: bool = True) -> tuple[Segment, ...]:
  """Group layers: parallel groups as they are, and runs of blocks with equal (attn, ffn) specs
  merged (only when `scan`)."""
  segs: list[Segment] = []
  for run in parallel_runs(arch.blocks):
    if len(run) > 1:
      segs.append(Segment(tuple(run), parallel=True))
      continue
    b = arch.blocks[run[0]]
    prev = segs[-1] if segs else None
    if scan and prev is not None and not prev.parallel and _same_spec(arch.blocks[prev.layers[0]], b):
      segs[-1] = Segment(prev.layers + (run[0],))
    else:
      segs.append(Segment((run[0],)))
  return tuple(segs)


def _same_spec(a: BlockSpec, b: BlockSpec) -> bool:
  return a.attn == b.attn and a.ffn == b.ffn  # a lone block's parallel_group id is irrelevant


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["embed_VxD", "head_VxD", "norm_D", "blocks"],
                   meta_fields=["arch", "plan", "attn_impl", "decode_impl", "kernel_config"])
@dataclasses.dataclass(frozen=True)
class InferParams:
  """Inference weights (a pytree; `arch`, `plan`, `attn_impl`, `decode_impl`, `kernel_config`: static)."""
  embed_VxD: jax.Array
  head_VxD: jax.Array  # the embedding itself when tied
  norm_D: jax.Array
  # Per segment: a run's block params stacked [n, ...]; a parallel group's, a tuple of [1, ...].
  blocks: tuple[Any, ...]
  arch: Arch
  plan: tuple[Segment, ...]
  attn_impl: str = "auto"
  decode_impl: str = "auto"
  kernel_config: kernels.KernelConfig = kernels.DEFAULT

  @property
  def dtype(self) -> jnp.dtype:
    return self.embed_VxD.dtype


def _fast_decode(arch: Arch, dtype, batch: int, cfg: kernels.KernelConfig, backend: str | None = None) -> bool:
  """Whether decode_impl="auto" takes the kernels: where they were measured faster than XLA (one
  row on the GPU, hidden sizes up to `cfg.fused_max_hidden`, half-precision activations)."""
  return ((backend or jax.default_backend()) in cfg.fused_backends and batch <= cfg.fused_max_batch
          and arch.hidden_size <= cfg.fused_max_hidden and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16))


def default_scan(arch: Arch, dtype, batch: int | None = None, decode_impl: str = "auto",
                 cfg: kernels.KernelConfig = kernels.DEFAULT, backend: str | None = None) -> bool:
  """The faster layout for decoding `batch` rows (None: 1): stacked runs (scan) where the persistent
  kernel will decode them and they are long (`cfg.scan_min_mean_run` blocks on average), unrolled
  per-layer buffers on the GPU otherwise (XLA's scan copies each layer's weights out of the stack
  every step: BENCHMARKS.md, "Inference"); off the GPU, scan (there compile time, not decode speed,
  dominates). `backend`: default, JAX's default backend."""
  backend = backend or jax.default_backend()
  if backend != "gpu" or decode_impl == "persistent":
    return True
  mean_run = arch.num_layers / max(len(plan_segments(arch, scan=True)), 1)
  return (decode_impl == "auto" and _fast_decode(arch, dtype, batch or 1, cfg, backend)
          and mean_run >= cfg.scan_min_mean_run)


def prepare(arch: Arch, params: Params, dtype=jnp.bfloat16, *, scan: bool | None = None, batch: int | None = None,
            attn_impl: str = "auto", decode_impl: str = "auto",
            kernel_config: kernels.KernelConfig = kernels.DEFAULT) -> InferParams:
  """`model` params (HF layout) -> `InferParams`: cast, transposed, fused, runs stacked.

  `scan`: stack runs of identical blocks (one `lax.scan` or one persistent kernel per run) or keep
  a buffer per layer (unrolled); None: `default_scan` for `batch` rows (the decode batch the
  caller will use most; None: 1). `kernel_config`: the kernels' knobs (static).

  `attn_impl`: "auto" (cuDNN on GPU where it applies, else XLA), "cudnn" or "xla".
  `decode_impl`: "auto" ("persistent" on GPU for batches of at most `fused_max_batch` rows and
  hidden sizes up to `fused_max_hidden`, for runs of at least `min_run` blocks, the five
  kernels for shorter runs; XLA otherwise; `generate` decodes again with "pallas" if a barrier wait
  timed out), "pallas" (five kernels per block), "persistent" (one Pallas kernel per
  run of identical blocks, grid barriers between phases; best with `scan=True`, which stacks a run
  into one segment; `generate` raises if one of its barrier waits timed out),
  both interpreted off-GPU (tests), or "xla". Blocks the kernels do not cover
  (biases, odd widths; parallel groups under "persistent") fall back: persistent -> pallas -> XLA.
  """
  if attn_impl not in ATTN_IMPLS:
    raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}")
  if decode_impl not in DECODE_IMPLS:
    raise ValueError(f"decode_impl must be one of {DECODE_IMPLS}, got {decode_impl!r}")
  if kernel_config.timeline:
    raise ValueError("prepare: KernelConfig(timeline=True) is a profiling build of decode_segment alone "
                     "(benchmarks/segment_profile.py); infer needs timeline=False")
  if scan is None:
    scan = default_scan(arch, dtype, batch, decode_impl, kernel_config)
  plan = plan_segments(arch, scan)
  layers = params["model"]["layers"]

  def block(i: int) -> Params:
    b = arch.blocks[i]
    p = {**_attn_params(layers[i], b.attn), **_ffn_params(layers[i], b.ffn)}
    return jax.tree.map(lambda x: jnp.asarray(x, dtype), p)

  blocks = []
  for seg in plan:
    if seg.parallel:
      blocks.append(tuple(_stack([block(i)]) for i in seg.layers))
    else:
      blocks.append(_stack([block(i) for i in seg.layers]))
  embed = jnp.asarray(params["model"]["embed_tokens"]["weight"], dtype)
  head = embed if arch.tie_embeddings else jnp.asarray(params["lm_head"]["weight"], dtype)
  return InferParams(embed, head, jnp.asarray(params["model"]["norm"]["weight"], dtype), tuple(blocks),
                     arch, plan, attn_impl, decode_impl, kernel_config)


def _stack(blocks: list[Params]) -> Params:
  return jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)


def _with_bias(p: Params, name: str, biases: list) -> Params:
  if all(b is not None for b in biases):
    p[name] = jnp.concatenate([jnp.asarray(b) for b in biases])
  return p


def _attn_params(layer: Params, spec: AttnSpec) -> Params:
  if spec.kind == "noop":
    return {}
  a = layer["self_attn"]
  p = {"attn_norm_D": layer["input_layernorm"]["weight"]}
  if spec.kind == "linear":
    p["wa_DxD"] = jnp.asarray(a["linear_attn"]["weight"])
    return _with_bias(p, "ba_D", [a["linear_attn"].get("bias")])
  if spec.num_sink_tokens:
    raise ArchError("attention sinks are not implemented yet (gpt-oss issue)")
  qkv = [a[n] for n in ("q_proj", "k_proj", "v_proj")]
  p["wqkv_ExD"] = jnp.concatenate([jnp.asarray(m["weight"]) for m in qkv], axis=0)
  p["wo_DxA"] = jnp.asarray(a["o_proj"]["weight"])
  _with_bias(p, "bqkv_E", [m.get("bias") for m in qkv])
  return _with_bias(p, "bo_D", [a["o_proj"].get("bias")])


def _ffn_params(layer: Params, spec: FFNSpec) -> Params:
  if spec.kind == "noop":
    return {}
  m = layer["mlp"]
  p = {"ffn_norm_D": layer["post_attention_layernorm"]["weight"]}
  if spec.kind == "linear":
    p["wf_DxD"] = jnp.asarray(m["linear_mlp"]["weight"])
    return _with_bias(p, "bf_D", [m["linear_mlp"].get("bias")])
  if spec.kind != "swiglu":
    raise ArchError("MoE FFN inference is not implemented yet (gpt-oss issue)")
  p["wgu_2xFxD"] = jnp.stack([jnp.asarray(m[n]["weight"]) for n in ("gate_proj", "up_proj")])
  p["wd_DxF"] = jnp.asarray(m["down_proj"]["weight"])
  return p


# ----------------------------------------------------------------------------- sub-blocks
@dataclasses.dataclass
class _Ctx:
  """Per-call values all layers share (closed over by the layer scans)."""
  cos: jax.Array  # [B or 1, L, H]
  sin: jax.Array
  decode: bool
  impl: str = "xla"  # prefill attention implementation
  unorder_BxL: jax.Array | None = None  # prefill: compacted -> original order (None: not compacted)
  index: jax.Array | None = None  # decode: the cache slot this token is written to
  masks: dict | None = None  # decode: {window: [B, S] keys the token may attend to}
  fused: bool = False  # decode: run blocks through the fused kernels where they apply
  persistent: bool = False  # decode: run whole segments as persistent kernels where they apply
  min_run: int = 1  # decode, persistent: only runs of at least this many blocks (shorter: five kernels)
  kmasks: dict | None = None  # decode, fused: `masks` as int32 (what the attention kernel reads)
  rope: tuple | None = None  # decode: RoPE (cos, sin) tables [S, H] by position (persistent kernels index them)
  pos_B: jax.Array | None = None  # decode: each row's RoPE position


def _linear(x: jax.Array, w_OxI: jax.Array, b: jax.Array | None = None) -> jax.Array:
  y = jnp.einsum("...i,oi->...o", x, w_OxI)
  return y if b is None else y + b.reshape((1,) * (y.ndim - 1) + b.shape)


def _norm(w_D: jax.Array, x: jax.Array, arch: Arch) -> jax.Array:
  return model.rms_norm({"weight": w_D}, x, arch.rms_eps)


def _attn_delta(p: Params, h_BxLxD, spec: AttnSpec, ip: InferParams, ctx: _Ctx, kv, i):
  """Attention sub-block output (None for no-op) and the updated stacked cache of its run."""
  if spec.kind == "noop":
    return None, kv
  arch = ip.arch
  x = _norm(p["attn_norm_D"], h_BxLxD, arch)
  if spec.kind == "linear":
    return _linear(x, p["wa_DxD"], p.get("ba_D")), kv
  B, L, _ = x.shape
  N, K, H = arch.num_heads, spec.num_kv_heads, arch.head_dim
  qkv = _linear(x, p["wqkv_ExD"], p.get("bqkv_E"))
  q = model.apply_rope(qkv[..., :N * H].reshape(B, L, N, H), ctx.cos, ctx.sin)
  k = model.apply_rope(qkv[..., N * H:(N + K) * H].reshape(B, L, K, H), ctx.cos, ctx.sin)
  v = qkv[..., (N + K) * H:].reshape(B, L, K, H)
  if ctx.decode:
    kv = _write_kv(kv, i, k, v, ctx.index)
    k_BxKxSxH, v_BxKxSxH = _read_kv(kv, i)
    out = _decode_attention(q, k_BxKxSxH, v_BxKxSxH, ctx.masks[spec.window])
  else:
    if kv is not None:  # the cache keeps the original (left-padded) order
      kv = _write_kv(kv, i, _uncompact(k, ctx), _uncompact(v, ctx), 0)
    out = _prefill_attention(q, k, v, spec.window, ctx.impl)
  return _linear(out.reshape(B, L, N * H), p["wo_DxA"], p.get("bo_D")), kv


def _ffn_delta(p: Params, h_BxLxD, spec: FFNSpec, ip: InferParams):
  if spec.kind == "noop":
    return None
  x = _norm(p["ffn_norm_D"], h_BxLxD, ip.arch)
  if spec.kind == "linear":
    return _linear(x, p["wf_DxD"], p.get("bf_D"))
  gu_BxLx2xF = jnp.einsum("bld,tfd->bltf", x, p["wgu_2xFxD"])
  return _linear(jax.nn.silu(gu_BxLx2xF[:, :, 0]) * gu_BxLx2xF[:, :, 1], p["wd_DxF"])


def _prefill_attention(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, window: int | None, impl: str) -> jax.Array:
  """Causal self-attention of a compacted prompt (no mask needed: see the module docstring)."""
  L = q_BxLxNxH.shape[1]
  # Ours: a query sees keys q - window < k <= q; JAX's (left, right) window is inclusive.
  local = (window - 1, 0) if window is not None and window < L else None
  if impl == "cudnn":
    try:
      return jax.nn.dot_product_attention(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, is_causal=True,
                                          local_window_size=local, implementation="cudnn")
    except (NotImplementedError, RuntimeError, ValueError) as e:  # raised while tracing
      warnings.warn(f"cuDNN attention unavailable ({e}); using XLA attention")
  return jax.nn.dot_product_attention(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, is_causal=True,
                                      local_window_size=local, implementation="xla")


def _decode_attention(q_Bx1xNxH, k_BxKxSxH, v_BxKxSxH, mask_BxS) -> jax.Array:
  """One query per row over the cache; scores and softmax in float32, as `model` does."""
  B, _, N, H = q_Bx1xNxH.shape
  K = k_BxKxSxH.shape[1]
  q_BxKxGxH = q_Bx1xNxH.reshape(B, K, N // K, H)
  s = jnp.einsum("bkgh,bksh->bkgs", q_BxKxGxH, k_BxKxSxH,
                 preferred_element_type=jnp.float32) * (H ** -0.5)
  s = jnp.where(mask_BxS[:, None, None, :], s, model.NEG_INF)
  w = jax.nn.softmax(s, axis=-1).astype(v_BxKxSxH.dtype)
  return jnp.einsum("bkgs,bksh->bkgh", w, v_BxKxSxH).reshape(B, 1, N, H)


def _write_kv(kv: Params, i, k_BxLxKxH, v_BxLxKxH, slot) -> Params:
  """Write L tokens' K/V at cache slot `slot` of layer `i` of the stacked [n, B, K, S, H] cache."""
  idx = tuple(jnp.asarray(j, jnp.int32) for j in (i, 0, 0, slot, 0))
  put = lambda c, x: jax.lax.dynamic_update_slice(c, jnp.swapaxes(x, 1, 2)[None].astype(c.dtype), idx)
  return {"k": put(kv["k"], k_BxLxKxH), "v": put(kv["v"], v_BxLxKxH)}


def _read_kv(kv: Params, i) -> tuple[jax.Array, jax.Array]:
  if isinstance(i, int):
    return kv["k"][i], kv["v"][i]
  return tuple(jax.lax.dynamic_index_in_dim(kv[n], i, 0, keepdims=False) for n in ("k", "v"))


# ----------------------------------------------------------------------------- the stack
def _block(p: Params, h_BxLxD, spec: BlockSpec, ip: InferParams, ctx: _Ctx, kv, i):
  """A sequential block: h + attn, then + FFN (transformers' order of the two residual adds)."""
  if ctx.fused and _fusable(p, spec, ip.arch):
    return _fused_block(p, h_BxLxD, spec, ip, ctx, kv, i)
  a, kv = _attn_delta(p, h_BxLxD, spec.attn, ip, ctx, kv, i)
  mid = h_BxLxD if a is None else h_BxLxD + a
  f = _ffn_delta(p, mid, spec.ffn, ip)
  return (mid if f is None else mid + f), kv


def _fusable(p: Params, spec: BlockSpec, arch: Arch) -> bool:
  """Whether `kernels` covers this block: no biases, widths the kernels tile."""
  if any(k.startswith("b") for k in p):
    return False
  D, A, H = arch.hidden_size, arch.num_heads * arch.head_dim, arch.head_dim
  a, f = spec.attn, spec.ffn
  ok_a = a.kind != "gqa" or (kernels.supported(D, kernels.qkv_width(arch.num_heads, a.num_kv_heads, H))
                             and kernels.supported(A, D) and kernels.head_dim_ok(H))
  ok_f = f.kind != "swiglu" or (kernels.supported(D, f.intermediate_size) and kernels.supported(f.intermediate_size, D))
  return ok_a and ok_f and kernels.supported(D, D)


def _fused_block(p: Params, h_BxLxD, spec: BlockSpec, ip: InferParams, ctx: _Ctx, kv, i):
  """The decode block in five kernels (see `puzzle_jax.kernels`); same results as `_block`."""
  arch, eps, cfg = ip.arch, ip.arch.rms_eps, ip.kernel_config
  h = h_BxLxD[:, 0]
  a, f = spec.attn, spec.ffn
  if a.kind == "linear":
    h = kernels.matmul(h, p["wa_DxD"], norm_D=p["attn_norm_D"], eps=eps, residual_BxN=h, cfg=cfg)
  elif a.kind == "gqa":
    qkv = kernels.matmul(h, p["wqkv_ExD"], norm_D=p["attn_norm_D"], eps=eps, cfg=cfg)
    parts, k, v = kernels.decode_attention(qkv, ctx.cos[:, 0], ctx.sin[:, 0], ctx.kmasks[a.window], kv["k"],
                                           kv["v"], i, ctx.index, num_heads=arch.num_heads,
                                           num_kv_heads=a.num_kv_heads, cfg=cfg)
    kv = {"k": k, "v": v}
    h = kernels.attn_out(parts, p["wo_DxA"], h, cfg=cfg)
  if f.kind == "linear":
    h = kernels.matmul(h, p["wf_DxD"], norm_D=p["ffn_norm_D"], eps=eps, residual_BxN=h, cfg=cfg)
  elif f.kind == "swiglu":
    act = kernels.matmul(h, p["wgu_2xFxD"], norm_D=p["ffn_norm_D"], eps=eps, swiglu=True, cfg=cfg)
    h = kernels.matmul(act, p["wd_DxF"], residual_BxN=h, cfg=cfg)
  return h[:, None], kv


def _parallel(ps: tuple, h_BxLxD, seg: Segment, ip: InferParams, ctx: _Ctx, kvs):
  """Blocks of one parallel group: each reads h; their deltas are summed (as `model.run_blocks`)."""
  kvs = kvs if kvs is not None else (None,) * len(seg.layers)
  delta, new = None, []
  for p, layer, kv in zip(ps, seg.layers, kvs):
    spec = ip.arch.blocks[layer]
    p = jax.tree.map(lambda x: x[0], p)
    a, kv = _attn_delta(p, h_BxLxD, spec.attn, ip, ctx, kv, 0)
    f = _ffn_delta(p, h_BxLxD if a is None else h_BxLxD + a, spec.ffn, ip)
    for d in (a, f):
      if d is not None:
        delta = d if delta is None else delta + d
    new.append(kv)
  return (h_BxLxD if delta is None else h_BxLxD + delta), tuple(new)


def _run(p: Params, h_BxLxD, seg: Segment, ip: InferParams, ctx: _Ctx, kv):
  """A run of identical blocks; one `lax.scan` over the stacked params when longer than one."""
  spec = ip.arch.blocks[seg.layers[0]]
  if len(seg.layers) == 1:
    return _block(jax.tree.map(lambda x: x[0], p), h_BxLxD, spec, ip, ctx, kv, 0)

  def body(carry, xs):
    h, kv = carry
    p_i, i = xs
    return _block(p_i, h, spec, ip, ctx, kv, i), None

  xs = (p, jnp.arange(len(seg.layers), dtype=jnp.int32))
  return jax.lax.scan(body, (h_BxLxD, kv), xs)[0]


def _persistent_ok(p: Params, spec: BlockSpec, arch: Arch) -> bool:
  """Whether `kernels.decode_segment` covers a run of these blocks: what the five kernels cover
  (same phases), with at least one sub-block (an all-no-op block needs no kernel)."""
  return _fusable(p, spec, arch) and (spec.attn.kind, spec.ffn.kind) != ("noop", "noop")


def _persistent_run(p: Params, h_BxLxD, seg: Segment, ip: InferParams, ctx: _Ctx, kv, sync):
  """A decode run of identical blocks as one persistent kernel -> (h, kv, its `kernels.SegmentState`)."""
  a, f = ip.arch.blocks[seg.layers[0]].attn, ip.arch.blocks[seg.layers[0]].ffn
  mask = ctx.kmasks[a.window] if a.kind == "gqa" else None
  h, kv, sync = kernels.decode_segment(h_BxLxD[:, 0], p, kv, sync, *ctx.rope, mask, ctx.index, attn_kind=a.kind,
                                       ffn_kind=f.kind, num_heads=ip.arch.num_heads,
                                       num_kv_heads=a.num_kv_heads or 0, eps=ip.arch.rms_eps, pos_B=ctx.pos_B,
                                       cfg=ip.kernel_config)
  return h[:, None], kv, sync


def _stack_apply(ip: InferParams, h_BxLxD, ctx: _Ctx, kvs: tuple | None, syncs: tuple | None = None):
  """The blocks, segment by segment -> (h, caches, states of the persistent kernels)."""
  kvs = kvs if kvs is not None else (None,) * len(ip.plan)
  syncs = syncs if syncs is not None else (None,) * len(ip.plan)
  new, new_syncs = [], []
  for seg, p, kv, flags in zip(ip.plan, ip.blocks, kvs, syncs):
    spec = ip.arch.blocks[seg.layers[0]]
    if (ctx.persistent and flags is not None and not seg.parallel and len(seg.layers) >= ctx.min_run
        and _persistent_ok(p, spec, ip.arch)):
      h_BxLxD, kv, flags = _persistent_run(p, h_BxLxD, seg, ip, ctx, kv, flags)
    else:
      apply = _parallel if seg.parallel else _run
      h_BxLxD, kv = apply(p, h_BxLxD, seg, ip, ctx, kv)
    new.append(kv)
    new_syncs.append(flags)
  return h_BxLxD, tuple(new), tuple(new_syncs)


def _logits(ip: InferParams, h_BxLxD) -> jax.Array:
  h = _norm(ip.norm_D, h_BxLxD, ip.arch)
  return jnp.einsum("bld,vd->blv", h, ip.head_VxD, preferred_element_type=jnp.float32)


def _decode_mode(ip: InferParams, batch: int) -> str:
  """"persistent", "pallas" or "xla" for a decode step of `batch` rows."""
  if ip.decode_impl != "auto":
    return ip.decode_impl
  # runs shorter than `min_run` blocks still take the five kernels (see _decode_step)
  return "persistent" if _fast_decode(ip.arch, ip.dtype, batch, ip.kernel_config) else "xla"


def _attn_impl(ip: InferParams) -> str:
  if ip.attn_impl != "auto":
    return ip.attn_impl
  fits = ip.dtype in (jnp.bfloat16, jnp.float16) and ip.arch.head_dim in CUDNN_HEAD_DIMS
  return "cudnn" if fits and jax.default_backend() == "gpu" else "xla"


# ----------------------------------------------------------------------------- prefill
def _compaction(mask_BxL) -> tuple[jax.Array, jax.Array]:
  """(order, unorder): order moves each row's real tokens to the front (stable), unorder undoes it."""
  order_BxL = jnp.argsort(~mask_BxL, axis=1, stable=True)
  return order_BxL, jnp.argsort(order_BxL, axis=1)


def _uncompact(x_BxLx___, ctx: _Ctx) -> jax.Array:
  if ctx.unorder_BxL is None:
    return x_BxLx___
  idx = ctx.unorder_BxL.reshape(ctx.unorder_BxL.shape + (1,) * (x_BxLx___.ndim - 2))
  return jnp.take_along_axis(x_BxLx___, idx, axis=1)


def _prefill(ip: InferParams, tokens_BxL, mask_BxL, kvs):
  """Compacted prompt through the stack -> (hidden [B, L, D] compacted, caches, ctx)."""
  L = tokens_BxL.shape[1]
  unorder = None
  if mask_BxL is not None:
    order, unorder = _compaction(mask_BxL)
    tokens_BxL = jnp.take_along_axis(tokens_BxL, order, axis=1)
  cos, sin = model.rope_cos_sin(ip.arch, jnp.arange(L)[None])  # compacted: positions are 0..L-1
  ctx = _Ctx(cos, sin, decode=False, impl=_attn_impl(ip), unorder_BxL=unorder)
  h, kvs, _ = _stack_apply(ip, jnp.take(ip.embed_VxD, tokens_BxL, axis=0), ctx, kvs)
  return h, kvs, ctx


@jax.jit
def prefill_logits(ip: InferParams, tokens_BxL: jax.Array, mask_BxL: jax.Array | None = None) -> jax.Array:
  """Full-sequence forward -> float32 logits [B, L, V] (as `model.forward`; mask: 1 = real token).

  Rows may be padded (left, as `generate` expects, or right); padded positions hold garbage.
  """
  mask = None if mask_BxL is None else mask_BxL.astype(bool)
  h, _, ctx = _prefill(ip, tokens_BxL.astype(jnp.int32), mask, None)
  return _logits(ip, _uncompact(h, ctx))


# ----------------------------------------------------------------------------- KV cache, decode
def init_cache(ip: InferParams, batch: int, max_len: int) -> Cache:
  """Empty cache: per segment a {"k", "v"} of [n, B, K, S, H] (a tuple of them for a parallel
  group; None without attention) and the state of its persistent kernel (`kernels.SegmentState`),
  the next write slot, valid slots (bool, and int32 for the kernels), next RoPE position, RoPE
  (cos, sin) tables [S, H] by position."""
  arch = ip.arch
  S = -(-max_len // CACHE_MULTIPLE) * CACHE_MULTIPLE

  def kv(spec: AttnSpec, n: int):
    if not spec.has_cache:
      return None
    shape = (n, batch, spec.num_kv_heads, S, arch.head_dim)
    return {"k": jnp.zeros(shape, ip.dtype), "v": jnp.zeros(shape, ip.dtype)}

  layers = tuple(tuple(kv(arch.blocks[i].attn, 1) for i in seg.layers) if seg.parallel
                 else kv(arch.blocks[seg.layers[0]].attn, len(seg.layers)) for seg in ip.plan)

  def sync(a: AttnSpec):  # barrier flags, residual buffers, tagged q/k/v words of a run's persistent kernel
    width = kernels.qkv_width(arch.num_heads, a.num_kv_heads, arch.head_dim) if a.kind == "gqa" else 0
    return kernels.segment_state(kernels.persistent_programs(ip.kernel_config), batch, arch.hidden_size, width)

  # Epochs, tags and the residual buffers' rotation follow the decode step (`cache["index"]`).
  syncs = tuple(None if seg.parallel else sync(arch.blocks[seg.layers[0]].attn) for seg in ip.plan)
  cos, sin = model.rope_cos_sin(arch, jnp.arange(S)[None])
  return {"layers": layers, "sync": syncs, "index": jnp.zeros((), jnp.int32), "valid": jnp.zeros((batch, S), bool),
          "kmask": jnp.zeros((batch, S), jnp.int32), "next_pos": jnp.zeros((batch,), jnp.int32),
          "rope": (cos[0], sin[0])}


def _prefill_cache(ip: InferParams, tokens_BxL, mask_BxL, max_len: int) -> tuple[jax.Array, Cache]:
  """Prompt into a fresh cache -> (float32 logits [B, V] at each row's last real token, cache)."""
  B, L = tokens_BxL.shape
  cache = init_cache(ip, B, max_len)
  h, kvs, _ = _prefill(ip, tokens_BxL, mask_BxL, cache["layers"])
  mask = jnp.ones((B, L), bool) if mask_BxL is None else mask_BxL
  n_real_B = mask.sum(axis=1).astype(jnp.int32)
  last = jnp.maximum(n_real_B - 1, 0)[:, None, None]  # compacted: the last real token is at n - 1
  logits_BxV = _logits(ip, jnp.take_along_axis(h, last, axis=1))[:, 0]
  # The slots decoding will write are marked valid now: a step attends to the slots up to its index,
  # so no step needs to update the mask (nor its int32 copy, what the kernels read).
  valid = jax.lax.dynamic_update_slice(cache["valid"], mask, (0, 0)).at[:, L:].set(True)
  return logits_BxV, {**cache, "layers": kvs, "index": jnp.asarray(L, jnp.int32), "valid": valid,
                      "kmask": valid.astype(jnp.int32), "next_pos": n_real_B}


def _decode_step(ip: InferParams, tok_B, cache: Cache) -> tuple[jax.Array, Cache]:
  """One token per row at slot `cache["index"]` -> (float32 logits [B, V], cache)."""
  idx, pos_B, valid = cache["index"], cache["next_pos"], cache["valid"]
  slots_S = jnp.arange(valid.shape[1])
  windows = {b.attn.window for b in ip.arch.blocks if b.attn.has_cache}
  # Slots up to idx (later ones are marked valid for the steps to come, see _prefill_cache).
  masks = {w: valid & (slots_S <= idx)[None, :] & (True if w is None else (idx - slots_S < w)[None, :])
           for w in windows}
  cos_SxH, sin_SxH = cache["rope"]
  mode = _decode_mode(ip, tok_B.shape[0])
  fused = mode != "xla"
  # The kernels never read slots at or after idx: the whole-context mask needs no update per step.
  kmasks = {w: cache["kmask"] if w is None else m.astype(jnp.int32) for w, m in masks.items()} if fused else None
  ctx = _Ctx(cos_SxH[pos_B][:, None], sin_SxH[pos_B][:, None], decode=True, index=idx, masks=masks, fused=fused,
             persistent=mode == "persistent", min_run=ip.kernel_config.min_run if ip.decode_impl == "auto" else 1,
             kmasks=kmasks, rope=(cos_SxH, sin_SxH), pos_B=pos_B)
  h, kvs, syncs = _stack_apply(ip, jnp.take(ip.embed_VxD, tok_B[:, None], axis=0), ctx, cache["layers"],
                               cache["sync"])
  new = {**cache, "layers": kvs, "sync": syncs, "index": idx + 1, "next_pos": pos_B + 1}
  return _logits(ip, h)[:, 0], new


@functools.partial(jax.jit, static_argnames=("max_len",))
def prefill_cache(ip: InferParams, tokens_BxL: jax.Array, mask_BxL: jax.Array | None = None, *,
                  max_len: int) -> tuple[jax.Array, Cache]:
  """Prompt -> (float32 next-token logits [B, V], cache with room for `max_len` tokens in all)."""
  mask = None if mask_BxL is None else mask_BxL.astype(bool)
  return _prefill_cache(ip, tokens_BxL.astype(jnp.int32), mask, max_len)


@functools.partial(jax.jit, donate_argnames=("cache",))
def decode_step(ip: InferParams, tok_B: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
  """Feed one token per row -> (float32 logits [B, V], cache). The cache is donated (in place)."""
  return _decode_step(ip, tok_B.astype(jnp.int32), cache)


# ----------------------------------------------------------------------------- generate
@functools.partial(jax.jit, static_argnames=("max_new_tokens", "temperature", "top_p", "stop_tokens"))
def _generate(ip: InferParams, tokens_BxL, mask_BxL, key, *, max_new_tokens: int, temperature: float,
              top_p: float, stop_tokens: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
  """-> (new tokens, grid-barrier waits of persistent kernels that timed out: non-zero = wrong)."""
  B, L = tokens_BxL.shape
  T = max_new_tokens
  logits_BxV, cache = _prefill_cache(ip, tokens_BxL, mask_BxL, L + T)
  keys = jax.random.split(key, T)  # step t samples with keys[t], as model.generate does
  stops = jnp.asarray(stop_tokens or (-1,), jnp.int32)

  def sample(t, logits_BxV, done_B):
    tok_B = model.sample(logits_BxV, keys[t], temperature, top_p)
    if not stop_tokens:  # no row ever stops (and no per-token kernels for it)
      return tok_B, done_B
    tok_B = jnp.where(done_B, stops[0], tok_B)  # finished rows repeat the first stop token
    return tok_B, done_B | jnp.isin(tok_B, stops)

  def step(t, carry):  # sample token t, then feed it (the last token is never fed)
    logits_BxV, cache, done_B, out_BxT = carry
    tok_B, done_B = sample(t, logits_BxV, done_B)
    out_BxT = jax.lax.dynamic_update_slice(out_BxT, tok_B[:, None], (0, t))
    logits_BxV, cache = _decode_step(ip, tok_B, cache)
    return logits_BxV, cache, done_B, out_BxT

  # Unreached slots (every row stopped early) keep the stop token; all others are overwritten.
  carry = (logits_BxV, cache, jnp.zeros((B,), bool), jnp.full((B, T), stops[0], jnp.int32))
  if stop_tokens:  # a data-dependent trip count: one predicate read per token, exit when all stopped
    t, *carry = jax.lax.while_loop(lambda c: (c[0] < T - 1) & ~jnp.all(c[3]),
                                   lambda c: (c[0] + 1, *step(c[0], c[1:])), (jnp.int32(0), *carry))
  else:  # a static trip count
    t, carry = T - 1, jax.lax.fori_loop(0, T - 1, step, carry)
  logits_BxV, cache, done_B, out_BxT = carry
  tok_B, _ = sample(T - 1, logits_BxV, done_B)
  timeouts = sum((kernels.sync_timeouts(f) for f in cache["sync"] if f is not None), jnp.int32(0))
  return out_BxT.at[:, T - 1].set(jnp.where(t == T - 1, tok_B, out_BxT[:, T - 1])), timeouts


def generate(ip: InferParams, tokens_BxL, mask_BxL=None, *, max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, stop_tokens: tuple[int, ...] = (),
             key: jax.Array | None = None) -> jax.Array:
  """Prefill plus the whole decode loop in one jit -> new tokens int32 [B, max_new_tokens].

  Same conventions as `model.generate`: rows left-padded (mask 0 on the left); greedy when
  temperature is 0, else temperature/top-p sampling (step t uses `split(key, T)[t]`); after a
  stop token a row repeats the first stop token. With stop tokens the loop ends as soon as every
  row has stopped.
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  tokens = jnp.asarray(tokens_BxL, jnp.int32)
  mask = None if mask_BxL is None else jnp.asarray(mask_BxL, bool)
  key = jax.random.PRNGKey(0) if key is None else key
  out, timeouts = _generate(ip, tokens, mask, key, max_new_tokens=int(max_new_tokens),
                            temperature=float(temperature), top_p=float(top_p),
                            stop_tokens=tuple(int(t) for t in stop_tokens))
  if _decode_mode(ip, tokens.shape[0]) == "persistent" and int(timeouts):  # a host read only where barriers exist
    return generate(after_timeouts(ip, int(timeouts)), tokens, mask, key=key, max_new_tokens=max_new_tokens,
                    temperature=temperature, top_p=top_p, stop_tokens=stop_tokens)
  return out


def after_timeouts(ip: InferParams, timeouts: int) -> InferParams:
  """What `generate` decodes with after `timeouts` grid-barrier waits of the persistent kernel gave
  up (its tokens are wrong): where "auto" chose the kernel for speed, the five kernels (with a
  warning); where "persistent" was asked for, an error."""
  if ip.decode_impl == "auto":
    warnings.warn(f"generate: {timeouts} grid-barrier waits of the persistent decode kernel timed out "
                  "(not all of its programs were resident on the GPU); decoded again with decode_impl='pallas'")
    return dataclasses.replace(ip, decode_impl="pallas")
  raise RuntimeError(
      f"generate: {timeouts} grid-barrier waits of the persistent decode kernel timed out, so these tokens are "
      "wrong: not all of its programs were resident on the GPU at once (KernelConfig.programs above what fits, "
      "or other work holding SMs). Use decode_impl='pallas', or a lower KernelConfig(programs=...).")
