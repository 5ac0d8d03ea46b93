"""Replace-1-block scoring: the parent with exactly one sub-block swapped for a candidate.

For layer i the parent runs once up to i (its block input h_i and post-attention residual m_i are
kept from one parent pass). Each candidate c of layer i gives the next hidden state
  attention: h' = m' + f_i(m'),  m' = h_i + a_c(h_i)      FFN: h' = m_i + f_c(m_i)
and the parent's remaining layers + LM head run on h'. The candidates differ in shape, so their
cheap sub-block outputs are computed one by one, stacked on a candidate axis, and the expensive
shared tail is `jax.vmap`ped over fixed-size chunks of candidates (bounded [C, B, L, V] memory).
The tail's start layer is a traced value (`fori_loop` over stacked parent layers), so it compiles
once for all layers when the parent is uniform.

Metrics per candidate (means over held-out tokens): KL(parent || child) of the next-token
distribution (Puzzle's best score), LM-loss delta vs the parent, and top-1 agreement.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from puzzle_jax import artifacts
from puzzle_jax.search import candidates as cands
from puzzle_jax.core import model
from puzzle_jax.core.arch import Arch, ArchError

Params = dict[str, Any]
METRICS = ("kl", "lm_loss_delta", "one_minus_top1")


@dataclasses.dataclass(frozen=True)
class ScoreConfig:
  num_seqs: int = 8
  seq_len: int = 256
  batch_size: int = 4
  candidate_chunk: int = 4
  metric: str = "kl"


def token_metrics(logits_BxLxV: jax.Array, ref_logp_BxLxV: jax.Array, tokens_BxL: jax.Array) -> dict:
  """Sums over next-token positions of KL(ref || model), model NLL and top-1 agreement."""
  logp = jax.nn.log_softmax(logits_BxLxV[:, :-1].astype(jnp.float32), axis=-1)
  ref = ref_logp_BxLxV[:, :-1]
  kl = jnp.sum(jnp.exp(ref) * (ref - logp))
  nll = -jnp.sum(jnp.take_along_axis(logp, tokens_BxL[:, 1:, None], axis=-1))
  agree = jnp.sum(jnp.argmax(logp, -1) == jnp.argmax(ref, -1))
  return {"kl": kl, "nll": nll, "agree": agree.astype(jnp.float32)}


def _uniform(arch: Arch) -> bool:
  return len(set(arch.blocks)) == 1 and arch.blocks[0].parallel_group is None


def tail(arch: Arch, params: Params, h_BxLxD: jax.Array, start, ctx: model.Ctx) -> jax.Array:
  """Parent layers start.. then the LM head. `start` may be traced for uniform parents."""
  layers = params["model"]["layers"]
  if _uniform(arch):
    stacked = cands.stack(layers) if isinstance(layers, list) else layers

    def body(i, h):
      layer = jax.tree_util.tree_map(lambda x: jax.lax.dynamic_index_in_dim(x, i, keepdims=False), stacked)
      a, mid, f, _ = model.block_apply(layer, h, 0, arch, ctx, None)
      return h + a + f

    h_BxLxD = jax.lax.fori_loop(start, arch.num_layers, body, h_BxLxD)
  else:
    for i in range(int(start), arch.num_layers):
      a, mid, f, _ = model.block_apply(layers[i], h_BxLxD, i, arch, ctx, None)
      h_BxLxD = h_BxLxD + a + f
  return model.lm_head(arch, params, h_BxLxD)


def next_hidden(arch: Arch, layer_params: Params, c_sub: str, spec, cand_params: Params,
                parent_ffn, h_BxLxD, mid_BxLxD, ctx: model.Ctx) -> jax.Array:
  """Hidden state after the layer with only candidate c in it (parent_ffn: the layer's FFN spec)."""
  if c_sub == "attn":
    a, _ = model.attn_apply(cand_params, h_BxLxD, spec, arch, ctx)
    m = h_BxLxD + a
    return m + model.ffn_apply(layer_params, m, parent_ffn, arch)
  return mid_BxLxD + model.ffn_apply(cand_params, mid_BxLxD, spec, arch)


class Scorer:
  """Holds the jitted pieces for one parent; `score(library, tokens)` runs everything."""

  def __init__(self, arch: Arch, params: Params, cfg: ScoreConfig):
    if any(b.parallel_group is not None for b in arch.blocks):
      raise ArchError("scoring a parent with parallel groups is not supported; score the sequential parent")
    self.arch, self.cfg = arch, cfg
    self.params = params
    self.tail_params = ({**params, "model": {**params["model"], "layers": cands.stack(params["model"]["layers"])}}
                        if _uniform(arch) else params)
    # Params are arguments, never closed over: constants that size would be folded at compile time.
    self._acts = jax.jit(self._parent_pass)
    self._next = jax.jit(self._next_hidden, static_argnums=(0, 1, 2))
    self._tail = jax.jit(self._tail_metrics, static_argnums=() if _uniform(arch) else (2,))

  def _parent_pass(self, params, tokens_BxL):
    rec = {"h": [], "mid": []}

    def hook(i, h, a, mid, f):
      rec["h"].append(h)
      rec["mid"].append(mid)

    logits = model.forward(self.arch, params, tokens_BxL, hook=hook)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return jnp.stack(rec["h"]), jnp.stack(rec["mid"]), logp, token_metrics(logits, logp, tokens_BxL)

  def _next_hidden(self, sub, spec, parent_ffn, cand_params, layer_params, h, mid, tokens_BxL):
    ctx = model.forward_ctx(self.arch, tokens_BxL)
    return next_hidden(self.arch, layer_params, sub, spec, cand_params, parent_ffn, h, mid, ctx)

  def _tail_metrics(self, tail_params, h_CxBxLxD, start, ref_logp, tokens_BxL):
    ctx = model.forward_ctx(self.arch, tokens_BxL)
    one = lambda h: token_metrics(tail(self.arch, tail_params, h, start, ctx), ref_logp, tokens_BxL)
    # MoE tails map: ragged_dot has no vmap rule for shared (unbatched) expert weights.
    moe = any(b.ffn.kind == "moe" for b in self.arch.blocks)
    return jax.lax.map(one, h_CxBxLxD) if self.cfg.candidate_chunk == 1 or moe else jax.vmap(one)(h_CxBxLxD)

  def score(self, library: "Any", tokens_NxL: np.ndarray, *, progress: bool = True) -> dict[str, dict]:
    """Metrics for every candidate of `library` (a library.Library) on held-out tokens."""
    from tqdm.auto import tqdm
    sums: dict[str, dict[str, float]] = {}
    parent_sums = {"nll": 0.0}
    batches = [tokens_NxL[i:i + self.cfg.batch_size] for i in range(0, len(tokens_NxL), self.cfg.batch_size)]
    bar = tqdm(total=len(batches) * self.arch.num_layers, desc="score", disable=not progress)
    for tokens in batches:
      tokens = jnp.asarray(tokens, jnp.int32)
      h_all, mid_all, ref_logp, pm = self._acts(self.params, tokens)
      parent_sums["nll"] += float(pm["nll"])
      for layer in range(self.arch.num_layers):
        cs = library.at(layer, "attn") + library.at(layer, "ffn")
        layer_p, ffn_spec = self.params["model"]["layers"][layer], self.arch.blocks[layer].ffn
        hs = [self._next(c.sub, c.spec, ffn_spec, library.params(c, self.params), layer_p, h_all[layer],
                         mid_all[layer], tokens) for c in cs]
        for c, m in zip(cs, self._chunked_tail(hs, layer + 1, ref_logp, tokens)):
          acc = sums.setdefault(c.id, {"kl": 0.0, "nll": 0.0, "agree": 0.0})
          for k in acc:
            acc[k] += m[k]
        bar.update(1)
    bar.close()
    n_tok = len(tokens_NxL) * (tokens_NxL.shape[1] - 1)
    parent_loss = parent_sums["nll"] / n_tok
    return {cid: {"kl": s["kl"] / n_tok, "lm_loss": s["nll"] / n_tok,
                  "lm_loss_delta": s["nll"] / n_tok - parent_loss, "top1": s["agree"] / n_tok,
                  "one_minus_top1": 1 - s["agree"] / n_tok}
            for cid, s in sums.items()}

  def _chunked_tail(self, hs: Sequence[jax.Array], start: int, ref_logp, tokens) -> list[dict]:
    k = self.cfg.candidate_chunk
    out = []
    start_arg = jnp.asarray(start, jnp.int32) if _uniform(self.arch) else start
    for i in range(0, len(hs), k):
      chunk = hs[i:i + k]
      padded = chunk + [chunk[-1]] * (k - len(chunk))  # fixed chunk size: one compile
      m = jax.device_get(self._tail(self.tail_params, jnp.stack(padded), start_arg, ref_logp, tokens))
      out += [{key: float(v[j]) for key, v in m.items()} for j in range(len(chunk))]
    return out


SCORES_FORMAT = "puzzle_jax.scores/v1"


def save_scores(path: pathlib.Path, scores: Mapping[str, dict], meta: Mapping[str, Any]) -> None:
  artifacts.write_json(path, {"format": SCORES_FORMAT, **meta, "scores": scores})


def load_scores(path: pathlib.Path) -> dict[str, dict]:
  doc = artifacts.read_json(path, required=("scores",), fmt=SCORES_FORMAT)
  if not isinstance(doc["scores"], dict) or not all(isinstance(v, dict) for v in doc["scores"].values()):
    raise artifacts.ArtifactError(path, "'scores' is not a mapping of candidate id -> metrics")
  return doc["scores"]


def plot_heatmap(scores: Mapping[str, dict], library, png: pathlib.Path, metric: str = "kl") -> None:
  """Layers x candidate variants, colour = metric (log scale), one panel per sub-block."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.colors import LogNorm
  fig, axes = plt.subplots(1, 2, figsize=(12, 6), squeeze=False)
  n = library.arch.num_layers
  for ax, sub in zip(axes[0], ("attn", "ffn")):
    keys = list(dict.fromkeys(c.key for c in library.candidates if c.sub == sub))
    grid = np.full((n, len(keys)), np.nan)
    for c in library.candidates:
      if c.sub == sub and c.id in scores:
        grid[c.layer, keys.index(c.key)] = max(scores[c.id][metric], 1e-6)
    im = ax.imshow(grid, aspect="auto", cmap="viridis", norm=LogNorm())
    ax.set(xticks=range(len(keys)), yticks=range(0, n, max(1, n // 15)), xlabel="candidate",
           ylabel="layer", title=f"{sub}: replace-1-block {metric}")
    ax.set_xticklabels([k.split("/", 1)[1] for k in keys], rotation=45, ha="right", fontsize=7)
    fig.colorbar(im, ax=ax)
  fig.tight_layout()
  fig.savefig(png, dpi=120)
  plt.close(fig)
