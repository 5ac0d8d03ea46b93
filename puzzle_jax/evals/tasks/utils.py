"""Offline data for the `pj_*` task configs beside this file: the JSONL files in `data/eval`.

lm-eval calls `custom_dataset(**metadata, **dataset_kwargs)`; the directory is, in order, the
`eval_dir` metadata (`--metadata '{"eval_dir": "/path"}'`), `$PUZZLE_JAX_EVAL_DIR`, or the
repository's `data/eval`. HellaSwag's docs go through lm-eval's own stock `process_docs`.
"""

import json
import os
import pathlib

import datasets
from lm_eval.tasks.hellaswag.utils import process_docs as hellaswag_process_docs  # noqa: F401

ENV = "PUZZLE_JAX_EVAL_DIR"


def load(task: str, split: str, eval_dir: str | None = None, **_metadata) -> datasets.DatasetDict:
  """{split: the task's JSONL rows} (fields as their public releases spell them)."""
  from puzzle_jax.io import data
  path = pathlib.Path(eval_dir or os.environ.get(ENV) or data.EVAL_DIR) / data.EVAL_FILES[task]
  if not path.is_file():
    raise FileNotFoundError(f"{path} missing: point ${ENV} (or --metadata '{{\"eval_dir\": ...}}') at a "
                            f"directory holding {data.EVAL_FILES[task]} (the repository's data/eval has it)")
  with open(path, encoding="utf-8") as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return datasets.DatasetDict({split: datasets.Dataset.from_list(rows)})
