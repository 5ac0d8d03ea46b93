r"""FFN Fusion and block parallelism ablations on SmolLM2: tables (Markdown + JSON) and PNGs.

  python experiments/fusion.py --config configs/fusion_smollm2.py          # CPU, the whole parent
  python experiments/fusion.py --config configs/fusion_smollm2.py:tiny     # test size

Four parts, each measured as KL(parent || model) on held-out WikiText-2 (`search.evaluate.Reference`):
  run_length     attention removed in a run of k layers, then its FFNs fused: KL vs k.
  block_parallel every adjacent pair of full blocks made parallel (whole-block parallelism).
  child_fusion   the search's MIP child with its FFN-only stretches fused ("Puzzle first, fuse after").
  joint          fusion-aware MIP vs "Puzzle first, fuse after" at the same predicted decode speed.
The search stages the last two need (BLD library, scores, costs, MIP child) run first when missing.
Outputs under `fusion_exp.out_dir` (default <workdir>/fusion/experiments).
"""

from __future__ import annotations

import json
import pathlib
import sys

import numpy as np

from puzzle_jax.core import model
from puzzle_jax.core.arch import parallel_arch, variant_key
from puzzle_jax.fusion import search as FS


def _plot(series: dict, path: pathlib.Path, xlabel: str, ylabel: str, title: str, bar: bool = False) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6.4, 4.0))
  for label, (xs, ys) in series.items():
    (ax.bar if bar else ax.plot)(xs, ys, **({} if bar else {"marker": "o"}), label=label)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  if len(series) > 1:
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _table(rows: list[dict], cols: list[str]) -> str:
  fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)
  return "\n".join(["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
                   + ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows])


def _fused(arch, params, runs):
  """Runs made parallel, then written as one wide FFN each (the engine layout; exact)."""
  for r in runs:
    arch = parallel_arch(arch, list(r))
  return model.fuse_parallel_ffns(arch, params)


def run_length(arch, params, kl, starts, max_len) -> list[dict]:
  rows = []
  for s in starts:
    for k in range(1, max_len + 1):
      run = tuple(range(s, min(s + k, arch.num_layers)))
      if len(run) < k:
        break
      a, p = FS.drop_attention(arch, params, run)
      row = {"start": s, "k": k, "kl_attn_removed": kl(a, p)}
      row["kl_fused"] = kl(*_fused(a, p, [run])) if k > 1 else row["kl_attn_removed"]
      row["fusion_delta"] = row["kl_fused"] - row["kl_attn_removed"]
      rows.append(row)
  return rows


def block_parallel(arch, params, kl) -> list[dict]:
  return [{"pair": f"{i},{i + 1}", "kl": kl(parallel_arch(arch, [i, i + 1]), params)}
          for i in range(arch.num_layers - 1)]


def _stretches(choices, ffn_key: str, max_run: int, first: int) -> list[tuple[int, ...]]:
  """Maximal FFN-only stretches (noop attention + `ffn_key`) from `first` on, cut into <= max_run."""
  out, cur = [], []
  for l in range(first, len(choices) + 1):
    if l < len(choices) and tuple(choices[l]) == (FS.NOOP_ATTN, ffn_key):
      cur.append(l)
      continue
    out += [tuple(cur[i:i + max_run]) for i in range(0, len(cur), max_run) if len(cur[i:i + max_run]) > 1]
    cur = []
  return out


def _fused_costs(config, arch, table: dict, width: int, max_run: int) -> dict:
  """The cost table's variants plus the fused widths 2..max_run x width, on the table's backend."""
  from puzzle_jax.search import costs
  keys = [f"ffn/swiglu_{k * width}" for k in range(2, max_run + 1)]
  c = config.costs
  sc = costs.Scenario(batch=c.batch, prompt_len=c.prompt_len, gen_len=c.gen_len, dtype=c.dtype,
                      kv_dtype=c.kv_dtype, repeats=c.repeats)
  if table["backend"] == "analytic":
    extra = costs.analytic_table(arch, keys, sc, peak_flops=c.peak_tflops * 1e12, bandwidth=c.bandwidth_gbps * 1e9)
  else:
    extra = costs.cost_table(arch, keys, sc, seed=config.seed)
  return {**table["variants"], **extra["variants"]}


