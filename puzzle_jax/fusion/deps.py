"""Pairwise block dependency on calibration text, and the fusable runs it suggests (FFN Fusion §3).

dep[i, j] (i < j): how much block j's output changes when block i's contribution is removed from
block j's input, as the mean cosine distance over tokens between
  delta_j(h_j)  and  delta_j(h_j - delta_i(h_i)),
where h_k is block k's input on the parent's sequential path and delta_k its residual delta
(attention + FFN). A low dep[i, j] means j barely reads what i wrote, so the two can read one input
(be parallel, and fused when both are FFN-only) at little cost. The lower triangle is NaN.

Axis legend: W blocks in the analysed window, B batch, L sequence, D hidden.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from puzzle_jax.core import model
from puzzle_jax.core.arch import Arch

Params = dict


@dataclasses.dataclass(frozen=True)
class DepsSettings:
  start: int = 0  # first layer of the analysed window
  stop: int = 0  # one past the last (0 = the last layer)
  batch_size: int = 2  # sequences per forward
  threshold: float = 0.05  # a run's members must all have mutual dep <= this
  max_run: int = 8  # longest proposed run


def _block_delta(layer: Params, h_BxLxD: jax.Array, i: int, arch: Arch, ctx: model.Ctx) -> jax.Array:
  a, _, f, _ = model.block_apply(layer, h_BxLxD, i, arch, ctx, None)
  return a + f


def _cos_dist(x_BxLxD: jax.Array, y_BxLxD: jax.Array) -> jax.Array:
  """Mean over tokens of 1 - cos(x, y); tokens where both are ~0 count as unchanged."""
  dot = jnp.sum(x_BxLxD * y_BxLxD, -1)
  nx, ny = jnp.linalg.norm(x_BxLxD, axis=-1), jnp.linalg.norm(y_BxLxD, axis=-1)
  return jnp.mean(1.0 - dot / jnp.maximum(nx * ny, 1e-30))


def window_layers(arch: Arch, s: DepsSettings) -> list[int]:
  stop = s.stop or arch.num_layers
  if not 0 <= s.start < stop <= arch.num_layers or stop - s.start < 2:
    raise ValueError(f"fusion window [{s.start}, {stop}) must hold >= 2 of the {arch.num_layers} layers; "
                     "set fusion.start / fusion.stop")
  return list(range(s.start, stop))


def _batch_deps(arch: Arch, params: Params, tokens_BxL: jax.Array, window: tuple[int, ...]) -> jax.Array:
  """dep [W, W] on one batch (upper triangle filled, NaN below)."""
  ins, deltas = {}, {}

  def hook(i, h, a, mid, f):
    ins[i], deltas[i] = h, a + f
  model.forward(arch, params, tokens_BxL, hook=hook)
  ctx = model.forward_ctx(arch, tokens_BxL)
  layers = params["model"]["layers"]
  W = len(window)
  dep = jnp.full((W, W), jnp.nan)
  for b, j in enumerate(window):
    for a, i in enumerate(window[:b]):
      moved = _block_delta(layers[j], ins[j] - deltas[i], j, arch, ctx)
      dep = dep.at[a, b].set(_cos_dist(deltas[j], moved))
  return dep


_batch_deps_jit = jax.jit(_batch_deps, static_argnums=(0, 3))


def dependency_matrix(arch: Arch, params: Params, tokens_NxL: np.ndarray, s: DepsSettings) -> np.ndarray:
  """dep [W, W] over the window `s.start:s.stop`, averaged over batches of `tokens_NxL`."""
  window = tuple(window_layers(arch, s))
  from tqdm.auto import tqdm
  parts = [np.asarray(_batch_deps_jit(arch, params, jnp.asarray(tokens_NxL[k:k + s.batch_size]), window))
           for k in tqdm(range(0, len(tokens_NxL), s.batch_size), desc="fusion-deps", leave=False)]
  return np.mean(parts, axis=0)


def propose_runs(dep_WxW: np.ndarray, threshold: float, max_run: int, start: int = 0,
                 allowed: Sequence[bool] | None = None) -> list[list[int]]:
  """Greedy left to right: grow a run while every pair in it has dep <= threshold (layer indices,
  offset by `start`); `allowed[w]` False (e.g. a block keeping attention) breaks runs. Runs of 1
  are dropped."""
  W = dep_WxW.shape[0]
  ok = np.ones(W, bool) if allowed is None else np.asarray(allowed, bool)
  runs, cur = [], []
  for w in range(W):
    fits = ok[w] and len(cur) < max_run and all(dep_WxW[m, w] <= threshold for m in cur)
    if fits:
      cur.append(w)
      continue
    if len(cur) > 1:
      runs.append(cur)
    cur = [w] if ok[w] else []
  if len(cur) > 1:
    runs.append(cur)
  return [[start + w for w in r] for r in runs]


def plot_heatmap(dep_WxW: np.ndarray, start: int, path, runs: Sequence[Sequence[int]] = (),
                 title: str = "block dependency (cosine distance)") -> None:
  """dep as a heatmap (rows: removed block i, columns: affected block j), proposed runs boxed."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  W = dep_WxW.shape[0]
  fig, ax = plt.subplots(figsize=(1.2 + 0.45 * W, 1.0 + 0.4 * W))
  im = ax.imshow(np.ma.masked_invalid(dep_WxW), cmap="viridis")
  ticks = list(range(W))
  ax.set_xticks(ticks, [str(start + t) for t in ticks])
  ax.set_yticks(ticks, [str(start + t) for t in ticks])
  ax.set_xlabel("block j (output measured)")
  ax.set_ylabel("block i (contribution removed)")
  for r in runs:
    a, b = r[0] - start - 0.5, r[-1] - start + 0.5
    ax.add_patch(plt.Rectangle((a, a), b - a, b - a, fill=False, ec="red", lw=2))
  fig.colorbar(im, ax=ax)
  ax.set_title(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
