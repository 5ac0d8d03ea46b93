"""Evaluate children against the parent, and the baselines the MIP child must beat.

Metrics on held-out text: perplexity, KL(parent || model) and top-1 agreement with the parent.
Baselines at the same predicted cost as the MIP child: (a) one uniform candidate pair for every
layer, (b) ShortGPT-style whole-block dropping ranked by block influence 1 - cos(h_in, h_out).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from puzzle_jax.core import model
from puzzle_jax.core.arch import Arch, variant_key
from puzzle_jax.search.scoring import token_metrics

Params = dict[str, Any]


@functools.partial(jax.jit, static_argnums=(0,))
def _logp(arch: Arch, params: Params, tokens_BxL):
  return jax.nn.log_softmax(model.forward(arch, params, tokens_BxL), axis=-1)


@functools.partial(jax.jit, static_argnums=(0,))
def _metrics(arch: Arch, params: Params, ref_logp_BxLxV, tokens_BxL):
  return token_metrics(model.forward(arch, params, tokens_BxL), ref_logp_BxLxV, tokens_BxL)


class Reference:
  """The parent's next-token distributions on fixed held-out batches, computed once."""

  def __init__(self, arch: Arch, params: Params, tokens_NxL: np.ndarray, batch_size: int = 4):
    self.batches = [jnp.asarray(tokens_NxL[i:i + batch_size]) for i in range(0, len(tokens_NxL), batch_size)]
    self.logp = [_logp(arch, params, t) for t in self.batches]
    self.num_tokens = len(tokens_NxL) * (tokens_NxL.shape[1] - 1)

  def evaluate(self, arch: Arch, params: Params) -> dict[str, float]:
    """Perplexity, LM loss, KL(parent || model) and top-1 agreement, token-averaged."""
    sums = {"kl": 0.0, "nll": 0.0, "agree": 0.0}
    for tokens, ref in zip(self.batches, self.logp):
      m = _metrics(arch, params, ref, tokens)
      for k in sums:
        sums[k] += float(m[k])
    n = self.num_tokens
    return {"lm_loss": sums["nll"] / n, "ppl": math.exp(sums["nll"] / n), "kl": sums["kl"] / n,
            "top1": sums["agree"] / n}


def block_influence(arch: Arch, params: Params, tokens_NxL: np.ndarray, batch_size: int = 4) -> np.ndarray:
  """ShortGPT's BI per block: 1 - mean cosine(block input, block output) over tokens."""
  @jax.jit
  def one(params, tokens):
    rec = []
    model.forward(arch, params, tokens, hook=lambda i, h, a, mid, f: rec.append(_cos(h, mid + f)))
    return jnp.stack(rec)

  total = sum(np.asarray(one(params, jnp.asarray(tokens_NxL[i:i + batch_size])))
              for i in range(0, len(tokens_NxL), batch_size))
  return 1.0 - total / len(tokens_NxL)


def _cos(a_BxLxD, b_BxLxD) -> jax.Array:
  a, b = a_BxLxD.astype(jnp.float32), b_BxLxD.astype(jnp.float32)
  cos = jnp.sum(a * b, -1) / (jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1) + 1e-9)
  return jnp.sum(jnp.mean(cos, axis=-1))  # sum over batch, mean over tokens


def shortgpt_choices(arch: Arch, bi: np.ndarray,
                     fits: Callable[[list], bool]) -> list[tuple[str, str]] | None:
  """Drop whole blocks (attention and FFN) in order of least influence until the budgets fit."""
  choices = [(variant_key(b.attn), variant_key(b.ffn)) for b in arch.blocks]
  for i in np.argsort(bi, kind="stable"):
    if fits(choices):
      return choices
    choices[i] = ("attn/noop", "ffn/noop")
  return choices if fits(choices) else None


def uniform_choices(num_layers: int, attn_keys: Sequence[str], ffn_keys: Sequence[str],
                    fits: Callable[[list], bool],
                    score_of: Callable[[list], float]) -> list[tuple[str, str]] | None:
  """The best-scoring single (attention, FFN) pair used in every layer that fits the budgets."""
  feasible = [[(a, f)] * num_layers for a in attn_keys for f in ffn_keys if fits([(a, f)] * num_layers)]
  return min(feasible, key=score_of) if feasible else None


