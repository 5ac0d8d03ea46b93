"""Retention tables: task scores of children next to their parent's, through lm-eval's Python API.

Retention of a model on a task = its score / the parent's score on the same documents (Puzzle
reports the average over tasks: Nemotron-51B kept 98.4%). Scores are the metric each task is
usually reported with: acc_norm for HellaSwag, ARC and PIQA, acc for BoolQ and LAMBADA (LAMBADA's
perplexity is kept beside it, not averaged).
"""

from __future__ import annotations

import math
import pathlib
from typing import Any, Mapping, Sequence

from puzzle_jax.evals import TASKS, TASKS_DIR

# task -> the metric its retention is computed on.
PRIMARY = {"pj_hellaswag": "acc_norm", "pj_arc_easy": "acc_norm", "pj_arc_challenge": "acc_norm",
           "pj_piqa": "acc_norm", "pj_boolq": "acc", "pj_lambada": "acc"}
# task -> lm-eval requests per document (its choices; ARC has 3-5), for time estimates.
REQUESTS_PER_DOC = {"pj_hellaswag": 4, "pj_arc_easy": 4, "pj_arc_challenge": 4, "pj_piqa": 2, "pj_boolq": 2,
                    "pj_lambada": 1}


def task_name(name: str) -> str:
  """'hellaswag' or 'pj_hellaswag' -> 'pj_hellaswag' (the offline config)."""
  full = name if name.startswith("pj_") else f"pj_{name}"
  if full not in PRIMARY:
    raise ValueError(f"unknown eval task {name!r}; choose from {', '.join(t[3:] for t in TASKS)}")
  return full


def task_manager(eval_dir: str | None = None):
  """lm-eval's TaskManager over the offline configs; `eval_dir` replaces data/eval as their source."""
  from lm_eval.tasks import TaskManager
  return TaskManager(include_path=str(TASKS_DIR), metadata={"eval_dir": eval_dir} if eval_dir else None)


def evaluate_model(lm, tasks: Sequence[str], limit: int | None, manager=None) -> dict[str, dict[str, float]]:
  """{task: {metric: value}} for one lm-eval model (a `PuzzleLM` or any lm-eval LM)."""
  import lm_eval
  tasks = [task_name(t) for t in tasks]
  out = lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=limit, task_manager=manager or task_manager(),
                                bootstrap_iters=0, verbosity="ERROR")
  return metrics_of(out, tasks)


def metrics_of(out: Mapping[str, Any], tasks: Sequence[str]) -> dict[str, dict[str, float]]:
  """{task: {metric: value}} from `simple_evaluate`'s output ('acc,none' -> 'acc'; no stderr)."""
  return {t: {k.split(",")[0]: float(v) for k, v in out["results"][t].items()
              if "," in k and "stderr" not in k} for t in tasks}


def retention(scores: Mapping[str, Mapping[str, float]], parent: str) -> dict[str, dict[str, float | None]]:
  """{model: {task: score / parent score, 'average': mean over tasks}}; None where the parent scored 0."""
  out = {}
  for name, s in scores.items():
    r = {t: (v / scores[parent][t] if scores[parent][t] > 0 else None) for t, v in s.items()}
    defined = [v for v in r.values() if v is not None]
    out[name] = {**r, "average": sum(defined) / len(defined) if defined else None}
  return out


def retention_table(models: Mapping[str, tuple[Any, Any]], tokenizer, tasks: Sequence[str] = TASKS,
                    limit: int | None = None, *, parent: str = "parent", batch_size: int = 16,
                    max_length: int | None = None, progress: bool = True, manager=None,
                    eval_dir: str | None = None) -> dict[str, Any]:
  """Score every model on `tasks` (first `limit` documents each) and the retention against `parent`.

  models: {name: (arch, params)}, one of them named `parent`. Returns a JSON-able dict:
  `scores` {model: {task: primary metric}}, `metrics` {model: {task: {metric: value}}},
  `retention` {model: {task: ratio, 'average': ...}}, plus the tasks, metric names and limit.
  `manager`: an lm-eval TaskManager over `TASKS_DIR` to reuse (building one indexes every task);
  `eval_dir`: where the task JSONL files are (default: the repository's data/eval).
  """
  from tqdm.auto import tqdm

  from puzzle_jax.evals.lm import PuzzleLM
  if parent not in models:
    raise ValueError(f"models has no {parent!r} entry; retention is relative to the parent")
  tasks = [task_name(t) for t in tasks]
  manager, metrics = manager or task_manager(eval_dir), {}
  for name, (arch, params) in tqdm(models.items(), desc="lm-eval", disable=not progress):
    lm = PuzzleLM(arch=arch, params=params, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    metrics[name] = evaluate_model(lm, tasks, limit, manager)
  scores = {m: {t: metrics[m][t][PRIMARY[t]] for t in tasks} for m in metrics}
  return {"tasks": tasks, "metric": {t: PRIMARY[t] for t in tasks}, "limit": limit, "parent": parent,
          "scores": scores, "metrics": metrics, "retention": retention(scores, parent)}


def format_table(table: Mapping[str, Any]) -> str:
  """Plain-text table: one row per model, a score column per task, then the average retention."""
  tasks = table["tasks"]
  head = f"{'model':<22}" + "".join(f"{t[3:][:13]:>14}" for t in tasks) + f"{'avg retention':>15}"
  rows = [head]
  for name, s in table["scores"].items():
    r = table["retention"][name]
    cells = "".join(f"{s[t]:>8.3f}" + (f" {r[t]:>4.0%}" if r[t] is not None else "    -") for t in tasks)
    avg = f"{r['average']:>15.1%}" if r["average"] is not None else f"{'-':>15}"
    rows.append(f"{name:<22}{cells}{avg}")
  return "\n".join(rows)


def plot_retention(table: Mapping[str, Any], png) -> None:
  """Grouped bars: retention (score / parent score) per task and on average, one bar per model."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np
  cols = [*table["tasks"], "average"]
  models = [m for m in table["retention"] if m != table["parent"]]
  fig, ax = plt.subplots(figsize=(1.4 * len(cols) + 2, 4))
  width = 0.8 / max(len(models), 1)
  for k, m in enumerate(models):
    vals = [table["retention"][m][c] for c in cols]
    ax.bar(np.arange(len(cols)) + k * width, [math.nan if v is None else 100 * v for v in vals], width, label=m)
  ax.axhline(100, color="k", lw=0.8, ls="--")
  ax.set_xticks(np.arange(len(cols)) + width * (len(models) - 1) / 2, [c.removeprefix("pj_") for c in cols])
  ax.set_ylabel("retention vs parent (%)")
  ax.set_title(f"task retention ({table['limit'] or 'all'} docs per task)")
  ax.legend(fontsize=8)
  fig.tight_layout()
  pathlib.Path(png).parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(png, dpi=120)
  plt.close(fig)
