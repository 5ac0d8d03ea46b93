r"""Ablations: BLD token budget, scoring metric, GKD loss mix and GKD tokens vs child quality.

  python experiments/ablations.py --config configs/ablations.py[:tiny|:gpu] [--sweeps=metric,gkd_mix]

A shared base run of the search (import, BLD, scores, costs with the analytic cost model) gives
the parent, the candidate library, replace-1-block scores and the cost table. Every child below is
the MIP's choice at the same predicted decode speedup (`target_speedup`), realized and measured
on held-out text against the parent (KL, perplexity, top-1 agreement):
  bld_tokens  BLD retrained with each step budget, rescored, re-chosen;
  metric      the same library and scores, the MIP objective switched (nmse = the BLD loss);
  gkd_mix     the base child after GKD with each (kl, lm, hidden) weight mix, same steps;
  gkd_tokens  the base child after GKD with each step budget.
Each sweep writes <out_dir>/<sweep>.json, .md and .png.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
from typing import Any

import jax
import numpy as np

from puzzle_jax import stages, training
from puzzle_jax.distill import gkd
from puzzle_jax.search import bld, costs, library as library_lib, scoring, select
from puzzle_jax.search.evaluate import Reference
from puzzle_jax.search.realize import realize


@dataclasses.dataclass
class Base:
  config: Any  # the search's ConfigDict (read here, at the experiment boundary, only)
  paths: stages.Paths
  arch: Any
  params: dict
  tok: Any
  library: library_lib.Library
  scores: dict
  table: dict
  ref: Reference


def base_run(search) -> Base:
  """The search's first stages (skipped when done) and their artifacts."""
  paths = stages.run(search, until="costs")
  arch, params = stages.load_parent(paths)
  tok = stages.load_tok(paths)
  library = library_lib.load_library(paths.library)
  table = costs.load_cost_table(paths.costs, library.arch, sorted(library.keys))
  held = stages.heldout_tokens(search, paths, tok, search.eval.num_seqs, search.eval.seq_len)
  return Base(search, paths, arch, params, tok, library, scoring.load_scores(paths.scores), table,
              Reference(arch, params, held, search.eval.batch_size))


def with_nmse(library: library_lib.Library, scores: dict) -> dict:
  """Scores plus each candidate's held-out BLD loss as the metric "nmse"."""
  return {cid: {**m, "nmse": library.bld_loss[cid]} for cid, m in scores.items()}


def child(base: Base, library, scores, metric: str, target: float):
  """The MIP's child at `target` under `metric`: (arch, params, predicted speedup)."""
  problem = select.build_problem(library, with_nmse(library, scores), base.table, metric,
                                 stages.targets(base.config.mip))
  sol = problem.solve(target)
  arch, params = realize(library, base.params, list(sol.choices))
  return arch, params, problem.parent_totals["decode_s"] / sol.totals["decode_s"]


def measure(base: Base, arch, params) -> dict[str, float]:
  return {k: float(v) for k, v in base.ref.evaluate(arch, jax.device_get(params)).items()}


# ----------------------------------------------------------------------------- sweeps
def sweep_bld_tokens(base: Base, c, out: pathlib.Path) -> list[dict]:
  from puzzle_jax.search import candidates as cands
  s, paths = base.config, base.paths
  lib_cands = cands.build_library(base.arch, stages.library_settings(s.library))
  score_cfg = stages.settings(scoring.ScoreConfig, s.score)
  score_toks = stages.heldout_tokens(s, paths, base.tok, score_cfg.num_seqs, score_cfg.seq_len)
  rows = []
  for steps in c.bld_steps:
    cfg = dataclasses.replace(stages.settings(bld.BLDConfig, s.bld), steps=steps, checkpoint_every=steps)
    split = lambda x: [x[i:i + cfg.batch_size] for i in range(0, len(x), cfg.batch_size)]
    calib = split(stages.heldout_tokens(s, paths, base.tok, cfg.calib_batches * cfg.batch_size, cfg.seq_len,
                                        split=s.data.train_split))
    held = split(stages.heldout_tokens(s, paths, base.tok, cfg.eval_batches * cfg.batch_size, cfg.seq_len))
    d = out / f"bld_{steps}"
    groups, trained = bld.train(base.arch, base.params, lib_cands, cfg,
                                stages.train_batches(s, paths, base.tok, cfg.batch_size, cfg.seq_len), calib, d,
                                mesh=training.make_mesh(s.mesh), key=jax.random.PRNGKey(s.seed), progress=False)
    losses = bld.evaluate(base.arch, base.params, groups, trained, held)
    library_lib.save_library(d / "library", base.arch, lib_cands, groups, trained, losses, cfg)
    library = library_lib.load_library(d / "library")
    scores = scoring.Scorer(base.arch, base.params, score_cfg).score(library, score_toks, progress=False)
    arch, params, speedup = child(base, library, scores, "kl", c.target_speedup)
    rows.append({"bld_steps": steps, "bld_tokens": steps * cfg.batch_size * cfg.seq_len,
                 "predicted_speedup": speedup, **measure(base, arch, params)})
  return rows


