"""The six-task lm-eval table for the parent (and a child), through our JAX path and lm-eval's `hf`.

H200 (wheels from benchmarks/lm_eval_wheels.sh carried in .whl/; GGUF as gpu_suite.sh joins it):
  bash benchmarks/gpu_suite.sh lm_eval      # or, with PYTHONPATH holding the wheels and the repo:
  timeout 400 python3 benchmarks/lm_eval_table.py --parent GGUF [--child WORKDIR/child] --out t.json
CPU smoke run (4-block slice of the parent, 4 documents per task, ~2 min):
  python -m benchmarks.lm_eval_table --small

Correctness first: on the first `--check` documents of every task, each request's log-likelihood
from `puzzle_jax` equals the `hf` backend's on the exported float32 model (JAX at "highest" matmul
precision, torch without TF32) and the greedy flags agree; the script stops if not. Then each
model runs the full table, timed (wall time of `simple_evaluate`, compiles included): the parent
on both backends, a child through JAX (and hf with `--child-hf`). The table prints per task the
score through JAX, through hf, their difference in points (the acceptance bound is 0.5; for
perplexity in %), and the child's retention vs the parent.
"""

from __future__ import annotations

import os

if __name__ == "__main__":
  # Two frameworks share the GPU: JAX must not grab 75% of it up front.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import json
import math
import pathlib
import sys
import tempfile
import time

import jax
import numpy as np

from puzzle_jax.evals import TASKS
from puzzle_jax.evals import lm as L
from puzzle_jax.evals import retention as R


def hf_backend(arch, params, tok, out_dir: pathlib.Path, batch_size: int):
  """lm-eval's HFLM on our float32 export (nemotron-nas remote code), on CUDA when there is one."""
  import torch
  from lm_eval.models.huggingface import HFLM
  from puzzle_jax import export
  torch.backends.cuda.matmul.allow_tf32 = False
  path = export.export(arch, params, out_dir, tokenizer=tok, dtype="float32")
  device = "cuda" if torch.cuda.is_available() else "cpu"
  return HFLM(pretrained=str(path), trust_remote_code=True, dtype="float32", device=device,
              batch_size=batch_size)


def run(lm, tasks, limit, manager, samples: bool = False):
  import lm_eval
  t0 = time.perf_counter()
  out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit, task_manager=manager,
                                bootstrap_iters=0, log_samples=samples, verbosity="ERROR")
  return out, time.perf_counter() - t0


def check(ours, ref, tasks, limit, manager) -> float:
  """Per-request agreement on the first `limit` docs of each task; returns the largest |diff|."""
  a, _ = run(ours, tasks, limit, manager, samples=True)
  b, _ = run(ref, tasks, limit, manager, samples=True)
  worst = 0.0
  for t in tasks:
    la = np.array([r[0][0] for s in a["samples"][t] for r in s["resps"]])
    lb = np.array([r[0][0] for s in b["samples"][t] for r in s["resps"]])
    ga = [r[0][1] for s in a["samples"][t] for r in s["resps"]]
    gb = [r[0][1] for s in b["samples"][t] for r in s["resps"]]
    np.testing.assert_allclose(la, lb, rtol=1e-4, atol=5e-3, err_msg=f"{t}: log-likelihoods differ")
    assert ga == gb, f"{t}: greedy flags differ"
    worst = max(worst, float(np.max(np.abs(la - lb))))
  return worst


