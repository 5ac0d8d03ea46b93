"""Reading and writing the run directory's files: atomic JSON, named corruption, fingerprints, markers.

Nothing here knows the stage order or the config (that is `puzzle_jax.stages`); loaders raise
`ArtifactError(path, problem)` and the stage runner adds which stage wrote the file and the command
that rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import Any, Iterable

import numpy as np

MARKER = ".puzzle_jax.json"  # in every directory puzzle_jax created and may overwrite


class ArtifactError(ValueError):
  """A file the pipeline wrote (or was given) is missing, truncated or of the wrong shape."""

  def __init__(self, path: str | os.PathLike | None, problem: str):
    self.path, self.problem = (pathlib.Path(path) if path is not None else None), problem
    super().__init__(f"{path}: {problem}" if path is not None else problem)


def _jsonable(x):
  if isinstance(x, (np.floating, np.integer, np.bool_)):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  if isinstance(x, (tuple, set, frozenset)):
    return list(x)
  raise TypeError(f"not JSON serializable: {type(x)}")


def write_json(path: str | os.PathLike, obj: Any) -> pathlib.Path:
  """Write atomically: a reader never sees half a file, so existence means complete."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(obj, indent=1, default=_jsonable, allow_nan=False) + "\n")
  os.replace(tmp, path)
  return path


def read_json(path: str | os.PathLike, required: Iterable[str] = (), fmt: str | None = None) -> Any:
  """A JSON document with its top-level `required` keys (and `format` == fmt), or ArtifactError."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise ArtifactError(path, "missing")
  try:
    doc = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ArtifactError(path, f"not valid JSON ({e}); the file is truncated or corrupt") from e
  if required or fmt:
    if not isinstance(doc, dict):
      raise ArtifactError(path, f"expected a JSON object, found {type(doc).__name__}")
    missing = [k for k in required if k not in doc]
    if missing:
      raise ArtifactError(path, f"lacks {', '.join(map(repr, missing))}")
    if fmt and doc.get("format") != fmt:
      raise ArtifactError(path, f"format {doc.get('format')!r}, expected {fmt!r}")
  return doc


def canonical(obj: Any) -> Any:
  """JSON's view of `obj` (tuples -> lists, numpy -> python), so records compare after a round trip."""
  return json.loads(json.dumps(obj, default=_jsonable, sort_keys=True))


def fingerprint(obj: Any) -> str:
  return hashlib.sha256(json.dumps(canonical(obj), sort_keys=True).encode()).hexdigest()[:16]


def flatten(d: Any) -> dict[str, Any]:
  """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
  from flax import traverse_util
  return traverse_util.flatten_dict(d, sep=".") if isinstance(d, dict) else {"": d}


def diff(old: Any, new: Any) -> list[str]:
  """`key: old -> new` for every dotted key whose value differs."""
  a, b = flatten(canonical(old)), flatten(canonical(new))
  gone = object()
  return [f"{k}: {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r}"
          for k in sorted(set(a) | set(b)) if a.get(k, gone) != b.get(k, gone)]


def owned(directory: str | os.PathLike) -> bool:
  """True when puzzle_jax created `directory` (its marker is there)."""
  return (pathlib.Path(directory) / MARKER).is_file()


def claim(directory: str | os.PathLike, what: str, **info) -> pathlib.Path:
  """Create `directory` (or accept it when empty or already ours) and mark it as ours.

  Raises FileExistsError for a non-empty directory puzzle_jax did not create: nothing in it is touched.
  """
  d = pathlib.Path(directory)
  if d.exists() and not d.is_dir():
    raise FileExistsError(f"{d} exists and is a file; {what} needs a directory there: choose another path")
  if d.is_dir() and any(d.iterdir()) and not owned(d):
    raise FileExistsError(f"{d} is not empty and was not created by puzzle_jax; {what} refuses to write "
                          "into it (nothing was changed): choose a new or empty directory")
  d.mkdir(parents=True, exist_ok=True)
  if not owned(d):
    write_json(d / MARKER, {"created_by": f"puzzle_jax {what}", **info})
  return d
