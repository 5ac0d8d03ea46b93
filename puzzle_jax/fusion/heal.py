"""Short local distillation of a fused FFN run (FFN Fusion's optional healing step).

The fused FFN starts as the exact concatenation of its members (`model.fuse_ffn_params`), which
equals the members run in parallel. Here it is trained to reproduce what the members computed in
sequence: on calibration text, the run's input h_in and its sequential output h_out are recorded
from the unfused model, and the fused FFN's params minimize
  || h_in + FFN(h_in) - h_out ||^2 / || h_out - h_in ||^2
(BLD's normalized MSE, one block, Adam). Axis legend: N sequences, B batch, L length, D hidden.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from puzzle_jax.core import model
from puzzle_jax.core.arch import Arch, fuse_ffn_run


@dataclasses.dataclass(frozen=True)
class HealSettings:
  steps: int = 20  # Adam steps
  lr: float = 1e-4  # constant learning rate
  batch_size: int = 2  # sequences per step


def run_io(arch: Arch, params: model.Params, tokens_BxL, run: Sequence[int]) -> tuple[jax.Array, jax.Array]:
  """(input of the run's first block, output of its last) on the sequential model."""
  rec = {}

  def hook(i, h, a, mid, f):
    if i == run[0]:
      rec["in"] = h
    if i == run[-1]:
      rec["out"] = mid + f
  # The blocks only: the LM head (49k-wide for SmolLM2) is not needed for the targets.
  model.run_blocks(arch, params, model.embed(params, tokens_BxL), model.forward_ctx(arch, tokens_BxL), hook=hook)
  return rec["in"], rec["out"]


def _loss(p, h_in, h_out, spec, arch):
  pred = h_in + model.ffn_apply(p, h_in, spec, arch)
  return jnp.sum((pred - h_out) ** 2) / jnp.sum((h_out - h_in) ** 2)


def heal_fused(arch: Arch, params: model.Params, run: Sequence[int], tokens_NxL: np.ndarray,
               s: HealSettings = HealSettings()) -> tuple[Arch, model.Params, list[float]]:
  """(fused arch, fused params after `s.steps` steps, per-step losses) for an FFN-only run of the
  sequential `arch`."""
  run = list(run)
  fused_arch, fused = fuse_ffn_run(arch, run), model.fuse_ffn_params(arch, params, run)
  spec = fused_arch.blocks[run[0]].ffn
  io_fn = jax.jit(lambda p, t: run_io(arch, p, t, run))
  opt = optax.adam(s.lr)
  p0 = fused["model"]["layers"][run[0]]

  @jax.jit
  def step(p, state, h_in, h_out):
    loss, g = jax.value_and_grad(_loss)(p, h_in, h_out, spec, fused_arch)
    upd, state = opt.update(g, state, p)
    return optax.apply_updates(p, upd), state, loss

  p, state, losses = p0, opt.init(p0), []
  n = len(tokens_NxL)
  from tqdm.auto import tqdm
  for k in tqdm(range(s.steps), desc="heal fused run", leave=False):
    idx = [(k * s.batch_size + j) % n for j in range(s.batch_size)]
    h_in, h_out = io_fn(params, jnp.asarray(tokens_NxL[idx]))
    p, state, loss = step(p, state, h_in, h_out)
    losses.append(float(loss))
  layers = list(fused["model"]["layers"])
  layers[run[0]] = p
  return fused_arch, {**fused, "model": {**fused["model"], "layers": layers}}, losses
