"""Profiling of the persistent kernel: SM clock readings at points of every phase (a timeline).

Compiled only for a `KernelConfig(timeline=True)` (its own jit cache entry, never the production
kernel); `benchmarks/segment_profile.py --timeline` reads and summarizes it. Other profiling
knobs (`profile_skip`, `profile_layer0`) change what the kernel does, not what it records.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from puzzle_jax.kernels import triton_ops as tops

# Columns of the timeline, per program and phase: when it arrived at the barrier after the phase,
# left it, had the phase's data, was half way (attention: first cache block done; FFN: SiLU * up
# done), had the result (before the adds / stores). Row 0: the program's start, in column "left".
TIMELINE_POINTS = ("arrived", "left", "data in", "half way", "result")


def clock(after, interpret: bool) -> jax.Array:
  """This SM's cycle counter (int32, wraps), read per element of `after` once it is known (the data
  dependence keeps the read behind what produced it). 0 in the interpreter."""
  if interpret:
    return jnp.zeros(jnp.shape(after), jnp.int32)
  float_ = jnp.issubdtype(jnp.result_type(after), jnp.floating)
  return tops.asm("mov.u32 $0, %clock;", "=r," + ("f" if float_ else "r"), [after], jnp.int32)


def gate(x, t, interpret: bool):
  """x, made to depend on clock readings t (NaN / 0 where t == 2**32 - 1: never in practice), so
  that what uses x waits for the reading and the compiler cannot sink the reading past it."""
  if interpret:
    return x
  if jnp.issubdtype(jnp.result_type(x), jnp.floating):
    return tops.asm("{ .reg .pred p; setp.eq.u32 p, $2, 4294967295; selp.f32 $0, 0f7FC00000, $1, p; }", "=f,f,r",
                    [x, t], jnp.float32)
  return tops.asm("{ .reg .pred p; setp.eq.u32 p, $2, 4294967295; selp.b32 $0, 0, $1, p; }", "=r,r,r", [x, t],
                  jnp.int32)


def stamp(clocks_ref, p, slot, point: str, x, *, interpret: bool):
  """Record program p's clock at `point` of timeline row `slot` once x is known -> x, gated on the
  reading (so that what follows waits for it)."""
  t = clock(x, interpret)
  clocks_ref[p, slot, jnp.int32(TIMELINE_POINTS.index(point))] = jnp.max(t) if jnp.ndim(t) else t
  return gate(x, t, interpret)
