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


# The repository's data/eval (puzzle_jax/evals/tasks/ is three folders below the root). Not imported
# from puzzle_jax.io.data: that module pulls in TFDS and grain, which an eval-only machine may lack.
REPO_EVAL_DIR = pathlib.Path(__file__).resolve().parents[3] / "data" / "eval"


def load(file: str, split: str, eval_dir: str | None = None, **_metadata) -> datasets.DatasetDict:
  """{split: the rows of `file`} (fields as the tasks' public releases spell them)."""
  path = pathlib.Path(eval_dir or os.environ.get(ENV) or REPO_EVAL_DIR) / file
  if not path.is_file():
    raise FileNotFoundError(f"{path} missing: point ${ENV} (or --metadata '{{\"eval_dir\": ...}}') at a "
                            f"directory holding {file} (the repository's data/eval has it)")
  with open(path, encoding="utf-8") as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return datasets.DatasetDict({split: datasets.Dataset.from_list(rows)})
