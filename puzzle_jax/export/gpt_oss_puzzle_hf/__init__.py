"""Transformers remote code shipped next to gpt_oss_puzzle exports (see `puzzle_jax.export.gpt_oss_puzzle`).

The two files import only torch and transformers: they are copied into the export directory and
loaded with `trust_remote_code=True`, never imported here.
"""

import pathlib

DIR = pathlib.Path(__file__).resolve().parent
FILES = ("configuration_gpt_oss_puzzle.py", "modeling_gpt_oss_puzzle.py")