def joint_and_child(config, parent_arch, parent_params, kl, e) -> tuple[list[dict], list[dict]]:
  from puzzle_jax import stages
  from puzzle_jax.search import costs, library as library_lib, select
  from puzzle_jax.search.realize import realize
  paths = stages.run(config, until="mip")  # skips what is done; this script realizes its own children
  problem = stages.problem(config, paths)
  library = library_lib.load_library(paths.library)
  width = parent_arch.blocks[-1].ffn.intermediate_size
  ffn_key = f"ffn/swiglu_{width}"
  first = 1 if problem.targets.keep_first_attn else 0
  cand = FS.candidate_runs(parent_arch.num_layers, e.max_run, first)
  variants = _fused_costs(config, parent_arch, costs.load_cost_table(paths.costs), width, e.max_run)
  penalties = FS.run_penalties(parent_arch, parent_params, cand, kl)
  runs = [FS.FusionRun(r, p, s) for r, p, s in zip(cand, penalties, FS.run_savings(variants, cand, width))]
  speed = lambda totals: problem.parent_totals["decode_s"] / totals["decode_s"]

  def measured(choices, fused_idx):
    arch, params = realize(library, parent_params, choices)
    return kl(*_fused(arch, params, [runs[i].layers for i in fused_idx]))

  child_rows, joint_rows = [], []
  for t in e.speedups:
    try:
      plain = problem.solve(t)
    except Exception as err:  # infeasible target: say so in the table
      joint_rows.append({"target": t, "note": f"infeasible ({type(err).__name__})"})
      continue
    seq = FS.fuse_after(plain.choices, runs, ffn_key, e.max_run)
    obj_seq, tot_seq = FS.evaluate_joint(problem.layers, runs, plain.choices, seq, fixed=problem.fixed)
    child_rows.append({"target": t, "fused_runs": str([runs[i].layers for i in seq]),
                       "pred_speedup_unfused": speed(plain.totals), "pred_speedup_fused": speed(tot_seq),
                       "kl_unfused": measured(plain.choices, []), "kl_fused": measured(plain.choices, seq)})
    budgets = {**select.budgets(problem.parent_totals, problem.targets, t), "decode_s": tot_seq["decode_s"]}
    joint = FS.solve_joint(problem.layers, runs, budgets, ffn_key, fixed=problem.fixed, forced=problem.forced,
                           forbidden=problem.forbidden)
    idx = [i for i, r in enumerate(runs) if r.layers in joint.runs]
    joint_rows.append({"target": t, "pred_speedup": speed(tot_seq), "joint_pred_speedup": speed(joint.totals),
                       "seq_objective": obj_seq, "joint_objective": joint.objective,
                       "seq_kl": child_rows[-1]["kl_fused"], "joint_kl": measured(joint.choices, idx),
                       "joint_runs": str(list(joint.runs)), "seq_runs": child_rows[-1]["fused_runs"]})
  return child_rows, joint_rows


def main(config) -> pathlib.Path:
  from absl import logging
  from puzzle_jax import stages
  from puzzle_jax.search.evaluate import Reference
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it touches at INFO
  e = config.fusion_exp
  out = pathlib.Path(e.out_dir or pathlib.Path(config.workdir) / "fusion" / "experiments")
  out.mkdir(parents=True, exist_ok=True)
  paths = stages.run(config, until="import")
  arch, params = stages.load_parent(paths)
  tokens = stages.heldout_tokens(config, paths, stages.load_tok(paths), config.eval.num_seqs, config.eval.seq_len)
  ref = Reference(arch, params, tokens, config.eval.batch_size)
  kl = lambda a, p: ref.evaluate(a, p)["kl"]
  res = {"run_length": run_length(arch, params, kl, e.run_starts, e.max_run_length)}
  res["block_parallel"] = block_parallel(arch, params, kl) if e.parallel_pairs else []
  res["child_fusion"], res["joint"] = joint_and_child(config, arch, params, kl, e) if e.search else ([], [])
  (out / "fusion.json").write_text(json.dumps(res, indent=1))
  md = ["# FFN Fusion ablations (KL(parent || model), held-out WikiText-2)",
        "## Fused-run length", _table(res["run_length"], ["start", "k", "kl_attn_removed", "kl_fused", "fusion_delta"]),
        "## Whole-block parallelism of adjacent full blocks", _table(res["block_parallel"], ["pair", "kl"]),
        "## Fusion of the MIP child (Puzzle first, fuse after)",
        _table(res["child_fusion"], ["target", "fused_runs", "pred_speedup_unfused", "pred_speedup_fused",
                                     "kl_unfused", "kl_fused"]),
        "## Joint (fusion-aware MIP) vs sequential at the same predicted speed",
        _table(res["joint"], ["target", "note", "pred_speedup", "joint_pred_speedup", "seq_objective", "joint_objective",
                              "seq_kl", "joint_kl", "seq_runs", "joint_runs"])]
  (out / "fusion.md").write_text("\n\n".join(md) + "\n")
  series = {f"start {s}": ([r["k"] for r in res["run_length"] if r["start"] == s],
                           [r["kl_fused"] for r in res["run_length"] if r["start"] == s]) for s in e.run_starts}
  series |= {f"start {s}, attention removed only": ([r["k"] for r in res["run_length"] if r["start"] == s],
                                                   [r["kl_attn_removed"] for r in res["run_length"] if r["start"] == s])
             for s in e.run_starts}
  _plot(series, out / "run_length.png", "run length k", "KL", "attention removed + FFNs fused")
  if res["block_parallel"]:
    _plot({"pair": ([r["pair"] for r in res["block_parallel"]], [r["kl"] for r in res["block_parallel"]])},
          out / "block_parallel.png", "adjacent blocks made parallel", "KL", "whole-block parallelism", bar=True)
  done = [r for r in res["joint"] if "joint_kl" in r]
  _plot({"fuse after": ([r["pred_speedup"] for r in done], [r["seq_kl"] for r in done]),
         "joint": ([r["joint_pred_speedup"] for r in done], [r["joint_kl"] for r in done])},
        out / "joint_vs_sequential.png", "predicted decode speedup", "KL", "fusion-aware vs fuse-after")
  print("\n\n".join(md))
  return out


if __name__ == "__main__":
  from absl import app
  from ml_collections import config_flags
  _CONFIG = config_flags.DEFINE_config_file("config", None, "configs/fusion_smollm2.py[:tiny|:gpu]")
  app.run(lambda argv: main(_CONFIG.value))
