"""The persistent decode kernel: a run of identical decode layers in one Pallas kernel.

One program per SM, grid barriers (`triton_ops`) instead of kernel boundaries, next-phase weights
loaded while waiting, and three phases per gqa + SwiGLU layer instead of the five kernels of
`decode`: attention and the output projection are one phase (each item attends over the whole
cache for one head, then adds its head's share of o_proj), and so are gate/up and down (each item
adds its FFN rows' share of down); the shares are summed by relaxed float32 atomics into a float32
residual. `infer`'s decode_impl="auto" runs it on the GPU for batch-1 decoding of runs of at
least `KernelConfig.min_run` identical blocks (BENCHMARKS.md, "Decode kernels", has the numbers);
`reference_segment` is the same computation in plain jnp, layer by layer.

Layout of the kernel (`_segment_kernel`). A gqa + SwiGLU layer is three phases, each ending
where the next needs every output of it:
  1. RMSNorm + q/k/v projection                                  (`_Matvec`, into scratch "qkv")
  2. attention + output projection: an item per (query head, block of residual rows) attends over
     the whole cache (RoPE, K/V write) and adds its head's share of o_proj   (`_AttnOut`)
  3. RMSNorm + gate/up + SiLU * up + down: an item per block of FFN rows adds its rows' share of
     the down projection                                                     (`_FFN`)
Split-K shares are summed by float32 atomics, so the residual stream lives in float32 scratch,
three buffers in rotation. A phase that reads the whole residual and adds to it ("flips": the
FFN, linear sub-blocks) reads buffer t % 3, writes t + 1 (zeroed before; the FFN's item (b, 0)
adds the residual itself) and zeroes t + 2 (whose last reader was the flip before); with a
`SegmentState` the rotation goes on across calls and the call's input is read in place. In bf16,
phase 1 stores q/k/v as tagged words (`triton_ops.poll_tagged`) and has no barrier after it: an
attention item polls the rows of its head, and as a slow program may still be reading the
residual, the attention flips too (head 0's items add the residual rows). Otherwise (float32
activations) a barrier follows phase 1 and attention adds in place. While waiting at a barrier
each program already loads what its next phase needs that does not depend on the phase before (weights, cached K/V); the
attention's cache block, its largest load, is issued earlier still, during the q/k/v phase.
Where the time goes: `KernelConfig(timeline=True)` (`profile`), benchmarks/segment_profile.py --timeline.

Axis legend as in `puzzle_jax.kernels.decode`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from puzzle_jax.kernels import profile, triton_ops as tops
from puzzle_jax.kernels.config import DEFAULT, KernelConfig
from puzzle_jax.kernels.decode import (BLOCK_S, _AttnRefs, _AttnShape, _attn, _attn_fetch, _both, _col_block, _col_tiles,
                                       _live, _mv, _mv_out, _mv_weights, _round, _row_block, head_dim_ok, qkv_width,
                                       reference_decode_attention, reference_matmul)

F32 = jnp.float32


def persistent_programs(cfg: KernelConfig = DEFAULT) -> int:
  """Programs of a persistent kernel on this backend: `cfg.programs`, else one per SM on GPU (all
  resident at once, which the barriers need); 1 in the interpreter (which runs programs one after
  another)."""
  if cfg.interpreted:
    return 1
  return cfg.programs or getattr(jax.devices()[0], "core_count", 0) or 108


def sync_timeouts(flags) -> jax.Array:
  """Barrier / poll waits that timed out, from flags or a `SegmentState`."""
  return _flags_of(flags)[-1]


def _attn_block(S: int, most: int) -> int:
  """Cache slots per persistent attention step: `most` (`KernelConfig.attn_block`) or less,
  dividing S (a multiple of BLOCK_S) so that the steps cover the cache exactly."""
  block = min(S, most)
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


class _At(NamedTuple):
  """Where a phase runs: layer, cache index, residual buffers (read/added in place, next)."""
  layer: Any
  idx: Any
  cur: Any
  nxt: Any
  eps: float
  dt: Any  # activation dtype
  cfg: KernelConfig = DEFAULT  # (resolved: `interpret` set)
  tag: Any = None  # this layer's q/k/v tag (`KernelConfig.qkv_tags`)
  stamp: Any = None  # timeline (profiling): stamp(point, x) records a clock once x is known, returns x gated on it
  loaded: Any = None  # called once the phase's own data loads are issued (to issue more loads behind them)
  first: Any = False  # (with a `SegmentState`) the phase reads the call's input: from "h_in", not "hs"

  def mark(self, point: str, x):  # point: one of profile.TIMELINE_POINTS
    return x if self.stamp is None else self.stamp(point, x)

  def load_l2(self, ref, idx: tuple, mask=None):
    """A load of data other programs wrote in this kernel (past L1; plain in the interpreter)."""
    return tops.load(ref, idx, mask, l2=not self.cfg.interpreted)


def _residual(r: dict, at: _At, b, cols, m=None):
  """The residual stream this phase reads, on `cols` (float32): buffer `cur`, or where the phase is
  the call's first reader and the input is not in a buffer (`SegmentState`), "h_in"."""
  x = at.load_l2(r["hs"], (at.cur, b, cols), m)
  if "h_in" not in r or at.first is False:  # (statically not the first reader: no load of the input)
    return x
  return jnp.where(at.first, tops.load(r["h_in"], (b, cols), m).astype(F32), x)


