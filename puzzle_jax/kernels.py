"""Fused decode kernels (Pallas, Triton backend on GPU; Pallas' interpreter elsewhere).

Decoding a small batch is latency-bound: a SmolLM2 layer moves ~7 MB of weights (~2.5 us of HBM
time on an H100) but XLA spends ~13 kernels on it (norm, projections, RoPE, two cache writes,
score/softmax/value einsums, residual adds, SiLU), each 1-3 us of launch and tail. These kernels
cut a layer to five:

  1. `matmul(x, w_qkv, norm_D=g)`              RMSNorm + fused q/k/v projection
  2. `decode_attention(...)`                   RoPE on q and k, the K/V cache write, attention over
                                               one chunk of the cache per program (split-K)
  3. `attn_out(partials, w_o, residual)`       merge of the chunks + output projection + residual
  4. `matmul(h, w_gu, norm_D=g, swiglu=True)`  RMSNorm + gate/up projection + SiLU(gate) * up
  5. `matmul(a, w_d, residual_BxN=h)`          down projection + residual add

At batch 1 a kernel's time is its launch plus one chain of memory latencies, so each program
issues all its loads first and reduces once, and the grids are as wide as the work allows. A
matmul program computes `bn` outputs of one row from `bn` contiguous rows of the HF-layout [N, D]
weight (a matrix-vector product as a multiply-reduce: Triton's `dot` needs 16 rows); the norm's
sum of squares is accumulated next to the product and applied at the end. Attention splits the
cache into C chunks (flash-decoding); their partial softmax states are merged by every program of
the output projection, which needs the whole attention output anyway, so the split costs no
extra kernel. Numerics follow `puzzle_jax.model` (float32 accumulation, projections rounded to the
activation dtype before the residual add and before SiLU) except that the normalized activations
and softmax weights are not rounded to bf16 before their products (exact in float32).

Axis legend as in `puzzle_jax.infer`: B rows, D hidden, N output width (matmul) or query heads
(attention), K kv heads, G = N/K, S cache slots, H head dim, E = (N + 2K)H, A = NH, C cache chunks,
n stacked layers.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

F32 = jnp.float32
BLOCK_S = 128  # cache slots per attention block; caches are allocated in multiples of it
TILE = 16384  # weight elements per matmul program and step (registers: 4-8 warps)
# Launch knobs (module-level so benchmarks/decode_profile.py can sweep them; None = heuristic).
MATMUL_WARPS: int | None = 8  # measured: 8 >= heuristic > 4 > 2 on SmolLM2 shapes
ATTN_WARPS = 4
MAX_PROGRAMS = 264  # matmul row blocks grow (8 -> 64 rows) until the grid fits one wave (H100: 132 SMs x 2)
CHUNK_S = 64  # cache slots per attention program (the split-K grain)
MAX_CHUNKS = 8  # at most this many chunks (the merge reads C x A values per output program)


def _interpret() -> bool:
  return jax.default_backend() != "gpu"  # Triton lowering is GPU-only; elsewhere Pallas interprets


def _compiler_params(num_warps: int):
  if _interpret():
    return None
  from jax.experimental.pallas import triton as plt
  return plt.CompilerParams(num_warps=num_warps, num_stages=2)


def _load(ref, idx: tuple, mask, other: float = 0.0):
  """ref[idx], possibly past the end where `mask` is False (reads `other` there); one indexer
  only: Triton lowering takes no chained `.at`."""
  if mask is None:
    return ref[idx]
  from jax.experimental.pallas import triton as plt
  return plt.load(ref.at[idx], mask=mask, other=other)


def _row_block(n: int, max_programs: int) -> int:
  """Output rows per program: the smallest power of two in [8, 64] dividing n whose grid fits in
  `max_programs` (one wave: a second wave would double the latency chain)."""
  bn = 8
  while bn < 64 and n % (2 * bn) == 0 and n // bn > max_programs:
    bn *= 2
  return bn


def supported(d: int, n: int) -> bool:
  """Whether `matmul` takes a [n, d] weight: n must split into power-of-two row blocks."""
  return d > 0 and n % 8 == 0


def head_dim_ok(h: int) -> bool:
  """`decode_attention` loads rotate-half halves of a head: h / 2 must be a power of two >= 16."""
  return h >= 32 and h & (h - 1) == 0


def _round(x, dt):
  return x.astype(dt).astype(F32)


# ----------------------------------------------------------------------------- matmul
def _matmul_kernel(*refs, prologue: str, has_res: bool, swiglu: bool, eps: float, d: int, n: int, bd: int,
                   bn: int):
  """prologue: "none" (x), "norm" (RMSNorm(x) * g), "merge" (x = merged attention partials)."""
  it = iter(refs)
  x_refs = [next(it) for _ in range(2 if prologue == "merge" else 1)]
  g_ref = next(it) if prologue == "norm" else None
  w_ref = next(it)
  res_ref = next(it) if has_res else None
  o_ref = next(it)
  b, j = pl.program_id(0), pl.program_id(1)
  dt = o_ref.dtype if prologue == "merge" else x_refs[0].dtype
  rows = pl.ds(j * bn, bn)

  def w_at(first, cols, m):  # rows [first, first + bn) of the (for SwiGLU: [gate; up]) weight
    return _load(w_ref, (pl.ds(first, bn), cols), None if m is None else m[None, :]).astype(F32)

  def x_at(cols, m):
    if prologue != "merge":
      return _load(x_refs[0], (b, cols), m).astype(F32)
    o_ref_, lse_ref = x_refs  # [B, C, A]: per-chunk normalized outputs, their log-sum-exp
    mm = None if m is None else m[None, :]
    o, lse = (_load(r, (b, slice(None), cols), mm).astype(F32) for r in (o_ref_, lse_ref))
    wgt = jnp.exp(lse - jnp.max(lse, axis=0)[None, :])  # chunk 0 holds the current token: max finite
    return _round(jnp.sum(wgt * o, axis=0) / jnp.sum(wgt, axis=0), dt)  # the attention output

  # One pass, every load issued up front: with a norm, sum(x^2) and the product of g * x with the
  # weight accumulate side by side and the 1/rms factor is applied at the end.
  firsts = (j * bn, n + j * bn) if swiglu else (j * bn,)
  res = res_ref[b, rows].astype(F32) if has_res else None
  acc = (jnp.zeros((bn,), F32),) * len(firsts)
  ss = jnp.zeros((), F32)
  # Static and short (D * bn / TILE steps). A small D is one masked power-of-two tile: measured
  # faster on the H100 than unmasked power-of-two pieces (576 = 512 + 64).
  for k in range(-(-d // bd)):
    cols, m = pl.ds(k * bd, bd), (None if d % bd == 0 else (k * bd + jnp.arange(bd)) < d)
    ws = [w_at(f, cols, m) for f in firsts]
    x = x_at(cols, m)
    if prologue == "norm":
      ss = ss + jnp.sum(x * x)
      x = x * _load(g_ref, (cols,), m).astype(F32)
    acc = tuple(a + jnp.sum(x[None, :] * w, axis=1) for a, w in zip(acc, ws))
  if prologue == "norm":
    acc = tuple(a / jnp.sqrt(ss / d + eps) for a in acc)
  if swiglu:  # the reference rounds both projections, applies SiLU in the activation dtype
    g, up = (_round(a, dt) for a in acc)
    y = _round(g / (1.0 + jnp.exp(-g)), dt) * up  # SiLU, spelled out for Triton
  else:
    y = _round(acc[0], dt if has_res else o_ref.dtype)
  if has_res:
    y = res + y
  o_ref[b, rows] = y.astype(o_ref.dtype)


def _launch(prologue: str, xs: list, w: jax.Array, *, n: int, d: int, batch: int, out_dtype, norm_D=None,
            residual_BxN=None, swiglu: bool = False, eps: float = 1e-5) -> jax.Array:
  if not supported(d, n):
    raise ValueError(f"matmul: {n} outputs do not split into power-of-two blocks of >= 8 rows")
  bn = _row_block(n, MAX_PROGRAMS)
  bd = min(pl.next_power_of_2(d), max(TILE // bn, 128))
  args = xs + ([norm_D] if norm_D is not None else []) + [w.reshape(-1, d)]  # SwiGLU: [gate; up]
  args += [residual_BxN] if residual_BxN is not None else []
  kernel = functools.partial(_matmul_kernel, prologue=prologue, has_res=residual_BxN is not None,
                             swiglu=swiglu, eps=eps, d=d, n=n, bd=bd, bn=bn)
  warps = MATMUL_WARPS or (8 if bn * bd * (2 if swiglu else 1) >= TILE else 4)
  return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((batch, n), out_dtype), grid=(batch, n // bn),
                        interpret=_interpret(), compiler_params=_compiler_params(warps))(*args)


def matmul(x_BxD: jax.Array, w: jax.Array, *, norm_D: jax.Array | None = None, eps: float = 1e-5,
           residual_BxN: jax.Array | None = None, swiglu: bool = False, out_dtype=None) -> jax.Array:
  """y = [norm(x)] @ w.T [+ residual]; with `swiglu`, w is [2, F, D] (gate, up) and y = SiLU(gate) * up.

  Shapes: x [B, D]; w [N, D] (HF's [out, in]) or [2, N, D]; result [B, N] in `out_dtype`
  (default: x's dtype).
  """
  B, D = x_BxD.shape
  if w.shape[-1] != D or (swiglu and w.shape[:-2] != (2,)) or (not swiglu and w.ndim != 2):
    raise ValueError(f"matmul: x {x_BxD.shape} does not match w {w.shape} (swiglu={swiglu}); "
                     "w is [out, in] (or [2, out, in] with swiglu)")
  return _launch("norm" if norm_D is not None else "none", [x_BxD], w, n=w.shape[-2], d=D, batch=B,
                 out_dtype=out_dtype or x_BxD.dtype, norm_D=norm_D, residual_BxN=residual_BxN,
                 swiglu=swiglu, eps=eps)


def attn_out(partials: tuple[jax.Array, jax.Array], w_DxA: jax.Array,
             residual_BxD: jax.Array) -> jax.Array:
  """residual + merge(partials) @ w_o.T: `decode_attention`'s per-chunk softmax states merged
  (in every program: the whole attention output is an input of every output row) and projected."""
  o_BxCxA = partials[0]
  B, C, A = o_BxCxA.shape
  if w_DxA.shape[1] != A or C & (C - 1):
    raise ValueError(f"attn_out: partials {o_BxCxA.shape} (C a power of two) do not match w_o {w_DxA.shape}")
  return _launch("merge", list(partials), w_DxA, n=w_DxA.shape[0], d=A, batch=B, out_dtype=residual_BxD.dtype,
                 residual_BxN=residual_BxD)


# ----------------------------------------------------------------------------- attention
def _attn_kernel(qkv_ref, cos_ref, sin_ref, mask_ref, meta_ref, k_in, v_in, o_ref, lse_ref, k_ref, v_ref,
                 *, num_heads: int, num_kv: int, head_dim: int, chunk: int, block: int, num_slots: int):
  b, n, c = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  G, H, half = num_heads // num_kv, head_dim, head_dim // 2
  kh = n // G
  layer, idx = meta_ref[0], meta_ref[1]
  dt = qkv_ref.dtype

  one_block = chunk == block

  def kv_block(t):  # slots [c chunk + t block, + block): K and V halves, which to use
    start = c * chunk + t * block
    sl, slots = pl.ds(start, block), start + jnp.arange(block)
    inside = (slots < num_slots) if one_block else None  # a chunk may lie past the cache's end
    kv = [_load(ref, (layer, b, kh, sl, pl.ds(o, half)), None if inside is None else inside[:, None]).astype(F32)
          for ref in (k_in, v_in) for o in (0, half)]
    return kv, (_load(mask_ref, (b, sl), inside, 0) != 0) & (slots < idx)

  first = kv_block(0) if one_block else None  # every load in flight before any math
  cs, sn = cos_ref[b, pl.ds(0, half)], sin_ref[b, pl.ds(0, half)]

  def part(off):
    return qkv_ref[b, pl.ds(off, half)].astype(F32), qkv_ref[b, pl.ds(off + half, half)].astype(F32)

  def rope(off):  # rotate-half, rounded to the activation dtype as model.apply_rope's output is
    x1, x2 = part(off)
    return _round(x1 * cs - x2 * sn, dt), _round(x2 * cs + x1 * sn, dt)

  q1, q2 = rope(n * H)
  k1, k2 = rope((num_heads + kh) * H)
  v1, v2 = (_round(v, dt) for v in part((num_heads + num_kv + kh) * H))

  @pl.when((n % G == 0) & (c == 0))  # one program per kv head writes this token's K/V
  def _():
    for ref, lo, hi in ((k_ref, k1, k2), (v_ref, v1, v2)):
      ref[layer, b, kh, idx, pl.ds(0, half)] = lo.astype(ref.dtype)
      ref[layer, b, kh, idx, pl.ds(half, half)] = hi.astype(ref.dtype)

  scale = H ** -0.5

  def attend(blk, carry):  # online softmax over one block of cached slots
    (kb1, kb2, vb1, vb2), ok = blk
    m, l, o1, o2 = carry
    sc = (jnp.sum(q1[None, :] * kb1, axis=1) + jnp.sum(q2[None, :] * kb2, axis=1)) * scale
    sc = jnp.where(ok, sc, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(sc))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # nothing seen yet: keep exp() finite
    corr, p = jnp.exp(m - m_safe), jnp.exp(sc - m_safe)
    return (m_new, l * corr + jnp.sum(p),
            o1 * corr + jnp.sum(p[:, None] * vb1, axis=0), o2 * corr + jnp.sum(p[:, None] * vb2, axis=0))

  # Chunk 0 also holds the current token, from registers (its slot is being written concurrently);
  # it attends to itself, so the merged max is finite. Slots at or after idx are never used.
  mine = (c == 0).astype(F32)
  carry = (jnp.where(c == 0, (jnp.sum(q1 * k1) + jnp.sum(q2 * k2)) * scale, -jnp.inf), mine, v1 * mine, v2 * mine)
  if one_block:
    carry = attend(first, carry)
  else:
    todo = jnp.clip((idx - c * chunk + block - 1) // block, 0, chunk // block)
    carry = jax.lax.fori_loop(0, todo, lambda t, cr: attend(kv_block(t), cr), carry)
  m, l, o1, o2 = carry
  empty = l == 0.0  # a chunk with no visible slot: weight exp(-inf) = 0 in the merge
  inv = 1.0 / jnp.where(empty, 1.0, l)
  lse = jnp.where(empty, -jnp.inf, m + jnp.log(jnp.where(empty, 1.0, l)))
  for ref, lo, hi in ((o_ref, o1 * inv, o2 * inv), (lse_ref, lse, lse)):
    ref[b, c, pl.ds(n * H, half)] = jnp.broadcast_to(lo, (half,)).astype(ref.dtype)
    ref[b, c, pl.ds(n * H + half, half)] = jnp.broadcast_to(hi, (half,)).astype(ref.dtype)


def chunking(S: int) -> tuple[int, int]:
  """(slots per attention program, programs per head): a power-of-two chunk of at least CHUNK_S
  slots, and enough chunks to cover S rounded up to a power of two (<= MAX_CHUNKS; chunks past the
  end of the cache are empty)."""
  chunk = max(CHUNK_S, pl.next_power_of_2(-(-S // MAX_CHUNKS)))
  return chunk, pl.next_power_of_2(-(-S // chunk))


def decode_attention(qkv_BxE: jax.Array, cos_BxH: jax.Array, sin_BxH: jax.Array, mask_BxS: jax.Array,
                     k_cache: jax.Array, v_cache: jax.Array, layer, index, *, num_heads: int,
                     num_kv_heads: int) -> tuple[tuple[jax.Array, jax.Array, jax.Array], jax.Array, jax.Array]:
  """One new token per row: RoPE on its q/k (from the fused projection), its K/V written to slot
  `index` of layer `layer` of the stacked caches [n, B, K, S, H] (in place: they are aliased to the
  outputs), attention over the cache slots before `index` where `mask_BxS` is set, plus the token.

  Returns (partials, k_cache, v_cache): partials = per cache chunk [B, C, N*H] the chunk's
  softmax-normalized output (activation dtype) and its float32 log-sum-exp (repeated over each
  head's H lanes; -inf for a chunk with nothing visible), for `attn_out`.
  S must be a multiple of BLOCK_S.
  """
  B, E = qkv_BxE.shape
  n, _, K, S, H = k_cache.shape
  if E != (num_heads + 2 * num_kv_heads) * H or K != num_kv_heads or S % BLOCK_S or not head_dim_ok(H):
    raise ValueError(f"decode_attention: qkv {qkv_BxE.shape}, cache {k_cache.shape}, heads "
                     f"{num_heads}/{num_kv_heads}: need E = (N + 2K) H, S % {BLOCK_S} == 0, "
                     "H a power of two >= 32")
  chunk, C = chunking(S)
  meta = jnp.stack([jnp.asarray(layer, jnp.int32), jnp.asarray(index, jnp.int32)])
  kernel = functools.partial(_attn_kernel, num_heads=num_heads, num_kv=num_kv_heads, head_dim=H, chunk=chunk,
                             block=min(chunk, BLOCK_S), num_slots=S)
  A = num_heads * H
  out = (jax.ShapeDtypeStruct((B, C, A), qkv_BxE.dtype), jax.ShapeDtypeStruct((B, C, A), F32),
         jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype), jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype))
  o, lse, k, v = pl.pallas_call(kernel, out_shape=out, grid=(B, num_heads, C), input_output_aliases={5: 2, 6: 3},
                                interpret=_interpret(), compiler_params=_compiler_params(ATTN_WARPS))(
      qkv_BxE, cos_BxH.astype(F32), sin_BxH.astype(F32), mask_BxS.astype(jnp.int32), meta, k_cache, v_cache)
  return (o, lse), k, v