def compare_at(problem, library, parent_params: Params, ref: Reference, bi: np.ndarray,
               speedup: float) -> dict[str, dict]:
  """MIP child vs the two baselines at one decode-speed target (same budgets), measured."""
  from puzzle_jax.search import mip
  from puzzle_jax.search.realize import realize
  n = library.arch.num_layers
  keys = lambda sub: [c.key for c in library.at(0, sub)
                      if all(c.key in {d.key for d in library.at(i, sub)} for i in range(n))]
  fits = lambda ch: problem.fits(ch, speedup)
  score = lambda ch: problem.totals(ch)[0]
  # ShortGPT drops whole blocks: only a baseline when every layer offers no-op candidates (a gpt-oss
  # search, whose export format has no no-op blocks, turns them off).
  droppable = all(f"{sub}/noop" in keys(sub) for sub in ("attn", "ffn"))
  try:
    mip_choices = list(problem.solve(speedup).choices)
  except mip.InfeasibleError:
    mip_choices = None
  out = {}
  for name, choices in (("mip", mip_choices),
                        ("uniform", uniform_choices(n, keys("attn"), keys("ffn"), fits, score)),
                        ("shortgpt", shortgpt_choices(library.arch, bi, fits) if droppable else None)):
    if choices is None:
      out[name] = {"infeasible": True}
      continue
    arch, params = realize(library, parent_params, choices)
    objective, totals = problem.totals(choices)
    out[name] = {**ref.evaluate(arch, params), "objective": objective,
                 "predicted_decode_speedup": problem.parent_totals["decode_s"] / totals["decode_s"],
                 "params": arch.num_params(), "choices": [list(c) for c in choices]}
  return out


def evaluate_search(parent_arch: Arch, parent_params: Params, library, problem, tokens_NxL: np.ndarray,
                    batch_size: int, target_speedup: float, sweep_speedups: Sequence[float]) -> dict[str, Any]:
  """The report: the parent's metrics, and MIP child vs both baselines at each speed of the sweep."""
  from tqdm.auto import tqdm
  ref = Reference(parent_arch, parent_params, tokens_NxL, batch_size)
  bi = block_influence(parent_arch, parent_params, tokens_NxL, batch_size)
  targets = sorted(set(sweep_speedups) | {target_speedup})
  sweep = {t: compare_at(problem, library, parent_params, ref, bi, t) for t in tqdm(targets, desc="evaluate")}
  return {"parent": {**ref.evaluate(parent_arch, parent_params), "params": parent_arch.num_params(),
                     "predicted_totals": problem.parent_totals},
          "target_decode_speedup": target_speedup,
          "at_target": sweep[target_speedup],
          "sweep": [{"target_speedup": t, **r} for t, r in sweep.items()],
          "block_influence": bi.tolist(), "eval_tokens": int(tokens_NxL.size)}


def realized_at(library, parent_params: Params, compared: Mapping[str, dict]) -> dict[str, tuple[Arch, Params]]:
  """(arch, params) of every feasible model of a `compare_at` result, rebuilt from its choices."""
  from puzzle_jax.search.realize import realize
  return {name: realize(library, parent_params, [tuple(c) for c in r["choices"]])
          for name, r in compared.items() if "choices" in r}


def plot_sweep(report: Mapping[str, Any], png) -> None:
  """Measured KL to the parent vs predicted decode speedup, MIP vs baselines."""
  from puzzle_jax.search import mip
  pts = [(name, r[name]["predicted_decode_speedup"], r[name]["kl"])
         for r in report["sweep"] for name in ("mip", "uniform", "shortgpt") if "kl" in r[name]]
  mip.plot_pareto(pts, png, xlabel="predicted decode speedup (cost model)",
                  ylabel="KL(parent || child), held-out text", title="accuracy-speed frontier")


def print_report(report: Mapping[str, Any]) -> None:
  p = report["parent"]
  print(f"parent: ppl {p['ppl']:.3f}, params {p['params']:,}")
  print(f"{'target':>7} {'model':<9} {'pred.speedup':>12} {'KL':>8} {'top1':>6} {'ppl':>9} {'params':>12}")
  for r in report["sweep"]:
    for name in ("mip", "uniform", "shortgpt"):
      m = r[name]
      if "kl" not in m:
        print(f"{r['target_speedup']:>7.2f} {name:<9} {'infeasible':>12}")
        continue
      print(f"{r['target_speedup']:>7.2f} {name:<9} {m['predicted_decode_speedup']:>12.3f} {m['kl']:>8.4f} "
            f"{m['top1']:>6.3f} {m['ppl']:>9.3f} {m['params']:>12,}")
