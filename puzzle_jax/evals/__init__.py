"""Evaluation through lm-evaluation-harness: the `puzzle_jax` model (`lm`), offline task configs
for the six tasks in `data/eval` (`tasks/`, pass `TASKS_DIR` as `--include_path`), and retention
tables of children against their parent (`retention`).

Shell: `python -m puzzle_jax.evals --model puzzle_jax --model_args checkpoint=WORKDIR/child
--tasks pj_hellaswag,pj_arc_easy --limit 100` (lm-eval's CLI with this model registered and
`--include_path` set to `TASKS_DIR`).
"""

import pathlib

TASKS_DIR = pathlib.Path(__file__).resolve().parent / "tasks"
TASKS = ("pj_hellaswag", "pj_arc_easy", "pj_arc_challenge", "pj_piqa", "pj_boolq", "pj_lambada")
