"""Heterogeneous expert pruning (gpt-oss-puzzle): rank each layer's experts on calibration text,
keep the top E' (router rows sliced to match), and let BLD + the MIP choose E' per layer.

Importance signals per expert, from the parent's own routing on calibration tokens:
  frequency     fraction of tokens that route to it (in their top k)
  weight        mean routing weight it receives (0 on tokens that do not pick it)
  contribution  mean norm of its weighted output, ||w_te * expert_e(x_t)||, what removing it costs
`rank_by_kl` reports which signal ranks best (replace-1-block KL of the pruned layer).

Axis legend: T tokens, D hidden, E experts, K top-k.
"""

from __future__ import annotations

import functools
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from puzzle_jax.core import model
from puzzle_jax.core.arch import Arch, FFNSpec
from puzzle_jax.moe import fit as moe_fit
from puzzle_jax.moe import layer as moe_layer

Params = dict[str, Any]
SIGNALS = ("frequency", "weight", "contribution")


@functools.partial(jax.jit, static_argnums=0)
def ffn_inputs(arch: Arch, params: Params, tokens_BxL) -> dict[int, tuple[jax.Array, jax.Array]]:
  """{layer: (normalized FFN input [T, D], FFN output [T, D])} for every MoE or SwiGLU layer, one
  parent pass."""
  out = {}

  def hook(i, h_in, a, mid, f):
    if arch.blocks[i].ffn.kind in ("moe", "swiglu"):
      p = params["model"]["layers"][i]["post_attention_layernorm"]
      x = model.rms_norm(p, mid, arch.rms_eps)
      out[i] = (x.reshape(-1, x.shape[-1]), f.reshape(-1, f.shape[-1]))
  model.forward(arch, params, tokens_BxL, hook=hook)
  return out


def expert_stats(mlp: Params, x_TxD: jax.Array, top_k: int) -> dict[str, np.ndarray]:
  """Sums over tokens of the three importance signals, [E] each (divide by `tokens`); jittable."""
  E = mlp["router"]["weight"].shape[0]
  _, w_TxK, idx_TxK = moe_layer.route(mlp["router"], x_TxD, top_k)
  onehot_TxKxE = jax.nn.one_hot(idx_TxK, E, dtype=jnp.float32)
  e = mlp["experts"]
  norms = []
  for k in range(top_k):  # each token's k-th expert: a gather of that expert's weights per token
    ids = idx_TxK[:, k]
    sel = {n: v[ids] for n, v in e.items()}
    gu = jnp.einsum("td,tdf->tf", x_TxD, sel["gate_up_proj"]) + sel["gate_up_proj_bias"]
    y = jnp.einsum("tf,tfd->td", moe_layer.expert_activation(gu), sel["down_proj"]) + sel["down_proj_bias"]
    norms.append(jnp.linalg.norm(y, axis=-1) * w_TxK[:, k])
  norm_TxK = jnp.stack(norms, axis=1)
  return {"frequency": onehot_TxKxE.sum((0, 1)), "weight": jnp.einsum("tk,tke->e", w_TxK, onehot_TxKxE),
          "contribution": jnp.einsum("tk,tke->e", norm_TxK, onehot_TxKxE),
          "tokens": jnp.asarray(x_TxD.shape[0], jnp.float32)}


_expert_stats_jit = jax.jit(expert_stats, static_argnums=2)


def layer_stats(arch: Arch, params: Params, batches: Iterable[np.ndarray],
                max_tokens_per_step: int = 4096) -> dict[int, dict[str, np.ndarray]]:
  """Importance signals per MoE layer, summed over calibration batches then averaged per token."""
  sums: dict[int, dict[str, np.ndarray]] = {}
  for tokens in batches:
    moe_io = {i: xy for i, xy in ffn_inputs(arch, params, tokens).items() if arch.blocks[i].ffn.kind == "moe"}
    for i, (x, _) in moe_io.items():
      for lo in range(0, x.shape[0], max_tokens_per_step):
        s = _expert_stats_jit(params["model"]["layers"][i]["mlp"], x[lo:lo + max_tokens_per_step], arch.blocks[i].ffn.top_k)
        acc = sums.setdefault(i, {k: 0.0 for k in s})
        for k, v in s.items():
          acc[k] = acc[k] + np.asarray(v, np.float64)
  return {i: {k: s[k] / s["tokens"] for k in SIGNALS} for i, s in sums.items()}


