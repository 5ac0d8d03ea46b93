"""lm-eval's own command line with the `puzzle_jax` model registered and the offline tasks included.

  python -m puzzle_jax.evals --model puzzle_jax --model_args checkpoint=WORKDIR/child \
      --tasks pj_hellaswag,pj_arc_easy,pj_arc_challenge,pj_piqa,pj_boolq,pj_lambada \
      --batch_size 16 --limit 100

lm-eval 0.4 finds models only in its own registry (no plugin entry points), so the plain `lm_eval`
binary cannot see `puzzle_jax`; this wrapper imports it first, then hands over to `lm_eval`'s CLI.
Every `lm_eval` flag works; `--include_path` defaults to the shipped task configs.
"""

import sys


def main(argv: list[str] | None = None) -> None:
  from lm_eval.__main__ import cli_evaluate

  from puzzle_jax.evals import TASKS_DIR, lm  # noqa: F401  (registers the model)
  argv = list(sys.argv[1:] if argv is None else argv)
  if not any(a == "--include_path" or a.startswith("--include_path=") for a in argv):
    argv += ["--include_path", str(TASKS_DIR)]
  sys.argv = ["lm_eval", *argv]
  cli_evaluate()


if __name__ == "__main__":
  main()
