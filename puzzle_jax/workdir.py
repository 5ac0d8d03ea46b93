"""The run directory every stage reads and writes, and the few things all stages share.

Layout under `config.workdir`:
  parent/            project checkpoint of the parent (orbax + arch.json), tokenizer/ beside it
  bld/ckpt/          BLD orbax checkpoints (resume)      bld/library/  the candidate library
  scores/            replace-1-block scores + heatmap    costs/        measured cost table
  mip/               chosen architecture, Pareto front   child/        realized child checkpoint
  report/            report.json + plots                 export/       HF directories
A stage is done when its final artifact exists; each artifact is written last and atomically.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class Paths:
  root: pathlib.Path

  @classmethod
  def from_config(cls, config) -> Paths:
    return cls(pathlib.Path(config.workdir))

  parent = property(lambda s: s.root / "parent")
  tokenizer = property(lambda s: s.root / "tokenizer")
  bld = property(lambda s: s.root / "bld")
  library = property(lambda s: s.root / "bld" / "library")
  scores = property(lambda s: s.root / "scores" / "scores.json")
  costs = property(lambda s: s.root / "costs" / "costs.json")
  solution = property(lambda s: s.root / "mip" / "solution.json")
  child = property(lambda s: s.root / "child")
  report = property(lambda s: s.root / "report" / "report.json")
  tfds = property(lambda s: s.root / "tfds")


def write_json(path: pathlib.Path, obj: Any) -> None:
  """Write atomically: a reader never sees half a file, so existence means complete."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(obj, indent=1, default=_jsonable))
  os.replace(tmp, path)


def finished(stage: str, artifact: pathlib.Path, marker: pathlib.Path | None = None) -> bool:
  """True (and says so) when a stage's final artifact (or its completion marker) exists."""
  if (marker or artifact).exists():
    print(f"{stage}: {artifact} exists, skipping")
    return True
  return False


def _jsonable(x):
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  raise TypeError(f"not JSON serializable: {type(x)}")


def maybe_init_distributed(config) -> None:
  """Multi-host: the same command on every host; the cluster env (SLURM, TPU, ...) gives the rest."""
  if config.distributed and not _DIST["done"]:
    jax.distributed.initialize()
    _DIST["done"] = True


_DIST = {"done": False}


# ----------------------------------------------------------------------------- parent + tokenizer
def parent_source(config) -> pathlib.Path:
  from puzzle_jax import io
  return pathlib.Path(config.parent.path) if config.parent.path else io.smollm2_gguf_path()


def truncate(arch, params, max_layers: int):
  """Keep the first `max_layers` blocks (0 = all): fast experiments on a real parent."""
  if not max_layers or max_layers >= arch.num_layers:
    return arch, params
  arch = dataclasses.replace(arch, blocks=arch.blocks[:max_layers])
  return arch, {**params, "model": {**params["model"], "layers": params["model"]["layers"][:max_layers]}}


def load_parent(config):
  """(arch, params) of the imported parent; imports it first if the import stage has not run."""
  from puzzle_jax import io
  paths = Paths.from_config(config)
  if not (paths.parent / "arch.json").exists():
    import_parent(config)
  return io.load_checkpoint(paths.parent)


def import_parent(config) -> pathlib.Path:
  import jax.numpy as jnp
  from puzzle_jax import io
  from puzzle_jax.io import tokenizer
  paths = Paths.from_config(config)
  src = parent_source(config)
  arch, params = io.load_pretrained(src, dtype=jnp.dtype(config.parent.dtype))
  arch, params = truncate(arch, params, config.parent.max_layers)
  tok = tokenizer.load_tokenizer(src)
  tok.save(paths.tokenizer)
  io.save_checkpoint(paths.parent, arch, params, overwrite=True)
  return paths.parent


def load_tok(config):
  from puzzle_jax.io import tokenizer
  paths = Paths.from_config(config)
  if not (paths.tokenizer / "tokenizer.json").exists():
    import_parent(config)
  return tokenizer.Tokenizer.from_dir(paths.tokenizer)


# ----------------------------------------------------------------------------- data
def doc_separator(tok) -> int | None:
  """Plain-text documents are separated by <|endoftext|> where the vocab has it (SmolLM2 does)."""
  sep = tok.backend.token_to_id("<|endoftext|>")
  return sep if sep is not None else tok.eos_id


def _source(config, split: str):
  from puzzle_jax.io import data
  data_dir = config.data.data_dir or str(Paths.from_config(config).tfds)
  return data.text_source(config.data.name, split, data_dir, local_dir=config.data.local_dir)


def heldout_tokens(config, tok, num_seqs: int, seq_len: int, split: str | None = None) -> np.ndarray:
  """A fixed [num_seqs, seq_len] token set from the held-out split (deterministic)."""
  from puzzle_jax.io import data
  src = _source(config, split or config.data.eval_split)
  return data.token_array(src, tok.encode, seq_len, num_seqs, bos_id=None, eos_id=doc_separator(tok),
                          seed=config.seed, text_key=config.data.text_key)


class TrainBatches:
  """Adapts the grain iterator to BLD's BatchIterator protocol (arrays + JSON state)."""

  def __init__(self, config, tok, batch_size: int, seq_len: int):
    from puzzle_jax.io import data
    src = _source(config, config.data.train_split)
    ds = data.packed_dataset(src, tok.encode, seq_len, seed=config.seed, bos_id=None,
                             eos_id=doc_separator(tok), text_key=config.data.text_key)
    self._data = data
    self._it = data.batch_iterator(ds, batch_size)

  def __iter__(self):
    return self

  def __next__(self) -> np.ndarray:
    return np.asarray(next(self._it)["tokens"])

  def get_state(self) -> dict:
    return self._data.iterator_state(self._it)

  def set_state(self, state: dict) -> None:
    self._it = self._data.restore_iterator(self._it, state)


# ----------------------------------------------------------------------------- stages
def run_import(config) -> pathlib.Path:
  """`import`: parent -> project checkpoint + tokenizer; prints the architecture table."""
  from puzzle_jax import io
  paths = Paths.from_config(config)
  if not (paths.parent / "arch.json").exists():
    import_parent(config)
  arch, _ = io.load_checkpoint(paths.parent)
  print(f"parent from {parent_source(config)}\n{arch.table()}")
  return paths.parent


PIPELINE = ("import", "bld", "score", "costs", "mip", "realize", "evaluate")


def run_all(config) -> None:
  """The whole Puzzle search; finished stages are skipped, so an interrupted run resumes."""
  import time
  from puzzle_jax.stages import stage_fn
  for name in PIPELINE:
    t0 = time.perf_counter()
    print(f"==> {name}")
    stage_fn(name)(config)
    print(f"<== {name} ({time.perf_counter() - t0:.1f}s)")
  from puzzle_jax import generate
  for which in ("parent", "child"):
    arch, params = generate.resolve_checkpoint(config, which)
    text = generate.complete(arch, params, load_tok(config), config.generate.prompt,
                             max_new_tokens=config.generate.max_new_tokens)
    print(f"[{which}] {config.generate.prompt}\n  -> {text}")
