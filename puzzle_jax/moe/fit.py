"""Blockwise local distillation of one MoE FFN: fit a student MoE's output to a target on the
layer's own (normalized) inputs, as BLD does for every candidate. Used to train the upcycled
router against the dense FFN and a pruned MoE (router + kept experts) against the parent MoE."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
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


@functools.lru_cache(maxsize=None)
def _optimizer(s: FitSettings) -> optax.GradientTransformation:
  """One optimizer object per settings, so the jitted step below compiles once for all layers."""
  sched = optax.cosine_decay_schedule(s.lr, max(s.steps, 1), alpha=0.1)
  train = optax.adamw(sched, weight_decay=0.0)
  if not s.router_only:
    return train
  labels = lambda p: {"router": jax.tree.map(lambda _: "train", p["router"]),
                      "experts": jax.tree.map(lambda _: "freeze", p["experts"])}
  return optax.multi_transform({"train": train, "freeze": optax.set_to_zero()}, labels)


@functools.partial(jax.jit, static_argnames=("top_k", "s"))
def _step(p, o, x_TxD, y_TxD, *, top_k: int, s: FitSettings):
  apply = moe_layer.dense_reference if s.dense else moe_layer.moe_apply
  loss, g = jax.value_and_grad(lambda q: nmse(apply(q, x_TxD[None], top_k)[0], y_TxD))(p)
  u, o = _optimizer(s).update(g, o, p)
  return optax.apply_updates(p, u), o, loss


def fit(mlp: Params, x_NxD: jax.Array, y_NxD: jax.Array, top_k: int, s: FitSettings) -> tuple[Params, list[float]]:
  """AdamW on NMSE(moe(x), y) over random token batches; returns (params, per-step losses)."""
  opt_state = _optimizer(s).init(mlp)
  rng = np.random.default_rng(s.seed)
  n = x_NxD.shape[0]
  losses = []
  for _ in range(s.steps):
    idx = rng.choice(n, min(s.batch_tokens, n), replace=False)
    mlp, opt_state, loss = _step(mlp, opt_state, x_NxD[idx], y_NxD[idx], top_k=top_k, s=s)
    losses.append(loss)
  return mlp, [float(l) for l in losses]


def moe_nmse(mlp: Params, x_NxD: jax.Array, y_NxD: jax.Array, top_k: int) -> float:
  return float(nmse(moe_layer.moe_apply(mlp, x_NxD[None], top_k)[0], y_NxD))