def _flip_base(index, flips_per_call: int, carry: bool):
  """The count of residual flips before this call: with a `SegmentState` (`carry`) the buffers'
  rotation goes on from call to call (`index` grows by one per call), else every call starts at
  buffer 0. Flip t reads buffer t % 3 and writes (t + 1) % 3."""
  return index * flips_per_call if carry else 0


def _prefetch_share(ref, lead: tuple, k, n: int, cfg: KernelConfig) -> None:
  tops.prefetch_share(ref, lead, k, n, step_lines=cfg.prefetch_lines, interpret=cfg.interpreted)


def _atomic_add(at: _At, ref, idx: tuple, val, mask=None) -> None:
  tops.atomic_add(ref, idx, val, mask, interpret=at.cfg.interpreted)


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

  def prefetch_share(self, r: dict, layer, k, n: int, cfg: KernelConfig) -> None:  # (`idle_prefetch`)
    _prefetch_share(r[self.w], (layer,), k, n, cfg)

  def run(self, r: dict, at: _At, item, pre, active) -> None:
    b, j = _split(item, self.n // self.bn)
    rows = pl.ds(j * self.bn, self.bn)
    acc = _mv(functools.partial(_residual, r, at, b),
              lambda cols, m: tops.load(r[self.norm], (at.layer, cols), m).astype(F32),
              functools.partial(self._w, r, at.layer, j), _col_tiles(self.d, self.bd), pre, eps=at.eps, d=self.d,
              mark=at.mark, loaded=at.loaded)
    if self.flips:
      out, y = (at.nxt, b, rows), _mv_out(acc, False, at.dt, F32, _residual(r, at, b, rows))
    else:
      out, y = (b, rows), _mv_out(acc, False, at.dt, at.dt, None)
    ref, y = r["hs" if self.flips else "qkv"], at.mark("result", y)

    def store():
      ref[out] = tops.tagged(y, at.tag) if self.tagged else y.astype(ref.dtype)

    tops.when(active, store)


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
    return [tops.load(r["wo_DxA"], (layer, pl.ds(j * self.bo, self.bo), pl.ds(n * H + o, half))) for o in (0, half)]

  def fetch(self, r: dict, layer, item):
    return self.fetch_kv(r, layer, item), self.fetch_w(r, layer, item)

  def prefetch_share(self, r: dict, layer, k, n: int, cfg: KernelConfig) -> None:  # o_proj's weights
    _prefetch_share(r["wo_DxA"], (layer,), k, n, cfg)

  def run(self, r: dict, at: _At, item, pre, active) -> None:
    b, n, j = self._coords(item)
    kv, w = pre
    rows = pl.ds(j * self.bo, self.bo)
    res = jnp.where(n == 0, _residual(r, at, b, rows), 0.0) if self.flips else None

    def load(ref, idxs):
      if self.tagged:
        return tops.poll_tagged(ref, idxs, at.tag, r["flags"], max_spin=at.cfg.max_spin,
                                interpret=at.cfg.interpreted)
      return [at.load_l2(ref, i).astype(F32) for i in idxs]

    o1, o2, _ = _attn(self.shape, self._refs(r), b, n, jnp.int32(0), at.layer, at.idx, kv, load=load,
                      writes=active & (j == 0), mark=at.mark, dt=at.dt)
    y = at.mark("result", sum(jnp.sum(wh.astype(F32) * _round(o, at.dt)[None, :], axis=1) for wh, o in zip(w, (o1, o2))))
    y = y if res is None else y + res
    tops.when(active, lambda: _atomic_add(at, r["hs"], (at.nxt if self.flips else at.cur, b, rows), y))


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
    return [tops.load(r["wd_DxF"], (layer, cols, pl.ds(j * self.bf, self.rows)),
                  _both(None if m is None else m[:, None], live)) for cols, m in self._tiles()]

  def fetch(self, r: dict, layer, item):
    j = _split(item, self.f // self.bf)[1]
    return [self._gu(r, layer, j, t) for t in self._tiles()], self._down(r, layer, j)

  def prefetch_share(self, r: dict, layer, k, n: int, cfg: KernelConfig) -> None:
    for w in ("wgu_2xFxD", "wd_DxF"):
      _prefetch_share(r[w], (layer,), k, n, cfg)

  def run(self, r: dict, at: _At, item, pre, active) -> None:
    b, j = _split(item, self.f // self.bf)
    gu, wd = pre
    xs = []

    def x_at(cols, m):
      xs.append(_residual(r, at, b, cols, m))
      return xs[-1]

    tiles = self._tiles()
    acc = _mv(x_at, lambda cols, m: tops.load(r["ffn_norm_D"], (at.layer, cols), m).astype(F32), None, tiles, gu,
              eps=at.eps, d=self.d, mark=at.mark)
    act = at.mark("half way", _mv_out(acc, True, at.dt, at.dt, None))
    for k, ((cols, m), w, x) in enumerate(zip(tiles, wd, xs)):
      y = jnp.sum(w.astype(F32) * act[None, :], axis=1) + jnp.where(j == 0, x, 0.0)
      y = at.mark("result", y) if k == 0 else y
      tops.when(active, functools.partial(_atomic_add, at, r["hs"], (at.nxt, b, cols), y, mask=m))


def _segment_kernel(*refs, names: tuple, phases: tuple, n_layers: int, programs: int, batch: int, eps: float,
                    dt, carry: bool, cfg: KernelConfig):
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
    tag = tops.tag_of(base + layer)
    first = (layer == 0) if carry and flips[j] == 0 else False
    layer = jnp.int32(0) if cfg.profile_layer0 else layer
    return (_At(layer, idx, jax.lax.rem(t, 3), jax.lax.rem(t + 1, 3), eps, dt, cfg, tag, first=first),
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

  counter = tops.call_counter(r["flags"], p, idx) if cfg.barrier == "counter" and programs > 1 else None
  clocks = r.get("clocks")  # timeline (profiling): SM clocks at points of every phase (see decode_segment)
  stamp = functools.partial(profile.stamp, clocks, p, interpret=cfg.interpreted)

  if clocks is not None:
    stamp(jnp.int32(0), "left", idx)

  # The attention's first cache block (the phase's largest load) is issued during the q/k/v phase,
  # behind that phase's own loads, instead of at the barrier before attention.
  early_kv = (cfg.early_kv and nph == 3 and isinstance(phases[0], _Matvec) and not phases[0].flips
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
      nxt_layer = jnp.int32(0) if cfg.profile_layer0 else nxt_layer
      idle = programs - ph.items(batch)  # programs without an item in this phase (the last ones)
      if idle > 0 and _idle_prefetch(ph, nxt, cfg.idle_prefetch):
        k = p - ph.items(batch)
        pl.when(k >= 0)(lambda k=k, nxt=nxt, nl=nxt_layer: nxt.prefetch_share(r, nl, k, idle, cfg))
      if j not in cfg.profile_skip:
        run(ph, a, pre)
      if ph.flips:
        pl.when(p == programs - 1)(functools.partial(zero, stale))
      sync = synced[j] and programs > 1
      epoch = (0 if counter is not None else base) + layer * bars[-1] + bars[j]
      arrived = tops.arrive(r["flags"], p, epoch, counter) if sync else idx
      if clocks is not None and sync:  # the spin waits for the reading
        epoch = profile.gate(epoch, stamp(slot, "arrived", arrived), cfg.interpreted)
      if kv_box and j == 0:
        pre = kv_box[0], nxt.fetch_w(r, nxt_layer, item(nxt, 0)[0])
      else:
        pre = nxt.fetch(r, nxt_layer, item(nxt, 0)[0])
      left = tops.wait(r["flags"], programs, epoch, counter, max_spin=cfg.max_spin) if sync else True
      if clocks is not None and sync:
        stamp(slot, "left", jnp.asarray(left, jnp.int32))
    return pre

  jax.lax.fori_loop(0, n_layers, layer_body, phases[0].fetch(r, jnp.int32(0), item(phases[0], 0)[0]))


def _idle_prefetch(ph, nxt, mode: str) -> bool:
  """Whether the programs idle in phase `ph` hint L2 to fetch the weights of `nxt`, the next one
  (`KernelConfig.idle_prefetch`)."""
  if mode == "ffn":
    return isinstance(ph, _AttnOut) and isinstance(nxt, _FFN)
  return mode == "all"


def _ffn_rows(f: int, programs: int) -> int:
  """FFN rows per persistent item: `_row_block`'s power of two, or fewer rows in tiles of that
  size (masked) when that spreads the FFN over more programs (SmolLM2: 12 rows x 128 programs,
  not 16 x 96): each program's share of the weights, which it streams at a barrier, shrinks."""
  bf = _row_block(f, programs)
  fewer = [r for r in range(bf // 2 + 1, bf) if f % r == 0 and f // r <= programs]
  return min(fewer) if fewer else bf


def _phases(attn_kind: str, ffn_kind: str, p: dict, kv: dict | None, *, programs: int, batch: int, num_heads: int,
            num_kv_heads: int, dtype, cfg: KernelConfig, carry: bool = False) -> tuple[list, dict, dict]:
  """A block's phases, the weights they read (by name) and their scratch {name: shape} (q/k/v:
  the activation dtype, or int32 tagged words, zeroed, where `cfg.qkv_tags` applies: bf16)."""
  n, D = p["attn_norm_D"].shape if "attn_norm_D" in p else p["ffn_norm_D"].shape
  per_item = max(programs // batch, 1)

  def linear(w: str, norm: str) -> _Matvec:
    bn = _row_block(D, per_item)
    return _Matvec(w, norm, D, D, bn, _col_block(D, bn, cfg.tile), flips=True)

  phases, ins, scratch = [], {}, {}
  if attn_kind == "gqa":
    K, S, H = kv["k"].shape[2], kv["k"].shape[3], kv["k"].shape[4]
    E = p["wqkv_ExD"].shape[1]
    if K != num_kv_heads or E != qkv_width(num_heads, K, H) or S % BLOCK_S or not head_dim_ok(H):
      raise ValueError(f"decode_segment: qkv {p['wqkv_ExD'].shape}, cache {kv['k'].shape}, heads "
                       f"{num_heads}/{num_kv_heads}: need E = (N + 2K) H, S % {BLOCK_S} == 0, H a power of two >= 32")
    bn = _row_block(E, per_item)
    shape = _AttnShape(num_heads, K, H, S, _attn_block(S, cfg.attn_block), S, cfg.kv_upto_index)
    tags = cfg.qkv_tags and jnp.dtype(dtype) == jnp.bfloat16
    phases += [_Matvec("wqkv_ExD", "attn_norm_D", E, D, bn, _col_block(D, bn, cfg.tile), tagged=tags),
               _AttnOut(shape, D, _row_block(D, max(per_item // num_heads, 1)), tagged=tags, flip=carry)]
    ins.update({k: p[k] for k in ("attn_norm_D", "wqkv_ExD", "wo_DxA")})
    scratch["qkv"] = (batch, E)
  elif attn_kind == "linear":
    phases.append(linear("wa_DxD", "attn_norm_D"))
    ins.update({k: p[k] for k in ("attn_norm_D", "wa_DxD")})
  if ffn_kind == "swiglu":
    F = p["wd_DxF"].shape[2]
    phases.append(_FFN(D, F, cfg.ffn_rows or _ffn_rows(F, per_item), cfg.ffn_pieces))
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
  return SegmentState(tops.sync_flags(programs), jnp.zeros((3, batch, d), F32),
                      jnp.zeros((batch, qkv_width), jnp.int32) if qkv_width else None)


def _flags_of(sync) -> jax.Array:
  return sync.flags if isinstance(sync, SegmentState) else sync


def decode_segment(h_BxD: jax.Array, p: dict, kv: dict | None, flags: jax.Array | SegmentState, cos_BxH: jax.Array,
                   sin_BxH: jax.Array, mask_BxS: jax.Array | None, index, *, attn_kind: str, ffn_kind: str,
                   num_heads: int, num_kv_heads: int = 0, eps: float = 1e-5, pos_B: jax.Array | None = None,
                   cfg: KernelConfig = DEFAULT) -> tuple:
  """A run of n identical decode blocks in one persistent kernel -> (h, kv, flags).

  h [B, D] (one token per row); `p`: the stacked block params of `puzzle_jax.infer` ([n, ...]:
  attn_norm_D, wqkv_ExD, wo_DxA or wa_DxD; ffn_norm_D, wgu_2xFxD, wd_DxF or wf_DxD); kv: the
  segment's caches {"k", "v"} [n, B, K, S, H] (gqa), updated in place at slot `index`; mask [B, S]
  (int32) the slots row b may attend to (slots at or after `index` are never read); flags: the
  barrier state of this segment (`triton_ops.sync_flags(persistent_programs(cfg))`), or a `SegmentState`
  (returned updated in its place), kept across steps; epochs derive from `index`, which must
  grow by one per call. cos / sin: [B, H] per row, or with `pos_B` ([B] int32 positions) tables
  [P, H] by position, read in the kernel. Same results as n calls of the five-kernel block, except that
  the residual stream stays in float32 inside the run (projections are still rounded to the activation
  dtype). `cfg.timeline` (profiling, GPU): also return int32 [P, n * phases + 1, len(profile.TIMELINE_POINTS)], each
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
                                 num_kv_heads=num_kv_heads, dtype=h_BxD.dtype, cfg=cfg, carry=state is not None)
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
  if cfg.timeline:  # zeros where a phase has no such point
    aliased["clocks"] = jnp.zeros((programs, n * len(phases) + 1, len(profile.TIMELINE_POINTS)), jnp.int32)
  in_names = tuple(ins) + tuple(f"{k}_in" for k in aliased)
  out_names = tuple(aliased) + tuple(scratch)
  out_shape = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in aliased.values()]
  out_shape += [jax.ShapeDtypeStruct(shp, h_BxD.dtype) for shp in scratch.values()]
  kernel = functools.partial(_segment_kernel, names=in_names + out_names, phases=tuple(phases), n_layers=n,
                             programs=programs, batch=B, eps=eps, dt=h_BxD.dtype, carry=state is not None, cfg=cfg)
  outs = pl.pallas_call(kernel, out_shape=out_shape, grid=(programs,),
                        input_output_aliases={len(ins) + i: i for i in range(len(aliased))},
                        interpret=cfg.interpreted,
                        compiler_params=tops.compiler_params(cfg.persistent_warps, cfg.interpreted))(
      *ins.values(), *aliased.values())
  out = dict(zip(aliased, outs))
  h = jax.lax.dynamic_index_in_dim(out["hs"], final, keepdims=False).astype(h_BxD.dtype)
  sync = out["flags"] if state is None else SegmentState(out["flags"], out["hs"], out.get("qkv", state.qkv))
  res = h, ({"k": out["k"], "v": out["v"]} if attn_kind == "gqa" else kv), sync
  return res + (out["clocks"],) if cfg.timeline else res


def reference_segment(h_BxD, p: dict, kv: dict | None, cos_BxH, sin_BxH, mask_BxS, index, *, attn_kind: str,
                      ffn_kind: str, num_heads: int, num_kv_heads: int = 0, eps: float = 1e-5) -> tuple:
  """`decode_segment` in plain jnp, one layer after another (the residual kept in float32 across
  the run, as the kernel does) -> (h, kv)."""
  h = h_BxD.astype(F32)
  dt = h_BxD.dtype
  n = next(iter(p.values())).shape[0]
  for i in range(n):
    w = {k: v[i] for k, v in p.items()}
    if attn_kind == "gqa":
      qkv = reference_matmul(h.astype(dt), w["wqkv_ExD"], norm_D=w["attn_norm_D"], eps=eps)
      o, k, v = reference_decode_attention(qkv, cos_BxH, sin_BxH, mask_BxS, kv["k"], kv["v"], i, index,
                                           num_heads=num_heads, num_kv_heads=num_kv_heads)
      kv = {"k": k, "v": v}
      h = h + _round(o.astype(F32) @ w["wo_DxA"].astype(F32).T, dt)
    elif attn_kind == "linear":
      h = h + reference_matmul(h.astype(dt), w["wa_DxD"], norm_D=w["attn_norm_D"], eps=eps).astype(F32)
    if ffn_kind == "swiglu":
      act = reference_matmul(h.astype(dt), w["wgu_2xFxD"], norm_D=w["ffn_norm_D"], eps=eps, swiglu=True)
      h = h + reference_matmul(act, w["wd_DxF"]).astype(F32)
    elif ffn_kind == "linear":
      h = h + reference_matmul(h.astype(dt), w["wf_DxD"], norm_D=w["ffn_norm_D"], eps=eps).astype(F32)
  return h.astype(dt), kv