def keep_ids(importance_E: np.ndarray, keep: int) -> np.ndarray:
  """The `keep` most important experts, in their original order (so E' = E is the identity)."""
  return np.sort(np.argsort(-np.asarray(importance_E), kind="stable")[:keep])


def prune_mlp(mlp: Params, ids: Sequence[int]) -> Params:
  """Keep experts `ids`: their weights and their router rows (the other logits simply vanish)."""
  ids = jnp.asarray(ids)
  return {"router": {k: v[ids] for k, v in mlp["router"].items()},
          "experts": {k: v[ids] for k, v in mlp["experts"].items()}}


def pruned_spec(spec: FFNSpec, num_experts: int, top_k: int | None = None) -> FFNSpec:
  k = min(top_k or spec.top_k, num_experts)
  return FFNSpec("moe", spec.intermediate_size, num_experts=num_experts, top_k=k)


def expert_counts(num_experts: int, fractions: Sequence[float], multiple: int = 1) -> list[int]:
  """E' per fraction (e.g. 1, 3/4, 1/2, 1/4), rounded down to `multiple` (the EP size: every layer's
  expert count must split evenly over the expert-parallel devices), at least `multiple`, distinct."""
  out = []
  for f in fractions:
    n = max(multiple, int(f * num_experts) // multiple * multiple)
    if n <= num_experts and n not in out:
      out.append(n)
  return out


def prune_layer(arch: Arch, params: Params, layer: int, importance_E: np.ndarray, keep: int,
                top_k: int | None = None) -> tuple[Arch, Params]:
  """The model with layer `layer`'s MoE cut to its `keep` most important experts."""
  spec = arch.blocks[layer].ffn
  layers = list(params["model"]["layers"])
  layers[layer] = {**layers[layer], "mlp": prune_mlp(layers[layer]["mlp"], keep_ids(importance_E, keep))}
  new_arch = arch.replace_block(layer, ffn=pruned_spec(spec, keep, top_k))
  return new_arch, {**params, "model": {**params["model"], "layers": layers}}


forward = jax.jit(model.forward, static_argnums=0)  # eager MoE dispatch is slow on CPU


def kl(ref_logits, logits) -> float:
  p, q = jax.nn.log_softmax(ref_logits, -1), jax.nn.log_softmax(logits, -1)
  return float(jnp.mean(jnp.sum(jnp.exp(p) * (p - q), -1)))


def rank_by_kl(arch: Arch, params: Params, stats: dict[int, dict[str, np.ndarray]], keep_fraction: float,
               tokens_BxL) -> dict[str, float]:
  """Mean over MoE layers of the replace-1-block KL when that layer keeps `keep_fraction` of its
  experts chosen by each signal: lower = the signal ranks experts better."""
  ref = forward(arch, params, tokens_BxL)
  out = {}
  for sig in SIGNALS:
    kls = []
    for i, s in stats.items():
      keep = max(1, int(keep_fraction * arch.blocks[i].ffn.num_experts))
      a, p = prune_layer(arch, params, i, s[sig], keep)
      kls.append(kl(ref, forward(a, p, tokens_BxL)))
    out[sig] = float(np.mean(kls))
  return out


def bld_pruned(arch: Arch, params: Params, layer: int, pruned_mlp: Params, top_k: int, batches: Iterable[np.ndarray],
               settings: moe_fit.FitSettings) -> tuple[Params, dict[str, float]]:
  """BLD of a pruned MoE (router + kept experts) against the parent MoE's output at `layer`, on the
  parent's own inputs to that layer."""
  pairs = [ffn_inputs(arch, params, t)[layer] for t in batches]
  x, y = jnp.concatenate([p[0] for p in pairs]), jnp.concatenate([p[1] for p in pairs])
  before = moe_fit.moe_nmse(pruned_mlp, x, y, top_k)
  trained, _ = moe_fit.fit(pruned_mlp, x, y, top_k, settings)
  return trained, {"nmse_init": before, "nmse_bld": moe_fit.moe_nmse(trained, x, y, top_k)}
