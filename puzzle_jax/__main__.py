"""Command line: `python -m puzzle_jax COMMAND --config configs/X.py [--config.key=value ...]`.

Intentionally thin: parse the flags, hand the config to `puzzle_jax.stages`, which owns the stage
order, the run directory and the checks. `python -m puzzle_jax --help` lists the commands.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from puzzle_jax import stages

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config (configs/*.py[:switches])",
                                          lock_config=True)
_RERUN_FROM = flags.DEFINE_string("rerun_from", None, "recompute this stage and everything after it "
                                  "(earlier results are moved to <workdir>/superseded/)")


def usage() -> str:
  width = max(map(len, stages.COMMANDS))
  rows = "\n".join(f"  {name:<{width}}  {help_}" for name, (help_, _) in stages.COMMANDS.items())
  return f"usage: python -m puzzle_jax COMMAND --config configs/X.py [--config.key=value ...]\n{rows}"


def _parse(argv: list[str]) -> list[str]:
  """absl's parser, with a config mistake (unknown key, bad value) as one line instead of a traceback."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    msg = str(e).strip().strip("'\"").replace("\\n", " ").replace("\\'", "'").replace("\n", " ")
    print(f"error: {msg}\n\n{usage()}", file=sys.stderr)
    sys.exit(2)


def _main(argv: list[str]) -> None:
  if len(argv) != 2 or argv[1] not in stages.COMMANDS:
    print(usage(), file=sys.stderr)
    sys.exit(2)
  if _CONFIG.value is None:
    print("error: --config is required, e.g. --config configs/smollm2_135m.py", file=sys.stderr)
    sys.exit(2)
  from absl import logging
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it touches at INFO
  sys.exit(stages.main_command(argv[1], _CONFIG.value, _RERUN_FROM.value))


def main() -> None:
  app.run(_main, flags_parser=_parse)


if __name__ == "__main__":
  main()
