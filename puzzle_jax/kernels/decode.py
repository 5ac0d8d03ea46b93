"""The five-kernel decode block (Pallas, Triton backend on GPU; Pallas' interpreter elsewhere).

Decoding a small batch is latency-bound: a layer's weights stream in a few microseconds, but XLA
spends ~13 kernels on it (norm, projections, RoPE, two cache writes, score/softmax/value einsums,
residual adds, SiLU), each paying launch and tail. These kernels cut a layer to five:

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
extra kernel. Numerics follow `puzzle_jax.core.model` (float32 accumulation, projections rounded to the
activation dtype before the residual add and before SiLU) except that the normalized activations
and softmax weights are not rounded to bf16 before their products (exact in float32).
`reference_matmul` and `reference_decode_attention` are the same ops in plain jnp (the tests
compare them). Knobs: `KernelConfig` (a static argument).

Axis legend as in `puzzle_jax.infer`: B rows, D hidden, N output width (matmul) or query heads
(attention), K kv heads, G = N/K, S cache slots, H head dim, E = (N + 2K)H, A = NH, C cache chunks,
n stacked layers.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from puzzle_jax.kernels import triton_ops as tops
from puzzle_jax.kernels.config import DEFAULT, KernelConfig

F32 = jnp.float32
BLOCK_S = 128  # cache slots per attention block; caches are allocated in multiples of it


def _row_block(n: int, max_programs: int) -> int:
  """Output rows per program: the smallest power of two in [8, 64] dividing n whose grid fits in
  `max_programs` (one wave: a second wave would double the latency chain)."""
  bn = 8
  while bn < 64 and n % (2 * bn) == 0 and n // bn > max_programs:
    bn *= 2
  return bn


def _col_block(d: int, bn: int, tile: int) -> int:
  """Columns per tile: tile // bn (at least 128), or one masked power-of-two tile when that does
  not divide d (a partial tile's slice would run past the array)."""
  bd = min(pl.next_power_of_2(d), max(tile // bn, 128))
  return bd if d % bd == 0 else pl.next_power_of_2(d)


def supported(d: int, n: int) -> bool:
  """Whether `matmul` takes a [n, d] weight: n must split into power-of-two row blocks."""
  return d > 0 and n % 8 == 0


def qkv_width(num_heads: int, num_kv_heads: int, head_dim: int) -> int:
  """E, the fused q/k/v projection's width: (N + 2K) H."""
  return (num_heads + 2 * num_kv_heads) * head_dim


def head_dim_ok(h: int) -> bool:
  """`decode_attention` loads rotate-half halves of a head: h / 2 must be a power of two >= 16."""
  return h >= 32 and h & (h - 1) == 0


def _round(x, dt):
  return x.astype(dt).astype(F32)



# ----------------------------------------------------------------------------- matmul
def _col_tiles(d: int, bd: int) -> list:
  """Static column tiles of a width-d row: (slice, mask or None). A small D is one masked
  power-of-two tile: measured faster on the H100 than unmasked power-of-two pieces (576 = 512 + 64)."""
  return [(pl.ds(k * bd, bd), None if d % bd == 0 else (k * bd + jnp.arange(bd)) < d)
          for k in range(-(-d // bd))]


def _both(a, b):
  """a & b for load masks, where None means no mask."""
  return b if a is None else a if b is None else a & b


def _live(n: int, rows: int | None):
  """Mask of the first `rows` of n (None: all of them)."""
  return None if rows is None or rows >= n else jnp.arange(n) < rows


def _mv_weights(w_ref, lead: tuple, firsts: tuple, bn: int, tile, rows: int | None = None) -> list:
  """Rows [f, f + bn) of the weight, for each f in `firsts`, on one column tile (stored dtype);
  with `rows` < bn only the first `rows` of them (the rest read as 0, without memory traffic)."""
  cols, m = tile
  live = _live(bn, rows)
  m = _both(None if live is None else live[:, None], None if m is None else m[None, :])
  return [tops.load(w_ref, lead + (pl.ds(f, bn), cols), m) for f in firsts]


def _merged(o_ref, lse_ref, b, cols, m, dt):
  """The attention output on `cols` from `decode_attention`'s per-chunk partials ([B, C, A]
  normalized outputs and their log-sum-exp)."""
  mm = None if m is None else m[None, :]
  o, lse = (tops.load(r, (b, slice(None), cols), mm).astype(F32) for r in (o_ref, lse_ref))
  wgt = jnp.exp(lse - jnp.max(lse, axis=0)[None, :])  # chunk 0 holds the current token: max finite
  return _round(jnp.sum(wgt * o, axis=0) / jnp.sum(wgt, axis=0), dt)


def _mv(x_at, g_at, w_at, tiles: list, pre: list, *, eps: float, d: int, mark=lambda k, x: x,
        loaded=None) -> list:
  """Per weight block, sum over column tiles of [norm](x) . w, in float32. `pre`: the weights of
  the first len(pre) tiles, already in flight. With a norm, sum(x^2) and the product of g * x with
  the weight accumulate side by side and the 1/rms factor is applied at the end (one pass).
  Every x and g tile is loaded before any math: the reductions' CTA barriers would otherwise hold
  a later tile's load back (a second memory round trip on the phase's critical path)."""
  xs = [x_at(*tile) for tile in tiles]
  if loaded is not None:
    loaded()
  xs[0] = mark("data in", xs[0])
  gs = [g_at(*tile) for tile in tiles] if g_at is not None else [None] * len(tiles)
  acc, ss = None, 0.0
  for k, (tile, x, g) in enumerate(zip(tiles, xs, gs)):
    ws = pre[k] if k < len(pre) else w_at(tile)
    if g is not None:
      ss = ss + jnp.sum(x * x)
      x = x * g
    part = [jnp.sum(x[None, :] * w.astype(F32), axis=1) for w in ws]
    acc = part if acc is None else [a + q for a, q in zip(acc, part)]
  if g_at is not None:
    acc = [a / jnp.sqrt(ss / d + eps) for a in acc]
  return acc


def _mv_out(acc: list, swiglu: bool, dt, out_dt, res):
  """Rounding as the reference: projections to the activation dtype before SiLU and before the
  residual add."""
  if swiglu:
    g, up = (_round(a, dt) for a in acc)
    y = _round(g / (1.0 + jnp.exp(-g)), dt) * up  # SiLU, spelled out for Triton
  else:
    y = _round(acc[0], dt if res is not None else out_dt)
  return y if res is None else res + y


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
  firsts = (j * bn, n + j * bn) if swiglu else (j * bn,)  # SwiGLU: rows of [gate; up]
  tiles = _col_tiles(d, bd)

  def w_at(tile):
    return _mv_weights(w_ref, (), firsts, bn, tile)

  def x_at(cols, m):
    if prologue == "merge":
      return _merged(*x_refs, b, cols, m, dt)
    return tops.load(x_refs[0], (b, cols), m).astype(F32)

  g_at = (lambda cols, m: tops.load(g_ref, (cols,), m).astype(F32)) if prologue == "norm" else None
  pre = [w_at(tiles[0])]  # every load in flight before any math
  res = res_ref[b, rows].astype(F32) if has_res else None
  acc = _mv(x_at, g_at, w_at, tiles, pre, eps=eps, d=d)
  o_ref[b, rows] = _mv_out(acc, swiglu, dt, o_ref.dtype, res).astype(o_ref.dtype)


def _launch(prologue: str, xs: list, w: jax.Array, *, n: int, d: int, batch: int, out_dtype, cfg: KernelConfig,
            norm_D=None, residual_BxN=None, swiglu: bool = False, eps: float = 1e-5) -> jax.Array:
  if not supported(d, n):
    raise ValueError(f"matmul: {n} outputs do not split into power-of-two blocks of >= 8 rows")
  bn = _row_block(n, cfg.max_programs)
  bd = _col_block(d, bn, cfg.tile)
  args = xs + ([norm_D] if norm_D is not None else []) + [w.reshape(-1, d)]  # SwiGLU: [gate; up]
  args += [residual_BxN] if residual_BxN is not None else []
  kernel = functools.partial(_matmul_kernel, prologue=prologue, has_res=residual_BxN is not None,
                             swiglu=swiglu, eps=eps, d=d, n=n, bd=bd, bn=bn)
  warps = cfg.matmul_warps or (8 if bn * bd * (2 if swiglu else 1) >= cfg.tile else 4)
  return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((batch, n), out_dtype), grid=(batch, n // bn),
                        interpret=cfg.interpreted, compiler_params=tops.compiler_params(warps, cfg.interpreted))(*args)


def matmul(x_BxD: jax.Array, w: jax.Array, *, norm_D: jax.Array | None = None, eps: float = 1e-5,
           residual_BxN: jax.Array | None = None, swiglu: bool = False, out_dtype=None,
           cfg: KernelConfig = DEFAULT) -> jax.Array:
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
                 swiglu=swiglu, eps=eps, cfg=cfg)


def attn_out(partials: tuple[jax.Array, jax.Array], w_DxA: jax.Array, residual_BxD: jax.Array, *,
             cfg: KernelConfig = DEFAULT) -> jax.Array:
  """residual + merge(partials) @ w_o.T: `decode_attention`'s per-chunk softmax states merged
  (in every program: the whole attention output is an input of every output row) and projected."""
  o_BxCxA = partials[0]
  B, C, A = o_BxCxA.shape
  if w_DxA.shape[1] != A or C & (C - 1):
    raise ValueError(f"attn_out: partials {o_BxCxA.shape} (C a power of two) do not match w_o {w_DxA.shape}")
  return _launch("merge", list(partials), w_DxA, n=w_DxA.shape[0], d=A, batch=B, out_dtype=residual_BxD.dtype,
                 residual_BxN=residual_BxD, cfg=cfg)


# ----------------------------------------------------------------------------- attention
@dataclasses.dataclass(frozen=True)
class _AttnShape:
  num_heads: int
  num_kv: int
  head_dim: int
  chunk: int  # cache slots per program
  block: int  # slots per loop step (chunk == block: one step, loaded before any math)
  num_slots: int
  upto_index: bool = True  # `KernelConfig.kv_upto_index`


class _AttnRefs(NamedTuple):
  qkv: Any
  cos: Any
  sin: Any
  mask: Any
  k: Any  # caches read ([n, B, K, S, H])
  v: Any
  k_out: Any  # caches written (the same buffers, aliased)
  v_out: Any
  o: Any  # partials out ([B, C, A])
  lse: Any
  pos: Any = None  # [B] RoPE positions: then cos / sin are tables by position, else rows by batch row


def _kv_block(s: _AttnShape, r: _AttnRefs, b, kh, c, layer, t, first: bool = False, idx=None):
  """Cache slots [c chunk + t block, + block) of kv head kh: K and V halves, their mask bits.
  Block 0 is loaded before the chunk's length is known, and a chunk may lie past the cache's end
  (masked); later blocks are only visited below the current index. With `idx`, slots at or after
  it (never attended) are not read either: 0, without memory traffic."""
  half = s.head_dim // 2
  start = c * s.chunk + t * s.block
  sl, slots = pl.ds(start, s.block), start + jnp.arange(s.block)
  inside = (slots < s.num_slots) if first and s.chunk < s.num_slots else None
  if idx is not None and s.upto_index:
    inside = _both(inside, slots < idx)
  kv = [tops.load(ref, (layer, b, kh, sl, pl.ds(o, half)), None if inside is None else inside[:, None]).astype(F32)
        for ref in (r.k, r.v) for o in (0, half)]
  return kv, tops.load(r.mask, (b, sl), inside, 0) != 0, slots


def _attn_fetch(s: _AttnShape, r: _AttnRefs, b, n, c, layer, idx):
  """What a program can load before this token's q/k/v exist: its chunk's first cached block
  (below the current index)."""
  return _kv_block(s, r, b, n // (s.num_heads // s.num_kv), c, layer, 0, first=True, idx=idx)


def _attn(s: _AttnShape, r: _AttnRefs, b, n, c, layer, idx, pre, *, load, writes=True, mark=lambda k, x: x,
          dt=None):
  """Query head n of row b over cache chunk c (+ the new token in chunk 0): RoPE, the K/V write,
  online softmax -> (the chunk's normalized output halves, its log-sum-exp). `load(ref, idxs)`
  reads the q/k/v halves (float32); `pre`: the chunk's first block (`_attn_fetch`); `writes`:
  whether this program may write the token's K/V (the first query head of each kv group does, in
  chunk 0); dt: the activation dtype (default: q/k/v's)."""
  G, H, half = s.num_heads // s.num_kv, s.head_dim, s.head_dim // 2
  kh = n // G
  dt = dt or r.qkv.dtype
  row = b if r.pos is None else r.pos[b]
  cs, sn = r.cos[row, pl.ds(0, half)], r.sin[row, pl.ds(0, half)]

  def rope(x1, x2):  # rotate-half, rounded to the activation dtype as model.apply_rope's output is
    return _round(x1 * cs - x2 * sn, dt), _round(x2 * cs + x1 * sn, dt)

  # q, k and v are all loaded before any math (one memory round trip on the critical path)
  offs = (n * H, (s.num_heads + kh) * H, (s.num_heads + s.num_kv + kh) * H)
  x = load(r.qkv, [(b, pl.ds(off + o, half)) for off in offs for o in (0, half)])
  q, k, v = (x[0], x[1]), (x[2], x[3]), (x[4], x[5])
  q = mark("data in", q[0]), q[1]
  (q1, q2), (k1, k2) = rope(*q), rope(*k)
  v1, v2 = (_round(x, dt) for x in v)

  def write_kv():  # one program per kv head writes this token's K/V
    for ref, lo, hi in ((r.k_out, k1, k2), (r.v_out, v1, v2)):
      ref[layer, b, kh, idx, pl.ds(0, half)] = lo.astype(ref.dtype)
      ref[layer, b, kh, idx, pl.ds(half, half)] = hi.astype(ref.dtype)

  pl.when((n % G == 0) & (c == 0) & writes)(write_kv)
  scale = H ** -0.5

  def attend(blk, carry):  # online softmax over one block of cached slots
    (kb1, kb2, vb1, vb2), ok, slots = blk
    m, l, o1, o2 = carry
    sc = (jnp.sum(q1[None, :] * kb1, axis=1) + jnp.sum(q2[None, :] * kb2, axis=1)) * scale
    sc = jnp.where(ok & (slots < idx), sc, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(sc))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # nothing seen yet: keep exp() finite
    corr, p = jnp.exp(m - m_safe), jnp.exp(sc - m_safe)
    return (m_new, l * corr + jnp.sum(p),
            o1 * corr + jnp.sum(p[:, None] * vb1, axis=0), o2 * corr + jnp.sum(p[:, None] * vb2, axis=0))

  # Chunk 0 also holds the current token, from registers (its slot is being written concurrently);
  # it attends to itself, so the merged max is finite. Slots at or after idx are never used.
  mine = (c == 0).astype(F32)
  carry = (jnp.where(c == 0, (jnp.sum(q1 * k1) + jnp.sum(q2 * k2)) * scale, -jnp.inf), mine, v1 * mine, v2 * mine)
  carry = attend(pre, carry)
  carry = (*carry[:2], mark("half way", carry[2]), carry[3])  # timeline: the first block is attended
  if s.chunk > s.block:
    todo = jnp.clip((idx - c * s.chunk + s.block - 1) // s.block, 1, s.chunk // s.block)
    carry = jax.lax.fori_loop(1, todo, lambda t, cr: attend(_kv_block(s, r, b, kh, c, layer, t, idx=idx), cr),
                              carry)
  m, l, o1, o2 = carry
  empty = l == 0.0  # a chunk with no visible slot: weight exp(-inf) = 0 in the merge
  inv = 1.0 / jnp.where(empty, 1.0, l)
  return o1 * inv, o2 * inv, jnp.where(empty, -jnp.inf, m + jnp.log(jnp.where(empty, 1.0, l)))


def _attn_kernel(qkv_ref, cos_ref, sin_ref, mask_ref, meta_ref, k_in, v_in, o_ref, lse_ref, k_ref, v_ref,
                 *, shape: _AttnShape):
  b, n, c = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  layer, idx = meta_ref[0], meta_ref[1]
  r = _AttnRefs(qkv_ref, cos_ref, sin_ref, mask_ref, k_in, v_in, k_ref, v_ref, o_ref, lse_ref)
  pre = _attn_fetch(shape, r, b, n, c, layer, idx)  # every load in flight before any math
  o1, o2, lse = _attn(shape, r, b, n, c, layer, idx, pre, load=lambda ref, idxs: [tops.load(ref, i).astype(F32)
                                                                                   for i in idxs])
  H, half = shape.head_dim, shape.head_dim // 2
  for ref, lo, hi in ((o_ref, o1, o2), (lse_ref, lse, lse)):
    ref[b, c, pl.ds(n * H, half)] = jnp.broadcast_to(lo, (half,)).astype(ref.dtype)
    ref[b, c, pl.ds(n * H + half, half)] = jnp.broadcast_to(hi, (half,)).astype(ref.dtype)


def chunking(S: int, cfg: KernelConfig = DEFAULT) -> tuple[int, int]:
  """(slots per attention program, programs per head): a power-of-two chunk of at least `chunk_s`
  slots, and enough chunks to cover S rounded up to a power of two (<= `max_chunks`; chunks past the
  end of the cache are empty)."""
  chunk = max(cfg.chunk_s, pl.next_power_of_2(-(-S // cfg.max_chunks)))
  return chunk, pl.next_power_of_2(-(-S // chunk))


def decode_attention(qkv_BxE: jax.Array, cos_BxH: jax.Array, sin_BxH: jax.Array, mask_BxS: jax.Array,
                     k_cache: jax.Array, v_cache: jax.Array, layer, index, *, num_heads: int, num_kv_heads: int,
                     cfg: KernelConfig = DEFAULT) -> tuple[tuple[jax.Array, jax.Array], jax.Array, jax.Array]:
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
  if E != qkv_width(num_heads, num_kv_heads, H) or K != num_kv_heads or S % BLOCK_S or not head_dim_ok(H):
    raise ValueError(f"decode_attention: qkv {qkv_BxE.shape}, cache {k_cache.shape}, heads "
                     f"{num_heads}/{num_kv_heads}: need E = (N + 2K) H, S % {BLOCK_S} == 0, "
                     "H a power of two >= 32")
  chunk, C = chunking(S, cfg)
  meta = jnp.stack([jnp.asarray(layer, jnp.int32), jnp.asarray(index, jnp.int32)])
  shape = _AttnShape(num_heads, num_kv_heads, H, chunk, min(chunk, BLOCK_S), S, cfg.kv_upto_index)
  kernel = functools.partial(_attn_kernel, shape=shape)
  A = num_heads * H
  out = (jax.ShapeDtypeStruct((B, C, A), qkv_BxE.dtype), jax.ShapeDtypeStruct((B, C, A), F32),
         jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype), jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype))
  o, lse, k, v = pl.pallas_call(kernel, out_shape=out, grid=(B, num_heads, C), input_output_aliases={5: 2, 6: 3},
                                interpret=cfg.interpreted,
                                compiler_params=tops.compiler_params(cfg.attn_warps, cfg.interpreted))(
      qkv_BxE, cos_BxH.astype(F32), sin_BxH.astype(F32), mask_BxS.astype(jnp.int32), meta, k_cache, v_cache)
  return (o, lse), k, v




# ----------------------------------------------------------------------------- references
def _rms_normed(x_BxD, g_D, eps: float):
  x = x_BxD.astype(F32)
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * g_D.astype(F32)[None, :]


def reference_matmul(x_BxD, w, *, norm_D=None, eps: float = 1e-5, residual_BxN=None, swiglu: bool = False,
                     out_dtype=None) -> jax.Array:
  """`matmul` in plain jnp, with its rounding (projections to the activation dtype before SiLU and
  before the residual add)."""
  dt, out_dt = x_BxD.dtype, out_dtype or x_BxD.dtype
  x = x_BxD.astype(F32) if norm_D is None else _rms_normed(x_BxD, norm_D, eps)
  if swiglu:
    gu_Bx2xN = jnp.einsum("bd,tnd->btn", x, w.astype(F32))
    g, up = _round(gu_Bx2xN[:, 0], dt), _round(gu_Bx2xN[:, 1], dt)
    y = _round(jax.nn.silu(g), dt) * up
  else:
    y = _round(x @ w.astype(F32).T, dt if residual_BxN is not None else out_dt)
  return (y if residual_BxN is None else residual_BxN.astype(F32) + y).astype(out_dt)


def _rotate_half(x, cos, sin):
  h = x.shape[-1] // 2
  return x * cos + jnp.concatenate([-x[..., h:], x[..., :h]], axis=-1) * sin


def reference_decode_attention(qkv_BxE, cos_BxH, sin_BxH, mask_BxS, k_cache, v_cache, layer, index, *,
                               num_heads: int, num_kv_heads: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`decode_attention` followed by `attn_out`'s merge, in plain jnp -> (attention output [B, A] in
  the activation dtype, k_cache, v_cache): RoPE, the K/V write at slot `index` of layer `layer`,
  softmax over the slots before `index` where `mask_BxS` is set, plus the token itself."""
  B, _ = qkv_BxE.shape
  N, K, H, dt = num_heads, num_kv_heads, k_cache.shape[-1], qkv_BxE.dtype
  x = qkv_BxE.astype(F32)
  cos, sin = cos_BxH.astype(F32)[:, None], sin_BxH.astype(F32)[:, None]
  q_BxNxH = _round(_rotate_half(x[:, :N * H].reshape(B, N, H), cos, sin), dt)
  k_BxKxH = _round(_rotate_half(x[:, N * H:(N + K) * H].reshape(B, K, H), cos, sin), dt)
  v_BxKxH = _round(x[:, (N + K) * H:].reshape(B, K, H), dt)
  at = (layer, slice(None), slice(None), index)
  k_cache = k_cache.at[at].set(k_BxKxH.astype(k_cache.dtype))
  v_cache = v_cache.at[at].set(v_BxKxH.astype(v_cache.dtype))
  seen_BxS = (mask_BxS != 0) & (jnp.arange(k_cache.shape[3]) < index)[None, :]
  seen_BxS = seen_BxS.at[:, index].set(True)
  k, v = k_cache[layer].astype(F32), v_cache[layer].astype(F32)  # [B, K, S, H]
  q_BxKxGxH = q_BxNxH.reshape(B, K, N // K, H)
  s = jnp.einsum("bkgh,bksh->bkgs", q_BxKxGxH, k) * H ** -0.5
  w = jax.nn.softmax(jnp.where(seen_BxS[:, None, None, :], s, -jnp.inf), axis=-1)
  o = jnp.einsum("bkgs,bksh->bkgh", w, v).reshape(B, N * H)
  return o.astype(dt), k_cache, v_cache
