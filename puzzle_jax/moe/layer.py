"""The gpt-oss MoE FFN (transformers' `GptOssMLP`) as pure functions, computed grouped by expert.

Params (HF layout, `mlp.` prefix): `router.weight [E, D]`, `router.bias [E]`,
`experts.gate_up_proj [E, D, 2F]` (gate and up interleaved on the last axis: `[..., ::2]` is gate),
`experts.gate_up_proj_bias [E, 2F]`, `experts.down_proj [E, F, D]`, `experts.down_proj_bias [E, D]`.

Routing: top-k of the router logits, softmax over those k. Expert activation: gate clamped above at
`LIMIT`, up clamped to +-LIMIT, `(up + 1) * gate * sigmoid(ALPHA * gate)`.

Compute: the T*k (token, expert) assignments are sorted by expert and each expert's rows go through
one `jax.lax.ragged_dot` (a grouped GEMM), so work is O(T*k), not O(T*E) as a dense loop over
experts would be. `dense_reference` is the brute-force version the tests compare against.

Axis legend: T tokens, D hidden, E experts, F expert width, A = T*k assignments, K top-k.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Params = dict[str, Any]
ALPHA = 1.702  # gpt-oss swiglu_alpha
LIMIT = 7.0  # gpt-oss swiglu_limit


def route(router: Params, x_TxD: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(router logits [T, E], weights [T, K] (softmax over the top k), expert ids [T, K])."""
  logits_TxE = x_TxD @ router["weight"].astype(x_TxD.dtype).T + router["bias"].astype(x_TxD.dtype)[None]
  top_TxK, idx_TxK = jax.lax.top_k(logits_TxE, top_k)
  return logits_TxE, jax.nn.softmax(top_TxK.astype(jnp.float32), axis=-1).astype(x_TxD.dtype), idx_TxK


def expert_activation(gate_up_Ax2F: jax.Array) -> jax.Array:
  gate, up = gate_up_Ax2F[..., ::2], gate_up_Ax2F[..., 1::2]
  gate = jnp.minimum(gate, LIMIT)
  up = jnp.clip(up, -LIMIT, LIMIT)
  return (up + 1) * (gate * jax.nn.sigmoid(gate * ALPHA))


def grouped_experts(experts: Params, x_TxD: jax.Array, w_TxK: jax.Array, idx_TxK: jax.Array) -> jax.Array:
  """Sum over each token's k experts of weight * expert(x), one grouped GEMM per projection.

  Ids outside [0, E) (experts another device holds, see `moe_apply_ep`) sort last, outside every
  group: ragged_dot leaves those rows zero, and their weight is zeroed too."""
  T, K = idx_TxK.shape
  E = experts["gate_up_proj"].shape[0]
  dt = x_TxD.dtype
  local_A = (idx_TxK.reshape(-1) >= 0) & (idx_TxK.reshape(-1) < E)
  flat_A = jnp.where(local_A, idx_TxK.reshape(-1), E)
  order_A = jnp.argsort(flat_A, stable=True)
  expert_A = jnp.minimum(flat_A[order_A], E - 1)
  token_A = order_A // K
  sizes_E = jnp.bincount(flat_A, length=E + 1)[:E].astype(jnp.int32)
  gu = jax.lax.ragged_dot(x_TxD[token_A], experts["gate_up_proj"].astype(dt), sizes_E)
  h = expert_activation(gu + experts["gate_up_proj_bias"].astype(dt)[expert_A])
  y_AxD = jax.lax.ragged_dot(h, experts["down_proj"].astype(dt), sizes_E)
  w_A = jnp.where(local_A, w_TxK.reshape(-1), 0)[order_A]
  y_AxD = (y_AxD + experts["down_proj_bias"].astype(dt)[expert_A]) * w_A[:, None]
  return jnp.zeros_like(x_TxD).at[token_A].add(y_AxD)


