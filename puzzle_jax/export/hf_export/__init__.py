"""Transformers remote code shipped next to exported weights (see `puzzle_jax.export.nemotron_nas`).

`configuration_decilm.py` and `modeling_decilm.py` import only torch and transformers: they are
copied into the export directory (for transformers' `trust_remote_code=True` in other tools);
`puzzle_jax.serving` imports these package copies instead and refuses an export whose copies differ.
"""

import pathlib

DIR = pathlib.Path(__file__).resolve().parent
FILES = ("configuration_decilm.py", "modeling_decilm.py")
