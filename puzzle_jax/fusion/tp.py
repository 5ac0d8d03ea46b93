"""Tensor parallelism of a (fused) SwiGLU FFN over one mesh axis: one all-reduce per FFN.

Megatron's split: gate/up rows (the F axis) and down columns are sharded over `axis`, the input and
its RMSNorm are replicated, each device computes its slice of the intermediate, its partial down
projection, and one `psum` adds the partials. A fused run of k FFNs is one such FFN, so it costs
one all-reduce where the k members in sequence would cost k (FFN Fusion's TP argument).

Axis legend: B batch, L sequence, D hidden, F FFN width (F/n per device).
"""

from __future__ import annotations

import dataclasses

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from puzzle_jax.core import model
from puzzle_jax.core.arch import Arch, ArchError, FFNSpec


def _param_specs(axis: str) -> dict:
  return {"post_attention_layernorm": {"weight": P()},
          "mlp": {"gate_proj": {"weight": P(axis, None)}, "up_proj": {"weight": P(axis, None)},
                  "down_proj": {"weight": P(None, axis)}}}


def ffn_apply_tp(p: model.Params, h_BxLxD: jax.Array, spec: FFNSpec, arch: Arch, mesh: Mesh,
                 axis: str = "model") -> jax.Array:
  """`model.ffn_apply` for a SwiGLU, F sharded over `mesh` axis `axis`; equal to it up to the
  order of the final sum."""
  n = mesh.shape[axis]
  if spec.kind != "swiglu" or spec.intermediate_size % n:
    raise ArchError(f"tensor-parallel FFN needs a swiglu whose width divides by the {n} devices of "
                    f"axis {axis!r}; got {spec}")
  local = dataclasses.replace(spec, intermediate_size=spec.intermediate_size // n)

  def shard(p_local, h):
    return jax.lax.psum(model.ffn_apply(p_local, h, local, arch), axis)

  specs = _param_specs(axis)
  p = jax.tree.map(lambda a, s: jax.reshard(a, NamedSharding(mesh, s)), p, specs)
  h_BxLxD = jax.reshard(h_BxLxD, NamedSharding(mesh, P()))
  return jax.shard_map(shard, mesh=mesh, in_specs=(specs, P()), out_specs=P())(p, h_BxLxD)


def count_all_reduces(fn, *args) -> int:
  """psum equations in `fn`'s jaxpr (nested ones included): the collectives it will issue."""
  def walk(jaxpr) -> int:
    n = 0
    for eqn in jaxpr.eqns:
      n += eqn.primitive.name.startswith("psum")
      for sub in _subjaxprs(eqn):
        n += walk(sub)
    return n
  return walk(jax.make_jaxpr(fn)(*args).jaxpr)


def _subjaxprs(eqn):
  """Jaxprs nested in an equation's params (pjit, shard_map, scan bodies)."""
  for v in eqn.params.values():
    for x in (v if isinstance(v, (list, tuple)) else [v]):
      if hasattr(x, "jaxpr") and hasattr(x.jaxpr, "eqns"):
        yield x.jaxpr
      elif hasattr(x, "eqns"):
        yield x
