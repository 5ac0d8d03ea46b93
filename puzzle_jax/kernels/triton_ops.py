"""Pallas/Triton primitives the decode kernels are built from, public for experiments
(`benchmarks/grid_sync.py` times the grid barrier alone).

* `load`: a masked and/or L1-bypassing (volatile) load through one indexer.
* Grid barriers (`arrive`, `wait`, `call_counter`, `spin`): a persistent kernel (one program per
  SM, all resident at once) replaces kernel boundaries by them.
* `atomic_add` (relaxed float adds), `prefetch_share` (L2 prefetch hints), `asm` (inline PTX):
  Triton features Pallas does not expose, as primitives with their own lowering rules.
* Tagged words (`tagged`, `poll_tagged`): bf16 values carrying a 16-bit tag, polled by readers
  instead of a grid barrier.

Functions that lower differently in Pallas' interpreter take `interpret` (the resolved
`KernelConfig.interpreted`): the interpreter runs programs one after another and has no caches.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

F32 = jnp.float32


def compiler_params(num_warps: int, interpret: bool):
  if interpret:
    return None
  from jax.experimental.pallas import triton as plt
  return plt.CompilerParams(num_warps=num_warps, num_stages=2)


def load(ref, idx: tuple, mask=None, other: float = 0.0, *, l2: bool = False):
  """ref[idx], possibly past the end where `mask` is False (reads `other` there); one indexer
  only: Triton lowering takes no chained `.at`. `l2`: a volatile load past the L1 cache, for data
  other programs wrote earlier in the same (persistent) kernel (callers pass False in the
  interpreter, which has no L1)."""
  if mask is None and not l2:
    return ref[idx]
  from jax.experimental.pallas import triton as plt
  return plt.load(ref.at[idx], mask=mask, other=None if mask is None else other, volatile=l2)


def when(cond, fn) -> None:
  """fn() where `cond` holds (a Python True runs it unconditionally)."""
  if cond is True:
    fn()
  else:
    pl.when(cond)(fn)


# ----------------------------------------------------------------------------- grid barrier
# Arrival comes after a CTA barrier, so every thread's writes precede the arriving atomic's
# release. Two kinds (`KernelConfig.barrier`):
#   "counter": programs add 1 to a counter and spin until it reaches k * P at the call's k-th
#     barrier (one word polled). Calls alternate between two counters (by the parity of the decode
#     index, which grows by one per call); each call zeroes the other one for the next call.
#   "flags": program p writes epoch e into flags[p]; waiting spins until the minimum of all flags
#     reaches e (P words polled and reduced across the CTA). Epochs only grow over the flags'
#     lifetime (callers derive them from the decode step), so the flags need no reset.
# Spins are volatile (L1-bypassing) loads; data written inside the kernel is read the same way
# (from L2; an SM's L1 may hold stale lines; Pallas' `.cg` cache modifier does not lower in jax 0.10).
# A wait that spins past `max_spin` polls (a program that is not resident would otherwise hang the
# GPU) gives up and counts itself in flags[P]: results are then wrong and `sync_timeouts` says so.
def sync_flags(programs: int) -> jax.Array:
  """Fresh barrier state for `programs` programs: their flags (or, from the first two, the
  counters), then the timeout count."""
  return jnp.zeros((programs + 1,), jnp.int32)


def arrive(flags_ref, p, epoch, counter=None):
  """Program p is done with barrier `epoch` (flags), or adds itself to flags[counter] -> the
  word's old value (something a timer can wait for)."""
  from jax.experimental.pallas import triton as plt
  plt.debug_barrier()
  if counter is None:
    return plt.atomic_xchg(flags_ref, (p,), epoch)
  return plt.atomic_add(flags_ref, (counter,), 1)


def wait(flags_ref, programs: int, epoch, counter=None, *, max_spin: int):
  """Spin until all `programs` arrived at barrier `epoch` (with a counter: the call's epoch-th)
  -> whether they did (False: timed out). GPU only (barriers exist only with several programs)."""
  from jax.experimental.pallas import triton as plt
  pp = max(pl.next_power_of_2(programs), 16)
  lanes = jnp.arange(pp)

  def passed():
    if counter is not None:
      return plt.load(flags_ref.at[counter], volatile=True) >= epoch * programs
    f = plt.load(flags_ref.at[pl.ds(0, pp)], mask=lanes < programs, other=jnp.iinfo(jnp.int32).max,
                 volatile=True)
    return jnp.min(f) >= epoch

  _, pending = spin(lambda: (None, ~passed()), flags_ref, max_spin=max_spin, interpret=False)
  return ~pending


def spin(read, flags_ref, *, max_spin: int, interpret: bool):
  """read() -> (value, pending), repeated while pending, at most `max_spin` more times -> the last
  (value, pending). A spin that gives up counts a timeout in flags[-1] (results are then wrong)."""
  value, pending, _ = jax.lax.while_loop(lambda c: c[1] & (c[2] < max_spin), lambda c: (*read(), c[2] + 1),
                                         (*read(), jnp.int32(0)))
  pl.when(pending)(lambda: count_timeout(flags_ref, interpret))
  return value, pending


def count_timeout(flags_ref, interpret: bool) -> None:
  """flags[-1] += 1: a wait gave up (results are wrong; `sync_timeouts` reports it)."""
  atomic_add(flags_ref, (jnp.int32(flags_ref.shape[0] - 1),), jnp.int32(1), interpret=interpret)