def table(results: dict, tasks, parent: str) -> str:
  names = list(results)
  head = f"{'task':<18}{'metric':<10}" + "".join(f"{n + ' jax':>14}{n + ' hf':>12}{'Δpts':>7}" for n in names)
  if len(names) > 1:
    head += f"{'retention':>11}"
  rows = [head]
  for t in tasks:
    metrics = [R.PRIMARY[t]] + (["perplexity"] if t == "pj_lambada" else [])
    for m in metrics:
      row = f"{t[3:]:<18}{m:<10}"
      for n in names:
        j, h = results[n]["jax"][t][m], results[n]["hf"][t][m]
        d = 100 * (j - h) / (h if m == "perplexity" else 1)  # points; % for perplexity
        row += f"{j:>14.4g}{h:>12.4g}{d:>7.2f}"
      if len(names) > 1 and m != "perplexity":
        p = results[parent]["jax"][t][m]
        row += f"{results[names[1]]['jax'][t][m] / p:>11.1%}" if p > 0 else f"{'-':>11}"
      rows.append(row)
  for n in names:
    hf_s = results[n]["hf_s"]
    hf = "not run" if math.isnan(hf_s) else f"{hf_s:.1f}s"
    rows.append(f"{n}: jax {results[n]['jax_s']:.1f}s, hf {hf} wall (compiles included)")
  return "\n".join(rows)


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--parent", default=None, help="GGUF / HF dir / checkpoint (default: SmolLM2 GGUF)")
  p.add_argument("--child", default=None, help="project checkpoint of a child (e.g. WORKDIR/child)")
  p.add_argument("--tokenizer", default=None, help="default: found beside the parent")
  p.add_argument("--tasks", default=",".join(TASKS))
  p.add_argument("--limit", type=int, default=None, help="documents per task (default: all in data/eval)")
  p.add_argument("--check", type=int, default=8, help="documents per task in the per-request check")
  p.add_argument("--batch-size", type=int, default=64)
  p.add_argument("--min-length", type=int, default=256, help="smallest padded length (fewer compiles)")
  p.add_argument("--child-hf", action="store_true",
                 help="also run the child's full table through hf (default: only its per-request check)")
  p.add_argument("--small", action="store_true", help="CPU smoke: 4-block slice, 4 docs per task")
  p.add_argument("--out", default=None, help="JSON path (default $OUT/lm_eval_table.json if $OUT)")
  args = p.parse_args(argv)
  jax.config.update("jax_default_matmul_precision", "highest")
  from puzzle_jax import io
  from puzzle_jax.core import model
  from puzzle_jax.io.tokenizer import load_tokenizer
  parent_path = args.parent or str(io.smollm2_gguf_path())
  tok = load_tokenizer(args.tokenizer or L.find_tokenizer(parent_path))
  models = {"parent": L.load_model(parent_path)}
  if args.child:
    models["child"] = L.load_model(args.child)
  limit, check_docs, bs = args.limit, args.check, args.batch_size
  if args.small:
    models = {k: model.truncate(*v, 4) for k, v in models.items()}
    limit, check_docs, bs, args.min_length = 4, 2, 8, 64
  tasks = [R.task_name(t) for t in args.tasks.split(",")]
  manager = R.task_manager()
  results, tmp = {}, pathlib.Path(tempfile.mkdtemp(prefix="lm_eval_table_"))
  print(f"devices: jax {jax.devices()}; tasks {tasks}; limit {limit}; batch {bs}", flush=True)
  for name, (arch, params) in models.items():
    ours = L.PuzzleLM(arch=arch, params=params, tokenizer=tok, batch_size=bs, min_length=args.min_length)
    ref = hf_backend(arch, params, tok, tmp / name, bs)
    worst = check(ours, ref, tasks, check_docs, manager)
    print(f"{name}: per-request check passed on {check_docs} docs/task (max |Δ loglik| {worst:.2e})", flush=True)
    rj, tj = run(ours, tasks, limit, manager)
    rh, th = run(ref, tasks, limit, manager) if name == "parent" or args.child_hf else (None, math.nan)
    js = R.metrics_of(rj, tasks)
    hs = R.metrics_of(rh, tasks) if rh else {t: {m: math.nan for m in js[t]} for t in tasks}
    results[name] = {"jax": js, "hf": hs, "jax_s": tj, "hf_s": th, "check_max_abs": worst}
  print(table(results, tasks, "parent"))
  out = args.out or (os.path.join(os.environ["OUT"], "lm_eval_table.json") if os.environ.get("OUT") else None)
  report = {"tasks": tasks, "limit": limit, "batch_size": bs, "device": str(jax.devices()[0]),
            "results": results}
  if out:
    pathlib.Path(out).write_text(json.dumps(report, indent=1))
  return report


if __name__ == "__main__":
  sys.exit(main() and 0)