def sweep_metric(base: Base, c, out: pathlib.Path) -> list[dict]:
  rows = []
  for metric in c.metrics:
    arch, params, speedup = child(base, base.library, base.scores, metric, c.target_speedup)
    rows.append({"metric": metric, "predicted_speedup": speedup, **measure(base, arch, params)})
  return rows


def _gkd(base: Base, arch, params, cfg: gkd.GKDConfig, d: pathlib.Path) -> dict:
  if cfg.steps == 0:
    return measure(base, arch, params)
  trained = gkd.train(arch, params, base.arch, base.params, cfg,
                      stages.train_batches(base.config, base.paths, base.tok, cfg.batch_size, cfg.seq_len), d,
                      mesh=training.make_mesh((("data", 1),), jax.devices()[:1]), progress=False)
  return measure(base, arch, trained)


def sweep_gkd_mix(base: Base, c, out: pathlib.Path) -> list[dict]:
  arch, params, speedup = child(base, base.library, base.scores, "kl", c.target_speedup)
  cfg0 = dataclasses.replace(stages.settings(gkd.GKDConfig, base.config.gkd), steps=c.gkd.steps,
                             checkpoint_every=c.gkd.steps)
  rows = []
  for name, (kl, lm, hidden) in c.gkd.mixes.items():
    cfg = dataclasses.replace(cfg0, kl_weight=kl, lm_weight=lm, hidden_weight=hidden, hidden_loss="cosine")
    rows.append({"mix": name, "kl_weight": kl, "lm_weight": lm, "hidden_weight": hidden,
                 "predicted_speedup": speedup, **_gkd(base, arch, params, cfg, out / f"gkd_mix_{name}")})
  return rows


def sweep_gkd_tokens(base: Base, c, out: pathlib.Path) -> list[dict]:
  arch, params, speedup = child(base, base.library, base.scores, "kl", c.target_speedup)
  cfg0 = stages.settings(gkd.GKDConfig, base.config.gkd)
  rows = []
  for steps in c.gkd.step_grid:
    cfg = dataclasses.replace(cfg0, steps=steps, checkpoint_every=max(steps, 1))
    rows.append({"gkd_steps": steps, "gkd_tokens": steps * cfg.batch_size * cfg.seq_len,
                 "predicted_speedup": speedup, **_gkd(base, arch, params, cfg, out / f"gkd_steps_{steps}")})
  return rows


SWEEPS = {"bld_tokens": (sweep_bld_tokens, "bld_tokens"), "metric": (sweep_metric, "metric"),
          "gkd_mix": (sweep_gkd_mix, "mix"), "gkd_tokens": (sweep_gkd_tokens, "gkd_tokens")}


# ----------------------------------------------------------------------------- outputs
def write(out: pathlib.Path, name: str, rows: list[dict]) -> None:
  """<name>.json, a markdown table and a two-panel plot (KL and perplexity vs the swept value)."""
  (out / f"{name}.json").write_text(json.dumps(rows, indent=1))
  keys = list(rows[0])
  md = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
  md += ["| " + " | ".join(f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |"
         for r in rows]
  (out / f"{name}.md").write_text("\n".join(md) + "\n")
  plot(rows, SWEEPS[name][1], out / f"{name}.png", title=name)


def plot(rows: list[dict], x: str, png: pathlib.Path, title: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
  xs = [r[x] for r in rows]
  categorical = isinstance(xs[0], str)
  for ax, metric in zip(axes, ("kl", "ppl")):
    ys = [r[metric] for r in rows]
    if categorical:
      ax.bar(xs, ys)
    else:
      ax.plot(xs, ys, "o-")
    ax.set(xlabel=x, ylabel=metric, title=f"{title}: {metric}")
  fig.tight_layout()
  fig.savefig(png, dpi=110)
  plt.close(fig)


def main(c) -> dict[str, list[dict]]:
  out = pathlib.Path(c.out_dir)
  out.mkdir(parents=True, exist_ok=True)
  base = base_run(c.search)
  results = {}
  for name in c.sweeps:
    if name not in SWEEPS:
      raise ValueError(f"unknown sweep {name!r}; choose from {sorted(SWEEPS)}")
    print(f"==> {name}")
    results[name] = SWEEPS[name][0](base, c, out)
    write(out, name, results[name])
    print((out / f"{name}.md").read_text())
  return results


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags
  _CONFIG = config_flags.DEFINE_config_file("config", None, "configs/ablations.py[:tiny|:gpu]")
  _SWEEPS = flags.DEFINE_list("sweeps", None, "subset of sweeps (default: the config's)")

  def _main(argv):
    del argv
    from absl import logging
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it touches at INFO
    c = _CONFIG.value
    if _SWEEPS.value:
      c.sweeps = tuple(_SWEEPS.value)
    main(c)

  app.run(_main)
