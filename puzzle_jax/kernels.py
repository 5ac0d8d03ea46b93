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
extra kernel. Numerics follow `puzzle_jax.core.model` (float32 accumulation, projections rounded to the
activation dtype before the residual add and before SiLU) except that the normalized activations
and softmax weights are not rounded to bf16 before their products (exact in float32).

`decode_segment` runs a whole run of identical layers in one persistent kernel (one program per
SM, grid barriers instead of kernel boundaries, next-phase weights loaded while waiting) with
three phases per gqa + SwiGLU layer instead of five: attention and the output projection are
one phase (each item attends over the whole cache for one head, then adds its head's share of
o_proj), and so are gate/up and down (each item adds its FFN rows' share of down); the shares
are summed by relaxed float32 atomics into a float32 residual. It is correct on the GPU and at
parity with the five kernels on an H200 (468-525 vs 477-481 us per SmolLM2 token, run to run),
so `infer` uses it only when asked (`decode_impl="persistent"`); see BENCHMARKS.md.

Axis legend as in `puzzle_jax.infer`: B rows, D hidden, N output width (matmul) or query heads
(attention), K kv heads, G = N/K, S cache slots, H head dim, E = (N + 2K)H, A = NH, C cache chunks,
n stacked layers.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

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
KV_UPTO_INDEX = True  # cached K/V read only below the current index (a growing cache: less traffic)


def _interpret() -> bool:
  return jax.default_backend() != "gpu"  # Triton lowering is GPU-only; elsewhere Pallas interprets


def _compiler_params(num_warps: int):
  if _interpret():
    return None
  from jax.experimental.pallas import triton as plt
  return plt.CompilerParams(num_warps=num_warps, num_stages=2)


def _load(ref, idx: tuple, mask=None, other: float = 0.0, *, l2: bool = False):
  """ref[idx], possibly past the end where `mask` is False (reads `other` there); one indexer
  only: Triton lowering takes no chained `.at`. `l2`: a volatile load past the L1 cache, for data
  other programs wrote earlier in the same (persistent) kernel; plain in the interpreter."""
  l2 = l2 and not _interpret()
  if mask is None and not l2:
    return ref[idx]
  from jax.experimental.pallas import triton as plt
  return plt.load(ref.at[idx], mask=mask, other=None if mask is None else other, volatile=l2)


def _row_block(n: int, max_programs: int) -> int:
  """Output rows per program: the smallest power of two in [8, 64] dividing n whose grid fits in
  `max_programs` (one wave: a second wave would double the latency chain)."""
  bn = 8
  while bn < 64 and n % (2 * bn) == 0 and n // bn > max_programs:
    bn *= 2
  return bn


def _col_block(d: int, bn: int) -> int:
  """Columns per tile: TILE // bn (at least 128), or one masked power-of-two tile when that does
  not divide d (a partial tile's slice would run past the array)."""
  bd = min(pl.next_power_of_2(d), max(TILE // bn, 128))
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


# ----------------------------------------------------------------------------- grid barrier
# A persistent kernel (one program per SM, all resident at once) replaces kernel boundaries by
# grid barriers. Arrival comes after a CTA barrier, so every thread's writes precede the arriving
# atomic's release. Two kinds (BARRIER):
#   "counter": programs add 1 to a counter and spin until it reaches k * P at the call's k-th
#     barrier (one word polled). Calls alternate between two counters (by the parity of the decode
#     index, which grows by one per call); each call zeroes the other one for the next call.
#   "flags": program p writes epoch e into flags[p]; waiting spins until the minimum of all flags
#     reaches e (P words polled and reduced across the CTA). Epochs only grow over the flags'
#     lifetime (callers derive them from the decode step), so the flags need no reset.
# Spins are volatile (L1-bypassing) loads; data written inside the kernel is read the same way
# (from L2; an SM's L1 may hold stale lines; Pallas' `.cg` cache modifier does not lower in jax 0.10).
# A wait that spins past MAX_SPIN polls (a program that is not resident would otherwise hang the
# GPU) gives up and counts itself in flags[P]: results are then wrong and `sync_timeouts` says so.
MAX_SPIN = 1 << 14
BARRIER = "counter"  # H200, SmolLM2: 15.5 us per layer vs 16.5 with "flags" (469 vs 480 us per token)


def sync_flags(programs: int) -> jax.Array:
  """Fresh barrier state for `programs` programs: their flags (or, from the first two, the
  counters), then the timeout count."""
  return jnp.zeros((programs + 1,), jnp.int32)


def sync_timeouts(flags) -> jax.Array:
  """Barrier / poll waits that timed out, from flags or a `SegmentState`."""
  return _flags_of(flags)[-1]


def _arrive(flags_ref, p, epoch, counter=None):
  """Program p is done with barrier `epoch` (flags), or adds itself to flags[counter] -> the
  word's old value (something a timer can wait for)."""
  from jax.experimental.pallas import triton as plt
  plt.debug_barrier()
  if counter is None:
    return plt.atomic_xchg(flags_ref, (p,), epoch)
  return plt.atomic_add(flags_ref, (counter,), 1)


def _wait(flags_ref, programs: int, epoch, counter=None):
  """Spin until all `programs` arrived at barrier `epoch` (with a counter: the call's epoch-th)
  -> whether they did (False: timed out)."""
  from jax.experimental.pallas import triton as plt
  pp = max(pl.next_power_of_2(programs), 16)
  lanes = jnp.arange(pp)

  def passed():
    if counter is not None:
      return plt.load(flags_ref.at[counter], volatile=True) >= epoch * programs
    f = plt.load(flags_ref.at[pl.ds(0, pp)], mask=lanes < programs, other=jnp.iinfo(jnp.int32).max,
                 volatile=True)
    return jnp.min(f) >= epoch

  _, pending = _spin(lambda: (None, ~passed()), flags_ref)
  return ~pending


def _spin(read, flags_ref):
  """read() -> (value, pending), repeated while pending, at most MAX_SPIN more times -> the last
  (value, pending). A spin that gives up counts a timeout in flags[-1] (results are then wrong)."""
  value, pending, _ = jax.lax.while_loop(lambda c: c[1] & (c[2] < MAX_SPIN), lambda c: (*read(), c[2] + 1),
                                         (*read(), jnp.int32(0)))
  pl.when(pending)(lambda: _count_timeout(flags_ref))
  return value, pending


def _count_timeout(flags_ref) -> None:
  """flags[-1] += 1: a wait gave up (results are wrong; `sync_timeouts` reports it)."""
  _atomic_add(flags_ref, (jnp.int32(flags_ref.shape[0] - 1),), jnp.int32(1))


def _asm(asm: str, constraints: str, args: list, dtype):
  """Elementwise inline PTX over same-shaped args (a scalar goes through a 1-element block)."""
  from jax.experimental.pallas import triton as plt
  shape = jnp.shape(args[0])
  blocks = [jnp.broadcast_to(a, shape or (1,)) for a in args]
  [y] = plt.elementwise_inline_asm(asm, args=blocks, constraints=constraints, pack=1,
                                   result_shape_dtypes=[jax.ShapeDtypeStruct(shape or (1,), dtype)])
  return y if shape else jnp.sum(y)


def _clock(after) -> jax.Array:
  """This SM's cycle counter (int32, wraps), read per element of `after` once it is known (the data
  dependence keeps the read behind what produced it). 0 in the interpreter. Profiling only."""
  if _interpret():
    return jnp.zeros(jnp.shape(after), jnp.int32)
  float_ = jnp.issubdtype(jnp.result_type(after), jnp.floating)
  return _asm("mov.u32 $0, %clock;", "=r," + ("f" if float_ else "r"), [after], jnp.int32)


def _gate(x, t):
  """x, made to depend on clock readings t (NaN / 0 where t == 2**32 - 1: never in practice), so
  that what uses x waits for the reading and the compiler cannot sink the reading past it."""
  if _interpret():
    return x
  if jnp.issubdtype(jnp.result_type(x), jnp.floating):
    return _asm("{ .reg .pred p; setp.eq.u32 p, $2, 4294967295; selp.f32 $0, 0f7FC00000, $1, p; }", "=f,f,r",
                [x, t], jnp.float32)
  return _asm("{ .reg .pred p; setp.eq.u32 p, $2, 4294967295; selp.b32 $0, 0, $1, p; }", "=r,r,r", [x, t],
              jnp.int32)


def _call_counter(flags_ref, p, call):
  """BARRIER "counter": this call's counter (by the parity of its number, which grows by one per
  call); program 0 zeroes the other one for the next call (nobody polls it during this call)."""
  counter = jax.lax.rem(call, 2)
  pl.when(p == 0)(lambda: flags_ref.__setitem__(1 - counter, jnp.int32(0)))
  return counter


_load_l2 = functools.partial(_load, l2=True)


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
  return [_load(w_ref, lead + (pl.ds(f, bn), cols), m) for f in firsts]


def _merged(o_ref, lse_ref, b, cols, m, dt):
  """The attention output on `cols` from `decode_attention`'s per-chunk partials ([B, C, A]
  normalized outputs and their log-sum-exp)."""
  mm = None if m is None else m[None, :]
  o, lse = (_load(r, (b, slice(None), cols), mm).astype(F32) for r in (o_ref, lse_ref))
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
    return _load(x_refs[0], (b, cols), m).astype(F32)

  g_at = (lambda cols, m: _load(g_ref, (cols,), m).astype(F32)) if prologue == "norm" else None
  pre = [w_at(tiles[0])]  # every load in flight before any math
  res = res_ref[b, rows].astype(F32) if has_res else None
  acc = _mv(x_at, g_at, w_at, tiles, pre, eps=eps, d=d)
  o_ref[b, rows] = _mv_out(acc, swiglu, dt, o_ref.dtype, res).astype(o_ref.dtype)


def _launch(prologue: str, xs: list, w: jax.Array, *, n: int, d: int, batch: int, out_dtype, norm_D=None,
            residual_BxN=None, swiglu: bool = False, eps: float = 1e-5) -> jax.Array:
  if not supported(d, n):
    raise ValueError(f"matmul: {n} outputs do not split into power-of-two blocks of >= 8 rows")
  bn = _row_block(n, MAX_PROGRAMS)
  bd = _col_block(d, bn)
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
@dataclasses.dataclass(frozen=True)
class _AttnShape:
  num_heads: int
  num_kv: int
  head_dim: int
  chunk: int  # cache slots per program
  block: int  # slots per loop step (chunk == block: one step, loaded before any math)
  num_slots: int


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


def _when(cond, fn) -> None:
  """fn() where `cond` holds (a Python True runs it unconditionally)."""
  if cond is True:
    fn()
  else:
    pl.when(cond)(fn)


def _kv_block(s: _AttnShape, r: _AttnRefs, b, kh, c, layer, t, first: bool = False, idx=None):
  """Cache slots [c chunk + t block, + block) of kv head kh: K and V halves, their mask bits.
  Block 0 is loaded before the chunk's length is known, and a chunk may lie past the cache's end
  (masked); later blocks are only visited below the current index. With `idx`, slots at or after
  it (never attended) are not read either: 0, without memory traffic."""
  half = s.head_dim // 2
  start = c * s.chunk + t * s.block
  sl, slots = pl.ds(start, s.block), start + jnp.arange(s.block)
  inside = (slots < s.num_slots) if first and s.chunk < s.num_slots else None
  if idx is not None and KV_UPTO_INDEX:
    inside = _both(inside, slots < idx)
  kv = [_load(ref, (layer, b, kh, sl, pl.ds(o, half)), None if inside is None else inside[:, None]).astype(F32)
        for ref in (r.k, r.v) for o in (0, half)]
  return kv, _load(r.mask, (b, sl), inside, 0) != 0, slots


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
  o1, o2, lse = _attn(shape, r, b, n, c, layer, idx, pre, load=lambda ref, idxs: [_load(ref, i).astype(F32)
                                                                                   for i in idxs])
  H, half = shape.head_dim, shape.head_dim // 2
  for ref, lo, hi in ((o_ref, o1, o2), (lse_ref, lse, lse)):
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
  if E != qkv_width(num_heads, num_kv_heads, H) or K != num_kv_heads or S % BLOCK_S or not head_dim_ok(H):
    raise ValueError(f"decode_attention: qkv {qkv_BxE.shape}, cache {k_cache.shape}, heads "
                     f"{num_heads}/{num_kv_heads}: need E = (N + 2K) H, S % {BLOCK_S} == 0, "
                     "H a power of two >= 32")
  chunk, C = chunking(S)
  meta = jnp.stack([jnp.asarray(layer, jnp.int32), jnp.asarray(index, jnp.int32)])
  kernel = functools.partial(_attn_kernel, shape=_AttnShape(num_heads, num_kv_heads, H, chunk,
                                                             min(chunk, BLOCK_S), S))
  A = num_heads * H
  out = (jax.ShapeDtypeStruct((B, C, A), qkv_BxE.dtype), jax.ShapeDtypeStruct((B, C, A), F32),
         jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype), jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype))
  o, lse, k, v = pl.pallas_call(kernel, out_shape=out, grid=(B, num_heads, C), input_output_aliases={5: 2, 6: 3},
                                interpret=_interpret(), compiler_params=_compiler_params(ATTN_WARPS))(
      qkv_BxE, cos_BxH.astype(F32), sin_BxH.astype(F32), mask_BxS.astype(jnp.int32), meta, k_cache, v_cache)
  return (o, lse), k, v


# ----------------------------------------------------------------------------- persistent segment
# One kernel for a run of identical decode layers: one program per SM, the layers' phases spread
# over the programs, grid barriers between phases instead of kernel boundaries. A gqa + SwiGLU
# layer is three phases, each ending where the next needs every output of it:
#   1. RMSNorm + q/k/v projection                                  (`_Matvec`, into scratch "qkv")
#   2. attention + output projection: an item per (query head, block of residual rows) attends over
#      the whole cache (RoPE, K/V write) and adds its head's share of o_proj   (`_AttnOut`)
#   3. RMSNorm + gate/up + SiLU * up + down: an item per block of FFN rows adds its rows' share of
#      the down projection                                                     (`_FFN`)
# Split-K shares are summed by float32 atomics, so the residual stream lives in float32 scratch,
# three buffers in rotation. A phase that reads the whole residual and adds to it ("flips": the
# FFN, linear sub-blocks) reads buffer t % 3, writes t + 1 (zeroed before; the FFN's item (b, 0)
# adds the residual itself) and zeroes t + 2 (whose last reader was the flip before); with a
# `SegmentState` the rotation goes on across calls and the call's input is read in place. In bf16,
# phase 1 stores q/k/v as tagged words (`_poll_tagged`) and has no barrier after it: an attention
# item polls the rows of its head, and as a slow program may still be reading the residual, the
# attention flips too (head 0's items add the residual rows). Otherwise (float32 activations) a
# barrier follows phase 1 and attention adds in place. While waiting at a barrier each program already loads
# what its next phase needs that does not depend on the phase before (weights, cached K/V); the
# attention's cache block, its largest load, is issued earlier still, during the q/k/v phase.
# Where the time goes (`decode_segment(timeline=True)`, benchmarks/segment_profile.py --timeline):
# a phase's loads into registers arrive at ~18 bytes per SM cycle, so a barrier before a big
# prefetch (attention 72 KB, FFN 55 KB per program) lasts that long, not the ~1,500 cycles of a
# bare one; each phase's release (its adds reaching L2) takes another ~1,500.
# Knobs (benchmarks/segment_profile.py sweeps them; H200, SmolLM2 shapes, us per layer: 13.5-14.0;
# session 4's settings, 4 warps and 128-slot steps: 14.2-15.5):
PERSISTENT_PROGRAMS: int | None = None  # None: one per SM (two per SM: 18.0; they must all be resident)
PERSISTENT_WARPS = 8  # with 256-slot attention steps (with 4 warps those spill registers)
PERSISTENT_ATTN_BLOCK = 256  # cache slots per attention step (the largest dividing S), the first loaded early
PERSISTENT_FFN_ROWS: int | None = None  # None: `_ffn_rows` (SmolLM2: 12 in 16-row tiles; 32 rows spill: 25.1)
PERSISTENT_EARLY_KV = True  # the cache block loaded during the q/k/v phase: 13.51 vs 13.69 at the barrier
PERSISTENT_QKV_TAGS = True  # bf16 q/k/v as tagged words: no grid barrier between q/k/v and attention
PERSISTENT_FFN_PIECES = True  # D in unmasked power-of-two pieces (576 = 512 + 64); one masked tile: slower
# Programs without an item in a phase hint L2 to fetch the next phase's weights meanwhile, in equal
# shares, so that the register loads of that phase (issued at the barrier) come from L2. "all": every
# phase with idle programs (SmolLM2: attention, 51 of 132 idle: the FFN's 5.3 MB; q/k/v, 12 idle:
# o_proj's weights; FFN, 4 idle: the next layer's q/k/v); "ffn": only during attention; "": off.
PERSISTENT_IDLE_PREFETCH = "all"
PREFETCH_LINES = 512  # prefetch requests per loop step (8 warps: 2 per thread)
PROFILE_SKIP: frozenset = frozenset()  # phase positions whose work is skipped (barriers kept): timing only
PROFILE_LAYER0 = False  # every layer reads layer 0's weights and cache (L2-resident): timing only
TIMELINE_POINTS = ("arrived", "left", "data in", "half way", "result")  # decode_segment(timeline=True) columns


def persistent_programs() -> int:
  """Programs of a persistent kernel on this backend: one per SM on GPU (all resident at once,
  which the barriers need), 1 in the interpreter (which runs programs one after another)."""
  if _interpret():
    return 1
  return PERSISTENT_PROGRAMS or getattr(jax.devices()[0], "core_count", 0) or 108


def _attn_block(S: int) -> int:
  """Cache slots per persistent attention step: PERSISTENT_ATTN_BLOCK or less, dividing S (a
  multiple of BLOCK_S) so that the steps cover the cache exactly."""
  block = min(S, PERSISTENT_ATTN_BLOCK)
  while S % block:
    block //= 2
  return block


def _pieces(d: int) -> list:
  """Column tiles covering d exactly with unmasked power-of-two widths (576 -> 512 + 64): no
  masked lanes in registers that stay live across a barrier."""
  tiles, start = [], 0
  for bit in reversed(range(d.bit_length())):
    if d >> bit & 1:
      tiles.append((pl.ds(start, 1 << bit), None))
      start += 1 << bit
  return tiles


@functools.cache
def _relaxed_add_p():
  """A float atomic add with relaxed ordering (PTX `red.relaxed.gpu`). Pallas' `atomic_add` is
  acquire-release, a fence around every element's add (measured on the H200: 17.5 us per SmolLM2
  layer with it, 15.7 relaxed). Sums need no ordering of their own: the barrier's release
  (`_arrive`) orders them before the next phase. Pallas' own lowering rule, called with the
  ordering swapped (private jax API; tests/test_kernels.py checks it on the installed jax)."""
  from jax._src import core as jax_core
  from jax._src.lib.triton import dialect as tt
  from jax._src.pallas.triton import lowering as tl, primitives as tp
  prim = jax_core.Primitive("atomic_add_relaxed")
  prim.def_effectful_abstract_eval(functools.partial(tp._atomic_abstract_eval, atomic_type=tp.AtomicOpType.ADD))

  def lower(ctx, *args, args_tree):
    acq_rel = tl._atomic_rmw
    tl._atomic_rmw = functools.partial(acq_rel, semantic=tt.MemSemantic.RELAXED)
    try:
      return tp._atomic_lowering_rule(ctx, *args, args_tree=args_tree, atomic_type=tp.AtomicOpType.ADD)
    finally:
      tl._atomic_rmw = acq_rel

  tl.register_lowering(prim)(lower)
  return prim


def _atomic_add(ref, idx: tuple, val, mask=None) -> None:
  """ref[idx] += val from many programs at once (relaxed; plain in the interpreter's one program)."""
  if _interpret():
    from jax.experimental.pallas import triton as plt
    plt.store(ref.at[idx], _load(ref, idx, mask) + val, mask=mask)
    return
  from jax._src import tree_util
  from jax._src.state import primitives as sp
  ref, transforms = sp.get_ref_and_transforms(ref, idx, "atomic_add_relaxed")
  args, tree = tree_util.tree_flatten((ref, transforms, val, mask))
  _relaxed_add_p().bind(*args, args_tree=tree)


@functools.cache
def _prefetch_p():
  """ref[point] + offsets, where mask: a hint to pull those lines from memory into L2
  (`prefetch.global.L2`). No registers are written and nothing waits for the data, unlike a
  load. A Pallas primitive with its own Triton lowering (private jax API, as `_relaxed_add_p`;
  tests/test_kernels.py lowers it on the installed jax)."""
  from jax._src import core as jax_core, state
  from jax._src.lib.mlir import ir
  from jax._src.lib.triton import dialect as tt
  from jax._src.pallas.triton import lowering as tl
  prim = jax_core.Primitive("prefetch_l2")
  prim.multiple_results = True
  # A write effect, although nothing is written: jax drops an eqn whose only effect is a read.
  prim.def_effectful_abstract_eval(lambda *avals, args_tree: ([], {state.WriteEffect(0)}))

  def lower(ctx, *args, args_tree):
    ptr, (point,), offsets, mask = args_tree.unflatten(args)
    ptrs = tl._add(tl._bcast_to(tl._compute_pointers_from_indices(ptr, ctx.block_infos[0], point),
                                ctx.avals_in[-2].shape), offsets)
    i32 = ir.IntegerType.get_signless(32)
    # The dummy result keeps Triton's op shape; `pure=False` keeps the op although nothing reads it.
    tt.elementwise_inline_asm([ir.RankedTensorType.get(ctx.avals_in[-2].shape, i32)],
                              "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.u32 $0, 0; }",
                              constraints="=r,l,r", pure=False, packed_element=1, args=[ptrs, mask])
    return []

  tl.register_lowering(prim)(lower)
  return prim


def _prefetch_share(ref, lead: tuple, k, n: int) -> None:
  """Hint L2 to fetch share k (of n, traced) of ref[lead] (contiguous: the trailing axes), one
  request per 128-byte line, PREFETCH_LINES lines per loop step (a whole share at once would hold
  its addresses in registers). A no-op in the interpreter (it has no caches)."""
  if _interpret():
    return
  from jax._src import tree_util
  from jax._src.state import primitives as sp
  per = 128 // jnp.dtype(ref.dtype).itemsize  # elements per line
  lines = -(-math.prod(ref.shape[len(lead):]) // per)
  ref, transforms = sp.get_ref_and_transforms(ref, lead + (0,) * (len(ref.shape) - len(lead)), "prefetch_l2")

  def body(t, carry):
    i, mask = _share_lines(lines, n, k, t)
    args, tree = tree_util.tree_flatten((ref, transforms, (i * per).astype(jnp.int32), mask.astype(jnp.int32)))
    _prefetch_p().bind(*args, args_tree=tree)
    return carry

  jax.lax.fori_loop(0, _share_steps(lines, n)[2], body, 0)


def _share_steps(lines: int, n: int) -> tuple[int, int, int]:
  """(lines per share, lines per loop step, loop steps) of one of n shares of `lines` lines."""
  share = -(-lines // n)
  step = min(PREFETCH_LINES, pl.next_power_of_2(share))
  return share, step, -(-share // step)


def _share_lines(lines: int, n: int, k, t):
  """Loop step t of share k of n over `lines` lines: (line numbers, mask of those in the share)."""
  share, step, _ = _share_steps(lines, n)
  i = k * share + t * step + jnp.arange(step)
  return i, (i < (k + 1) * share) & (i < lines)


# Tagged q/k/v (PERSISTENT_QKV_TAGS): each bf16 q/k/v value is stored with a 16-bit tag of its
# layer in one 32-bit word (the value's float32 bits, whose low half is zero for a bf16 value, or
# the tag). A reader polls the words it needs until all carry the layer's tag: a single-copy
# atomic word needs no release fence, so the q/k/v phase ends without a grid barrier, and each
# attention item waits only for the programs that computed its head's rows.
def _tag_of(n):
  """A layer's tag from a number unique to it in this call and the next (never 0: the buffer
  starts zeroed)."""
  return jax.lax.rem(n, 65535) + 1


def _tagged(y, tag):
  """float32 values that are exact in bf16 -> words carrying `tag`."""
  return jax.lax.bitwise_or(jax.lax.bitcast_convert_type(y, jnp.int32) & -65536, tag)


def _poll_tagged(ref, idxs: list, tag, flags_ref) -> list:
  """The words at idxs (blocks of one shape) once all carry `tag` -> their float32 values (`_spin`:
  after MAX_SPIN polls, a timeout is counted, as for a barrier wait, and what was read is returned)."""
  def once():
    ws = [_load_l2(ref, i) for i in idxs]
    # elementwise over the blocks first: one reduction per poll instead of one per block
    return ws, jnp.max(functools.reduce(jnp.maximum, [((w & 0xFFFF) != tag).astype(jnp.int32) for w in ws])) > 0

  ws, _ = _spin(once, flags_ref)
  return [jax.lax.bitcast_convert_type(w & -65536, F32) for w in ws]


class _At(NamedTuple):
  """Where a phase runs: layer, cache index, residual buffers (read/added in place, next)."""
  layer: Any
  idx: Any
  cur: Any
  nxt: Any
  eps: float
  dt: Any  # activation dtype
  tag: Any = None  # this layer's q/k/v tag (PERSISTENT_QKV_TAGS)
  stamp: Any = None  # timeline (profiling): stamp(point, x) records a clock once x is known, returns x gated on it
  loaded: Any = None  # called once the phase's own data loads are issued (to issue more loads behind them)
  first: Any = False  # (with a `SegmentState`) the phase reads the call's input: from "h_in", not "hs"

  def mark(self, point: str, x):  # point: one of TIMELINE_POINTS
    return x if self.stamp is None else self.stamp(point, x)


def _residual(r: dict, at: _At, b, cols, m=None):
  """The residual stream this phase reads, on `cols` (float32): buffer `cur`, or where the phase is
  the call's first reader and the input is not in a buffer (`SegmentState`), "h_in"."""
  x = _load_l2(r["hs"], (at.cur, b, cols), m)
  if "h_in" not in r or at.first is False:  # (statically not the first reader: no load of the input)
    return x
  return jnp.where(at.first, _load(r["h_in"], (b, cols), m).astype(F32), x)


def _flip_base(index, flips_per_call: int, carry: bool):
  """The count of residual flips before this call: with a `SegmentState` (`carry`) the buffers'
  rotation goes on from call to call (`index` grows by one per call), else every call starts at
  buffer 0. Flip t reads buffer t % 3 and writes (t + 1) % 3."""
  return index * flips_per_call if carry else 0


def _split(item, blocks: int):
  return jax.lax.div(item, blocks), jax.lax.rem(item, blocks)


@dataclasses.dataclass(frozen=True)
class _Matvec:
  """RMSNorm(residual) @ w[layer].T for one block of bn output rows: q/k/v into scratch "qkv", or
  (`flips`: a linear sub-block) the residual plus the product into the next buffer."""
  w: str
  norm: str
  n: int
  d: int
  bn: int
  bd: int
  flips: bool = False
  tagged: bool = False  # q/k/v stored as tagged words (no barrier after this phase)

  def items(self, batch: int) -> int:
    return batch * (self.n // self.bn)

  def _w(self, r: dict, layer, j, tile):
    return _mv_weights(r[self.w], (layer,), (j * self.bn,), self.bn, tile)

  def fetch(self, r: dict, layer, item):
    return [self._w(r, layer, _split(item, self.n // self.bn)[1], _col_tiles(self.d, self.bd)[0])]

  def prefetch_share(self, r: dict, layer, k, n: int) -> None:  # (PERSISTENT_IDLE_PREFETCH)
    _prefetch_share(r[self.w], (layer,), k, n)

  def run(self, r: dict, at: _At, item, pre, active) -> None:
    b, j = _split(item, self.n // self.bn)
    rows = pl.ds(j * self.bn, self.bn)
    acc = _mv(functools.partial(_residual, r, at, b),
              lambda cols, m: _load(r[self.norm], (at.layer, cols), m).astype(F32),
              functools.partial(self._w, r, at.layer, j), _col_tiles(self.d, self.bd), pre, eps=at.eps, d=self.d,
              mark=at.mark, loaded=at.loaded)
    if self.flips:
      out, y = (at.nxt, b, rows), _mv_out(acc, False, at.dt, F32, _residual(r, at, b, rows))
    else:
      out, y = (b, rows), _mv_out(acc, False, at.dt, at.dt, None)
    ref, y = r["hs" if self.flips else "qkv"], at.mark("result", y)

    def store():
      ref[out] = _tagged(y, at.tag) if self.tagged else y.astype(ref.dtype)

    _when(active, store)


@dataclasses.dataclass(frozen=True)
class _AttnOut:
  """One query head over the whole cache (`_attn`: RoPE, K/V write, softmax), then its columns of
  the output projection for bo residual rows, added in place: an item per (row, head, row block).
  The heads' row blocks attend redundantly (cached K/V from L2) instead of merging split-K chunks
  behind another barrier."""
  shape: _AttnShape
  d: int
  bo: int
  tagged: bool = False  # q/k/v read as tagged words: then the adds go to the next residual buffer
  flip: bool = False  # flips anyway (with a `SegmentState`: the call's input is not in a buffer to add to)

  @property
  def flips(self) -> bool:  # (with the residual, from head 0): slow programs may still read this one
    return self.tagged or self.flip

  def items(self, batch: int) -> int:
    return batch * self.shape.num_heads * (self.d // self.bo)

  def _coords(self, item):
    b, rest = _split(item, self.shape.num_heads * (self.d // self.bo))
    return (b, *_split(rest, self.d // self.bo))

  @staticmethod
  def _refs(r: dict) -> _AttnRefs:
    return _AttnRefs(r["qkv"], r["cos"], r["sin"], r["mask"], r["k"], r["v"], r["k"], r["v"], None, None, r.get("pos"))

  def fetch_kv(self, r: dict, layer, item):
    b, n, _ = self._coords(item)
    return _attn_fetch(self.shape, self._refs(r), b, n, jnp.int32(0), layer, r["meta"][0])

  def fetch_w(self, r: dict, layer, item):
    _, n, j = self._coords(item)
    H, half = self.shape.head_dim, self.shape.head_dim // 2
    return [_load(r["wo_DxA"], (layer, pl.ds(j * self.bo, self.bo), pl.ds(n * H + o, half))) for o in (0, half)]

  def fetch(self, r: dict, layer, item):
    return self.fetch_kv(r, layer, item), self.fetch_w(r, layer, item)

  def prefetch_share(self, r: dict, layer, k, n: int) -> None:  # (PERSISTENT_IDLE_PREFETCH): o_proj's weights
    _prefetch_share(r["wo_DxA"], (layer,), k, n)

  def run(self, r: dict, at: _At, item, pre, active) -> None:
    b, n, j = self._coords(item)
    kv, w = pre
    rows = pl.ds(j * self.bo, self.bo)
    res = jnp.where(n == 0, _residual(r, at, b, rows), 0.0) if self.flips else None

    def load(ref, idxs):
      if self.tagged:
        return _poll_tagged(ref, idxs, at.tag, r["flags"])
      return [_load_l2(ref, i).astype(F32) for i in idxs]

    o1, o2, _ = _attn(self.shape, self._refs(r), b, n, jnp.int32(0), at.layer, at.idx, kv, load=load,
                      writes=active & (j == 0), mark=at.mark, dt=at.dt)
    y = at.mark("result", sum(jnp.sum(wh.astype(F32) * _round(o, at.dt)[None, :], axis=1) for wh, o in zip(w, (o1, o2))))
    y = y if res is None else y + res
    _when(active, lambda: _atomic_add(r["hs"], (at.nxt if self.flips else at.cur, b, rows), y))


@dataclasses.dataclass(frozen=True)
class _FFN:
  """SwiGLU for one block of bf FFN rows: RMSNorm, gate/up, SiLU(gate) * up, then the block's
  columns of the down projection added to the next residual buffer (item (b, 0) adds the residual
  too). Every weight of the item is loaded before the barrier, in `_pieces` of D. bf need not be
  a power of two: the tiles have `rows` (the next one) rows, the extra ones masked (zero)."""
  d: int
  f: int
  bf: int
  pieces: bool = True
  flips = True

  def _tiles(self) -> list:
    return _pieces(self.d) if self.pieces else _col_tiles(self.d, pl.next_power_of_2(self.d))

  def items(self, batch: int) -> int:
    return batch * (self.f // self.bf)

  @property
  def rows(self) -> int:
    return pl.next_power_of_2(self.bf)

  def _gu(self, r: dict, layer, j, tile):
    return _mv_weights(r["wgu_2xFxD"], (layer,), (j * self.bf, self.f + j * self.bf), self.rows, tile, self.bf)

  def _down(self, r: dict, layer, j):
    live = _live(self.rows, self.bf)
    live = None if live is None else live[None, :]
    return [_load(r["wd_DxF"], (layer, cols, pl.ds(j * self.bf, self.rows)),
                  _both(None if m is None else m[:, None], live)) for cols, m in self._tiles()]

  def fetch(self, r: dict, layer, item):
    j = _split(item, self.f // self.bf)[1]
    return [self._gu(r, layer, j, t) for t in self._tiles()], self._down(r, layer, j)

  def prefetch_share(self, r: dict, layer, k, n: int) -> None:  # (PERSISTENT_IDLE_PREFETCH)
    for w in ("wgu_2xFxD", "wd_DxF"):
      _prefetch_share(r[w], (layer,), k, n)

  def run(self, r: dict, at: _At, item, pre, active) -> None:
    b, j = _split(item, self.f // self.bf)
    gu, wd = pre
    xs = []

    def x_at(cols, m):
      xs.append(_residual(r, at, b, cols, m))
      return xs[-1]

    tiles = self._tiles()
    acc = _mv(x_at, lambda cols, m: _load(r["ffn_norm_D"], (at.layer, cols), m).astype(F32), None, tiles, gu,
              eps=at.eps, d=self.d, mark=at.mark)
    act = at.mark("half way", _mv_out(acc, True, at.dt, at.dt, None))
    for k, ((cols, m), w, x) in enumerate(zip(tiles, wd, xs)):
      y = jnp.sum(w.astype(F32) * act[None, :], axis=1) + jnp.where(j == 0, x, 0.0)
      y = at.mark("result", y) if k == 0 else y
      _when(active, functools.partial(_atomic_add, r["hs"], (at.nxt, b, cols), y, mask=m))


def _segment_kernel(*refs, names: tuple, phases: tuple, n_layers: int, programs: int, batch: int, eps: float,
                    dt, carry: bool):
  r = dict(zip(names, refs))
  p = pl.program_id(0)
  nph, flips = len(phases), [sum(ph.flips for ph in phases[:j]) for j in range(len(phases) + 1)]
  idx = r["meta"][0]
  base = idx * (n_layers * nph)  # epochs and tags of this call: base + 1 ...
  # With a `SegmentState` (`carry`) the residual buffers rotate on across calls (the first flip
  # writes the buffer the last flip of the call before zeroed); else every call starts at buffer 0.
  t0 = _flip_base(idx, n_layers * flips[-1], carry)
  synced = [not (isinstance(ph, _Matvec) and ph.tagged) for ph in phases]  # a grid barrier after the phase
  bars = [sum(synced[:j + 1]) for j in range(nph)]  # barriers in a layer up to and with phase j

  def at(layer, j):
    t = t0 + layer * flips[-1] + flips[j]
    tag = _tag_of(base + layer)
    first = (layer == 0) if carry and flips[j] == 0 else False
    layer = jnp.int32(0) if PROFILE_LAYER0 else layer
    return (_At(layer, idx, jax.lax.rem(t, 3), jax.lax.rem(t + 1, 3), eps, dt, tag, first=first),
            jax.lax.rem(t + 2, 3))

  def item(ph, rnd):
    i = p + rnd * programs
    return jnp.minimum(i, ph.items(batch) - 1), i < ph.items(batch)

  def run(ph, a: _At, pre):
    it, ok = item(ph, 0)
    ph.run(r, a, it, pre, ok)
    rounds = -(-ph.items(batch) // programs)
    if rounds > 1:  # more items than programs: the rest without prefetching
      def more(rnd, carry):
        it, ok = item(ph, rnd)
        ph.run(r, a, it, ph.fetch(r, a.layer, it), ok)
        return carry
      jax.lax.fori_loop(1, rounds, more, 0)

  def zero(buf):
    for b in range(batch):
      for cols, _ in _pieces(r["hs"].shape[2]):
        r["hs"][buf, b, cols] = jnp.zeros((cols.size,), F32)

  counter = _call_counter(r["flags"], p, idx) if BARRIER == "counter" and programs > 1 else None
  clocks = r.get("clocks")  # timeline (profiling): SM clocks at points of every phase (see decode_segment)

  def stamp(slot, point, x):
    t = _clock(x)
    clocks[p, slot, jnp.int32(TIMELINE_POINTS.index(point))] = jnp.max(t) if jnp.ndim(t) else t
    return _gate(x, t)

  if clocks is not None:
    stamp(jnp.int32(0), "left", idx)

  # The attention's first cache block (the phase's largest load) is issued during the q/k/v phase,
  # behind that phase's own loads, instead of at the barrier before attention.
  early_kv = (PERSISTENT_EARLY_KV and nph == 3 and isinstance(phases[0], _Matvec) and not phases[0].flips
              and isinstance(phases[1], _AttnOut))

  def layer_body(layer, pre):
    kv_box = []
    for j, ph in enumerate(phases):
      a, stale = at(layer, j)
      slot = layer * nph + j + 1
      if clocks is not None:
        a = a._replace(stamp=functools.partial(stamp, slot))
      if early_kv and j == 0:
        a = a._replace(loaded=lambda a=a: kv_box or kv_box.append(
            phases[1].fetch_kv(r, a.layer, item(phases[1], 0)[0])))
      nxt = phases[(j + 1) % nph]
      nxt_layer = layer if j + 1 < nph else jnp.minimum(layer + 1, n_layers - 1)  # (the last layer: its own)
      nxt_layer = jnp.int32(0) if PROFILE_LAYER0 else nxt_layer
      idle = programs - ph.items(batch)  # programs without an item in this phase (the last ones)
      if idle > 0 and _idle_prefetch(ph, nxt):
        k = p - ph.items(batch)
        pl.when(k >= 0)(lambda k=k, nxt=nxt, nl=nxt_layer: nxt.prefetch_share(r, nl, k, idle))
      if j not in PROFILE_SKIP:
        run(ph, a, pre)
      if ph.flips:
        pl.when(p == programs - 1)(functools.partial(zero, stale))
      sync = synced[j] and programs > 1
      epoch = (0 if counter is not None else base) + layer * bars[-1] + bars[j]
      arrived = _arrive(r["flags"], p, epoch, counter) if sync else idx
      if clocks is not None and sync:  # the spin waits for the reading
        epoch = _gate(epoch, stamp(slot, "arrived", arrived))
      if kv_box and j == 0:
        pre = kv_box[0], nxt.fetch_w(r, nxt_layer, item(nxt, 0)[0])
      else:
        pre = nxt.fetch(r, nxt_layer, item(nxt, 0)[0])
      left = _wait(r["flags"], programs, epoch, counter) if sync else True
      if clocks is not None and sync:
        stamp(slot, "left", jnp.asarray(left, jnp.int32))
    return pre

  jax.lax.fori_loop(0, n_layers, layer_body, phases[0].fetch(r, jnp.int32(0), item(phases[0], 0)[0]))


def _idle_prefetch(ph, nxt) -> bool:
  """Whether the programs idle in phase `ph` hint L2 to fetch the weights of `nxt`, the next one."""
  if PERSISTENT_IDLE_PREFETCH == "ffn":
    return isinstance(ph, _AttnOut) and isinstance(nxt, _FFN)
  return PERSISTENT_IDLE_PREFETCH == "all"


def _ffn_rows(f: int, programs: int) -> int:
  """FFN rows per persistent item: `_row_block`'s power of two, or fewer rows in tiles of that
  size (masked) when that spreads the FFN over more programs (SmolLM2: 12 rows x 128 programs,
  not 16 x 96): each program's share of the weights, which it streams at a barrier, shrinks."""
  bf = _row_block(f, programs)
  fewer = [r for r in range(bf // 2 + 1, bf) if f % r == 0 and f // r <= programs]
  return min(fewer) if fewer else bf


def _phases(attn_kind: str, ffn_kind: str, p: dict, kv: dict | None, *, programs: int, batch: int, num_heads: int,
            num_kv_heads: int, dtype, carry: bool = False) -> tuple[list, dict, dict]:
  """A block's phases, the weights they read (by name) and their scratch {name: shape} (q/k/v:
  the activation dtype, or int32 tagged words, zeroed, where PERSISTENT_QKV_TAGS applies: bf16)."""
  n, D = p["attn_norm_D"].shape if "attn_norm_D" in p else p["ffn_norm_D"].shape
  per_item = max(programs // batch, 1)

  def linear(w: str, norm: str) -> _Matvec:
    bn = _row_block(D, per_item)
    return _Matvec(w, norm, D, D, bn, _col_block(D, bn), flips=True)

  phases, ins, scratch = [], {}, {}
  if attn_kind == "gqa":
    K, S, H = kv["k"].shape[2], kv["k"].shape[3], kv["k"].shape[4]
    E = p["wqkv_ExD"].shape[1]
    if K != num_kv_heads or E != qkv_width(num_heads, K, H) or S % BLOCK_S or not head_dim_ok(H):
      raise ValueError(f"decode_segment: qkv {p['wqkv_ExD'].shape}, cache {kv['k'].shape}, heads "
                       f"{num_heads}/{num_kv_heads}: need E = (N + 2K) H, S % {BLOCK_S} == 0, H a power of two >= 32")
    bn = _row_block(E, per_item)
    shape = _AttnShape(num_heads, K, H, S, _attn_block(S), S)
    tags = PERSISTENT_QKV_TAGS and jnp.dtype(dtype) == jnp.bfloat16
    phases += [_Matvec("wqkv_ExD", "attn_norm_D", E, D, bn, _col_block(D, bn), tagged=tags),
               _AttnOut(shape, D, _row_block(D, max(per_item // num_heads, 1)), tagged=tags, flip=carry)]
    ins.update({k: p[k] for k in ("attn_norm_D", "wqkv_ExD", "wo_DxA")})
    scratch["qkv"] = (batch, E)
  elif attn_kind == "linear":
    phases.append(linear("wa_DxD", "attn_norm_D"))
    ins.update({k: p[k] for k in ("attn_norm_D", "wa_DxD")})
  if ffn_kind == "swiglu":
    F = p["wd_DxF"].shape[2]
    phases.append(_FFN(D, F, PERSISTENT_FFN_ROWS or _ffn_rows(F, per_item), PERSISTENT_FFN_PIECES))
    ins.update(ffn_norm_D=p["ffn_norm_D"], wgu_2xFxD=p["wgu_2xFxD"].reshape(n, 2 * F, D), wd_DxF=p["wd_DxF"])
  elif ffn_kind == "linear":
    phases.append(linear("wf_DxD", "ffn_norm_D"))
    ins.update({k: p[k] for k in ("ffn_norm_D", "wf_DxD")})
  return phases, ins, scratch


class SegmentState(NamedTuple):
  """What a persistent segment keeps across decode steps (`segment_state`): its barrier flags,
  its three float32 residual buffers [3, B, D] (rotating on from call to call) and its tagged
  q/k/v words [B, E] (or None). With it a call allocates and zeroes nothing, and reads its input
  where it is ("h_in") instead of copying it into a buffer first."""
  flags: jax.Array
  hs: jax.Array
  qkv: jax.Array | None


def segment_state(programs: int, batch: int, d: int, qkv_width: int = 0) -> SegmentState:
  """Fresh state for a segment of hidden size d (`qkv_width`: its fused q/k/v width, 0 without
  attention): zeros (no tag is 0; the first call's first write buffer is zero)."""
  return SegmentState(sync_flags(programs), jnp.zeros((3, batch, d), F32),
                      jnp.zeros((batch, qkv_width), jnp.int32) if qkv_width else None)


def _flags_of(sync) -> jax.Array:
  return sync.flags if isinstance(sync, SegmentState) else sync


def decode_segment(h_BxD: jax.Array, p: dict, kv: dict | None, flags: jax.Array | SegmentState, cos_BxH: jax.Array,
                   sin_BxH: jax.Array, mask_BxS: jax.Array | None, index, *, attn_kind: str, ffn_kind: str,
                   num_heads: int, num_kv_heads: int = 0, eps: float = 1e-5, timeline: bool = False,
                   pos_B: jax.Array | None = None) -> tuple:
  """A run of n identical decode blocks in one persistent kernel -> (h, kv, flags).

  h [B, D] (one token per row); `p`: the stacked block params of `puzzle_jax.infer` ([n, ...]:
  attn_norm_D, wqkv_ExD, wo_DxA or wa_DxD; ffn_norm_D, wgu_2xFxD, wd_DxF or wf_DxD); kv: the
  segment's caches {"k", "v"} [n, B, K, S, H] (gqa), updated in place at slot `index`; mask [B, S]
  (int32) the slots row b may attend to (slots at or after `index` are never read); flags: the
  barrier state of this segment (`sync_flags(persistent_programs())`), or a `SegmentState`
  (returned updated in its place), kept across steps; epochs derive from `index`, which must
  grow by one per call. cos / sin: [B, H] per row, or with `pos_B` ([B] int32 positions) tables
  [P, H] by position, read in the kernel. Same results as n calls of the five-kernel block, except that the residual
  stream stays in float32 inside the run (projections are still rounded to the activation dtype).
  `timeline` (profiling, GPU): also return int32 [P, n * phases + 1, len(TIMELINE_POINTS)], each
  program's SM clock per phase when it: arrived at the barrier, left it, had the phase's data,
  was half way (attention: first cache block done; FFN: SiLU * up done), had the result (before
  the adds / stores); row 0: its start in column 1. Zero where a phase has no such point.
  """
  if attn_kind not in ("gqa", "linear", "noop") or ffn_kind not in ("swiglu", "linear", "noop"):
    raise ValueError(f"decode_segment: no phases for attention {attn_kind!r} / FFN {ffn_kind!r}")
  if (attn_kind, ffn_kind) == ("noop", "noop"):
    raise ValueError("decode_segment: a block with neither attention nor FFN needs no kernel")
  B, D = h_BxD.shape
  n = next(iter(p.values())).shape[0]
  state = flags if isinstance(flags, SegmentState) else None
  flags = _flags_of(flags)
  programs = flags.shape[0] - 1
  phases, ins, scratch = _phases(attn_kind, ffn_kind, p, kv, programs=programs, batch=B, num_heads=num_heads,
                                 num_kv_heads=num_kv_heads, dtype=h_BxD.dtype, carry=state is not None)
  if attn_kind == "gqa":
    ins.update(cos=cos_BxH.astype(F32), sin=sin_BxH.astype(F32), mask=mask_BxS.astype(jnp.int32))
    if pos_B is not None:
      ins["pos"] = pos_B.astype(jnp.int32)
  index = jnp.asarray(index, jnp.int32)
  ins["meta"] = index.reshape(1)
  nflips = n * sum(ph.flips for ph in phases)
  if state is not None:
    if state.hs.shape != (3, B, D):
      raise ValueError(f"decode_segment: state residual buffers {state.hs.shape}, need {(3, B, D)}")
    ins["h_in"], hs = h_BxD, state.hs
  else:
    hs = jnp.zeros((3, B, D), F32).at[0].set(h_BxD.astype(F32))  # the residual buffers (see above)
  final = jax.lax.rem(_flip_base(index, nflips, state is not None) + nflips, 3)  # the buffer the last flip wrote
  aliased = {"hs": hs, "flags": flags} | ({"k": kv["k"], "v": kv["v"]} if attn_kind == "gqa" else {})
  if any(getattr(ph, "tagged", False) for ph in phases):  # tagged words start at 0 (no layer's tag)
    shape = scratch.pop("qkv")
    qkv = state.qkv if state is not None else None
    if qkv is not None and qkv.shape != shape:
      raise ValueError(f"decode_segment: state q/k/v words {qkv.shape}, need {shape}")
    aliased["qkv"] = qkv if qkv is not None else jnp.zeros(shape, jnp.int32)
  if timeline:  # zeros where a phase has no such point
    aliased["clocks"] = jnp.zeros((programs, n * len(phases) + 1, len(TIMELINE_POINTS)), jnp.int32)
  in_names = tuple(ins) + tuple(f"{k}_in" for k in aliased)
  out_names = tuple(aliased) + tuple(scratch)
  out_shape = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in aliased.values()]
  out_shape += [jax.ShapeDtypeStruct(shp, h_BxD.dtype) for shp in scratch.values()]
  kernel = functools.partial(_segment_kernel, names=in_names + out_names, phases=tuple(phases), n_layers=n,
                             programs=programs, batch=B, eps=eps, dt=h_BxD.dtype, carry=state is not None)
  outs = pl.pallas_call(kernel, out_shape=out_shape, grid=(programs,),
                        input_output_aliases={len(ins) + i: i for i in range(len(aliased))},
                        interpret=_interpret(), compiler_params=_compiler_params(PERSISTENT_WARPS))(
      *ins.values(), *aliased.values())
  out = dict(zip(aliased, outs))
  h = jax.lax.dynamic_index_in_dim(out["hs"], final, keepdims=False).astype(h_BxD.dtype)
  sync = out["flags"] if state is None else SegmentState(out["flags"], out["hs"], out.get("qkv", state.qkv))
  res = h, ({"k": out["k"], "v": out["v"]} if attn_kind == "gqa" else kv), sync
  return res + (out["clocks"],) if timeline else res