def moe_apply(mlp: Params, x_BxLxD: jax.Array, top_k: int) -> jax.Array:
  """MoE FFN on normalized input -> [B, L, D]."""
  x_TxD = x_BxLxD.reshape(-1, x_BxLxD.shape[-1])
  _, w_TxK, idx_TxK = route(mlp["router"], x_TxD, top_k)
  return grouped_experts(mlp["experts"], x_TxD, w_TxK, idx_TxK).reshape(x_BxLxD.shape)


def moe_apply_ep(mlp: Params, x_BxLxD: jax.Array, top_k: int, mesh: jax.sharding.Mesh,
                 axis: str = "expert") -> jax.Array:
  """Expert parallelism: experts sharded over mesh axis `axis` (E divisible by its size), router and
  tokens replicated; each device runs its own experts' assignments, then one psum adds them up."""
  from jax.sharding import PartitionSpec as P
  n = mesh.shape[axis]
  E = mlp["experts"]["gate_up_proj"].shape[0]
  if E % n:
    raise ValueError(f"{E} experts do not split over {n} devices on mesh axis {axis!r}; pick an EP size "
                     f"that divides every layer's expert count (search.ep_size)")

  def local(router, experts, x_TxD):
    _, w_TxK, idx_TxK = route(router, x_TxD, top_k)
    offset = jax.lax.axis_index(axis) * (E // n)
    return jax.lax.psum(grouped_experts(experts, x_TxD, w_TxK, idx_TxK - offset), axis)

  x_TxD = x_BxLxD.reshape(-1, x_BxLxD.shape[-1])
  espec = jax.tree.map(lambda a: P(axis, *(None,) * (a.ndim - 1)), mlp["experts"])
  rspec = jax.tree.map(lambda a: P(), mlp["router"])
  f = jax.shard_map(local, mesh=mesh, in_specs=(rspec, espec, P()), out_specs=P(), check_vma=False)
  return f(mlp["router"], mlp["experts"], x_TxD).reshape(x_BxLxD.shape)


def dense_reference(mlp: Params, x_BxLxD: jax.Array, top_k: int) -> jax.Array:
  """Every expert on every token, weighted by a [T, E] routing matrix (zero off the top k)."""
  x_TxD = x_BxLxD.reshape(-1, x_BxLxD.shape[-1])
  e = mlp["experts"]
  E = e["gate_up_proj"].shape[0]
  _, w_TxK, idx_TxK = route(mlp["router"], x_TxD, top_k)
  w_TxE = jnp.sum(jax.nn.one_hot(idx_TxK, E, dtype=w_TxK.dtype) * w_TxK[..., None], axis=1)
  gu_ExTx2F = jnp.einsum("td,edf->etf", x_TxD, e["gate_up_proj"]) + e["gate_up_proj_bias"][:, None, :]
  y_ExTxD = jnp.einsum("etf,efd->etd", expert_activation(gu_ExTx2F), e["down_proj"]) + e["down_proj_bias"][:, None, :]
  return jnp.einsum("etd,te->td", y_ExTxD, w_TxE).reshape(x_BxLxD.shape)


def init(key: jax.Array, d: int, num_experts: int, width: int, dtype=jnp.float32) -> Params:
  kr, kg, kd = jax.random.split(key, 3)
  return {"router": {"weight": (jax.random.normal(kr, (num_experts, d)) * d ** -0.5).astype(dtype),
                     "bias": jnp.zeros((num_experts,), dtype)},
          "experts": {"gate_up_proj": (jax.random.normal(kg, (num_experts, d, 2 * width)) * d ** -0.5).astype(dtype),
                      "gate_up_proj_bias": jnp.zeros((num_experts, 2 * width), dtype),
                      "down_proj": (jax.random.normal(kd, (num_experts, width, d)) * width ** -0.5).astype(dtype),
                      "down_proj_bias": jnp.zeros((num_experts, d), dtype)}}
