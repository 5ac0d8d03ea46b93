"""Sparse upcycling: a dense Llama-style parent (SmolLM2) -> a gpt-oss-shaped MoE with real quality.

Each SwiGLU FFN of width F is split along its channels into E experts of width F/E, written in
gpt-oss's expert form, exactly: with gate' = gate / ALPHA the gpt-oss activation gives
gate' * sigmoid(ALPHA gate') = silu(gate) / ALPHA; with up' = up / s - 1 (bias -1) the factor
(up' + 1) is up / s; and down' = down * ALPHA * s * k undoes both and the 1/k a uniform top-k
routing weight would apply. So with all E experts selected at equal weight the MoE equals the
dense FFN (up to gpt-oss's clamps, kept out of reach by `s`); with top-k < E a router, trained by
BLD against the dense FFN's output, picks which channel groups each token needs.

Attention becomes gpt-oss attention with zero biases and sinks at -1e4 (exp(-1e4) = 0: the sink
takes no weight), so the model is the same function and is exportable as gpt_oss_puzzle.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from puzzle_jax.core import model
from puzzle_jax.core.arch import Arch, ArchError, AttnSpec, FFNSpec
from puzzle_jax.moe import fit as moe_fit
from puzzle_jax.moe import layer as moe_layer
from puzzle_jax.moe import prune

Params = dict[str, Any]
SINK_OFF = -1e4  # a sink logit whose softmax weight underflows to exactly 0


@dataclasses.dataclass(frozen=True)
class UpcycleSettings:
  num_experts: int = 8  # experts per layer (must divide the FFN width).
  top_k: int = 2  # experts per token.
  up_margin: float = 1.5  # s = max(1, margin * amax|up| / (LIMIT - 1)): keeps up' inside gpt-oss's clamp.
  fit: moe_fit.FitSettings = moe_fit.FitSettings(steps=100, lr=3e-3, batch_tokens=256)  # router + experts


def _expert_tensors(mlp: Params, E: int, k: int, up_scale: float) -> Params:
  gate, up, down = (np.asarray(mlp[n]["weight"], np.float32) for n in ("gate_proj", "up_proj", "down_proj"))
  F, D = gate.shape
  f = F // E
  g_ExFxD, u_ExFxD = gate.reshape(E, f, D) / moe_layer.ALPHA, up.reshape(E, f, D) / up_scale
  gate_up = np.empty((E, D, 2 * f), np.float32)
  gate_up[..., ::2], gate_up[..., 1::2] = g_ExFxD.transpose(0, 2, 1), u_ExFxD.transpose(0, 2, 1)
  gu_bias = np.zeros((E, 2 * f), np.float32)
  gu_bias[:, 1::2] = -1.0
  down_ExFxD = down.T.reshape(E, f, D) * (moe_layer.ALPHA * up_scale * k)
  return {"gate_up_proj": gate_up, "gate_up_proj_bias": gu_bias, "down_proj": down_ExFxD,
          "down_proj_bias": np.zeros((E, D), np.float32)}


def gpt_oss_attention(arch: Arch, layer: Params, spec: AttnSpec) -> tuple[AttnSpec, Params]:
  a = dict(layer["self_attn"])
  a = {n: ({**v, "bias": jnp.zeros((v["weight"].shape[0],), v["weight"].dtype)} if n.endswith("_proj") else v)
       for n, v in a.items()}
  a["sinks"] = jnp.full((arch.num_heads,), SINK_OFF, jnp.float32)
  return dataclasses.replace(spec, bias=True, sinks=True), {**layer, "self_attn": a}


def upcycle_init(arch: Arch, params: Params, s: UpcycleSettings, up_amax: dict[int, float]) -> tuple[Arch, Params]:
  """The exact expert split (router zero: the fit trains it); see the module docstring."""
  layers, blocks = [], []
  for i, b in enumerate(arch.blocks):
    if b.ffn.kind != "swiglu" or b.ffn.intermediate_size % s.num_experts or b.attn.kind != "gqa":
      raise ArchError(f"layer {i} ({b.attn.kind}/{b.ffn.kind}): upcycling needs gqa attention and a swiglu FFN "
                      f"whose width is divisible by num_experts={s.num_experts}")
    attn, layer = gpt_oss_attention(arch, params["model"]["layers"][i], b.attn)
    scale = max(1.0, s.up_margin * up_amax[i] / (moe_layer.LIMIT - 1))
    experts = _expert_tensors(layer["mlp"], s.num_experts, s.top_k, scale)
    D = arch.hidden_size
    router = {"weight": np.zeros((s.num_experts, D), np.float32), "bias": np.zeros((s.num_experts,), np.float32)}
    layers.append({**layer, "mlp": jax.tree.map(jnp.asarray, {"router": router, "experts": experts})})
    f = b.ffn.intermediate_size // s.num_experts
    blocks.append(dataclasses.replace(b, attn=attn, ffn=FFNSpec("moe", f, num_experts=s.num_experts, top_k=s.top_k)))
  return (dataclasses.replace(arch, blocks=tuple(blocks)),
          {**params, "model": {**params["model"], "layers": layers}})


def router_init(experts: Params, x_TxD: jax.Array, ridge: float = 1e-2) -> Params:
  """Ridge regression of log ||expert_e(x_t)|| on x_t: the router starts by preferring the experts
  with the largest output for each token (a zero router would tie, and top-k would starve the rest)."""
  gu = jnp.einsum("td,edf->etf", x_TxD, experts["gate_up_proj"]) + experts["gate_up_proj_bias"][:, None, :]
  y = jnp.einsum("etf,efd->etd", moe_layer.expert_activation(gu), experts["down_proj"])
  z_TxE = jnp.log(jnp.linalg.norm(y, axis=-1).T + 1e-6)
  x1 = jnp.concatenate([x_TxD, jnp.ones((x_TxD.shape[0], 1), x_TxD.dtype)], axis=1)
  w = jnp.linalg.solve(x1.T @ x1 + ridge * jnp.eye(x1.shape[1]), x1.T @ z_TxE)  # [D+1, E]
  return {"weight": w[:-1].T, "bias": w[-1]}


def _dense_io(arch: Arch, params: Params, batches: list) -> dict[int, tuple[jax.Array, jax.Array, float]]:
  """Per layer: normalized FFN inputs, dense FFN outputs, and amax |up| over the calibration tokens."""
  pairs = [prune.ffn_inputs(arch, params, jnp.asarray(t)) for t in batches]
  out = {}
  for i in pairs[0]:
    x, y = jnp.concatenate([p[i][0] for p in pairs]), jnp.concatenate([p[i][1] for p in pairs])
    up = model.linear(params["model"]["layers"][i]["mlp"]["up_proj"], x)
    out[i] = (x, y, float(jnp.max(jnp.abs(up))))
  return out


def upcycle(arch: Arch, params: Params, batches: Iterable[np.ndarray],
            s: UpcycleSettings = UpcycleSettings()) -> tuple[Arch, Params, dict[int, dict[str, float]]]:
  """Dense parent -> (MoE arch, params, per-layer NMSE before/after the router fit).

  The router of each layer is fitted (BLD) to the dense FFN output on the layer's own parent inputs
  (teacher forcing: every layer sees the dense parent's activations)."""
  io = _dense_io(arch, params, list(batches))
  moe_arch, moe_params = upcycle_init(arch, params, s, {i: v[2] for i, v in io.items()})
  layers = list(moe_params["model"]["layers"])
  report = {}
  for i in tqdm(range(arch.num_layers), desc="upcycle: router BLD", unit="layer"):
    x, y, _ = io[i]
    mlp = {**layers[i]["mlp"], "router": router_init(layers[i]["mlp"]["experts"], x)}
    before = moe_fit.moe_nmse(mlp, x, y, s.top_k)
    mlp, _ = moe_fit.fit(mlp, x, y, s.top_k, s.fit)
    report[i] = {"nmse_init": before, "nmse_fit": moe_fit.moe_nmse(mlp, x, y, s.top_k)}
    layers[i] = {**layers[i], "mlp": mlp}
  return moe_arch, {**moe_params, "model": {**moe_params["model"], "layers": layers}}, report