def call_counter(flags_ref, p, call):
  """Barrier "counter": this call's counter (by the parity of its number, which grows by one per
  call); program 0 zeroes the other one for the next call (nobody polls it during this call)."""
  counter = jax.lax.rem(call, 2)
  pl.when(p == 0)(lambda: flags_ref.__setitem__(1 - counter, jnp.int32(0)))
  return counter


# ----------------------------------------------------------------------------- PTX features
def asm(code: str, constraints: str, args: list, dtype):
  """Elementwise inline PTX over same-shaped args (a scalar goes through a 1-element block)."""
  from jax.experimental.pallas import triton as plt
  shape = jnp.shape(args[0])
  blocks = [jnp.broadcast_to(a, shape or (1,)) for a in args]
  [y] = plt.elementwise_inline_asm(code, args=blocks, constraints=constraints, pack=1,
                                   result_shape_dtypes=[jax.ShapeDtypeStruct(shape or (1,), dtype)])
  return y if shape else jnp.sum(y)


@functools.cache
def _relaxed_add_p():
  """A float atomic add with relaxed ordering (PTX `red.relaxed.gpu`). Pallas' `atomic_add` is
  acquire-release, a fence around every element's add (measurably slower per layer: BENCHMARKS.md
  history). Sums need no ordering of their own: the barrier's release (`arrive`) orders them
  before the next phase. Pallas' own lowering rule, called with the ordering swapped (private jax
  API; tests/test_kernels.py checks it on the installed jax)."""
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


def atomic_add(ref, idx: tuple, val, mask=None, *, interpret: bool) -> None:
  """ref[idx] += val from many programs at once (relaxed; plain in the interpreter's one program)."""
  if interpret:
    from jax.experimental.pallas import triton as plt
    plt.store(ref.at[idx], load(ref, idx, mask) + val, mask=mask)
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


def prefetch_share(ref, lead: tuple, k, n: int, *, step_lines: int, interpret: bool) -> None:
  """Hint L2 to fetch share k (of n, traced) of ref[lead] (contiguous: the trailing axes), one
  request per 128-byte line, `step_lines` lines per loop step (a whole share at once would hold
  its addresses in registers). A no-op in the interpreter (it has no caches)."""
  if interpret:
    return
  from jax._src import tree_util
  from jax._src.state import primitives as sp
  per = 128 // jnp.dtype(ref.dtype).itemsize  # elements per line
  lines = -(-math.prod(ref.shape[len(lead):]) // per)
  ref, transforms = sp.get_ref_and_transforms(ref, lead + (0,) * (len(ref.shape) - len(lead)), "prefetch_l2")

  def body(t, carry):
    i, mask = share_lines(lines, n, k, t, step_lines)
    args, tree = tree_util.tree_flatten((ref, transforms, (i * per).astype(jnp.int32), mask.astype(jnp.int32)))
    _prefetch_p().bind(*args, args_tree=tree)
    return carry

  jax.lax.fori_loop(0, share_steps(lines, n, step_lines)[2], body, 0)


def share_steps(lines: int, n: int, step_lines: int) -> tuple[int, int, int]:
  """(lines per share, lines per loop step, loop steps) of one of n shares of `lines` lines."""
  share = -(-lines // n)
  step = min(step_lines, pl.next_power_of_2(share))
  return share, step, -(-share // step)


def share_lines(lines: int, n: int, k, t, step_lines: int):
  """Loop step t of share k of n over `lines` lines: (line numbers, mask of those in the share)."""
  share, step, _ = share_steps(lines, n, step_lines)
  i = k * share + t * step + jnp.arange(step)
  return i, (i < (k + 1) * share) & (i < lines)


# ----------------------------------------------------------------------------- tagged words
# Each bf16 value is stored with a 16-bit tag in one 32-bit word (the value's float32 bits, whose
# low half is zero for a bf16 value, or the tag). A reader polls the words it needs until all
# carry the expected tag: a single-copy atomic word needs no release fence, so the writer's phase
# ends without a grid barrier, and each reader waits only for the programs that wrote its words.
def tag_of(n):
  """A tag from a number unique to it in this call and the next (never 0: buffers start zeroed)."""
  return jax.lax.rem(n, 65535) + 1


def tagged(y, tag):
  """float32 values that are exact in bf16 -> words carrying `tag`."""
  return jax.lax.bitwise_or(jax.lax.bitcast_convert_type(y, jnp.int32) & -65536, tag)


def poll_tagged(ref, idxs: list, tag, flags_ref, *, max_spin: int, interpret: bool) -> list:
  """The words at idxs (blocks of one shape) once all carry `tag` -> their float32 values (`spin`:
  after `max_spin` polls, a timeout is counted, as for a barrier wait, and what was read is returned)."""
  def once():
    ws = [load(ref, i, l2=not interpret) for i in idxs]
    # elementwise over the blocks first: one reduction per poll instead of one per block
    return ws, jnp.max(functools.reduce(jnp.maximum, [((w & 0xFFFF) != tag).astype(jnp.int32) for w in ws])) > 0

  ws, _ = spin(once, flags_ref, max_spin=max_spin, interpret=interpret)
  return [jax.lax.bitcast_convert_type(w & -65536, F32) for w in ws]
