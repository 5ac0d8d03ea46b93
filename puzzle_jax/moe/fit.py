"""Blockwise local distillation of one MoE FFN: fit a student MoE's output to a target on the
layer's own (normalized) inputs, as BLD does for every candidate. Used to train the upcycled
router against the dense FFN and a pruned MoE (router + kept experts) against the parent MoE."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from puzzle_jax.moe import layer as moe_layer

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class FitSettings:
  steps: int = 100  # AdamW steps per layer.
  lr: float = 1e-3  # peak learning rate (cosine decay to 10%).
  batch_tokens: int = 1024  # tokens per step, drawn from the calibration activations.
  router_only: bool = False  # train only the router (the upcycled experts are exact slices already).
  dense: bool = True  # every expert on every token (same function): faster on CPU at small E.
  seed: int = 0


def nmse(y_hat, y) -> jax.Array:
  return jnp.sum(jnp.square(y_hat - y)) / (jnp.sum(jnp.square(y)) + 1e-12)


def fit(mlp: Params, x_NxD: jax.Array, y_NxD: jax.Array, top_k: int, s: FitSettings) -> tuple[Params, list[float]]:
  """AdamW on NMSE(moe(x), y); returns (params, per-step losses)."""
  labels = {"router": jax.tree.map(lambda _: "train", mlp["router"]),
            "experts": jax.tree.map(lambda _: "freeze" if s.router_only else "train", mlp["experts"])}
  sched = optax.cosine_decay_schedule(s.lr, max(s.steps, 1), alpha=0.1)
  opt = optax.multi_transform({"train": optax.adamw(sched, weight_decay=0.0), "freeze": optax.set_to_zero()},
                              labels)

  @jax.jit
  def step(p, o, idx):
    loss, g = jax.value_and_grad(lambda q: nmse(apply(q, x_NxD[idx][None], top_k)[0], y_NxD[idx]))(p)
    u, o = opt.update(g, o, p)
    return optax.apply_updates(p, u), o, loss

  apply = moe_layer.dense_reference if s.dense else moe_layer.moe_apply
  opt_state = opt.init(mlp)
  key = jax.random.PRNGKey(s.seed)
  losses = []
  n = x_NxD.shape[0]
  for t in range(s.steps):
    idx = jax.random.choice(jax.random.fold_in(key, t), n, (min(s.batch_tokens, n),), replace=False)
    mlp, opt_state, loss = step(mlp, opt_state, idx)
    losses.append(float(loss))
  return mlp, losses


def moe_nmse(mlp: Params, x_NxD: jax.Array, y_NxD: jax.Array, top_k: int) -> float:
  return float(nmse(moe_layer.moe_apply(mlp, x_NxD[None], top_k)[0], y_NxD))
