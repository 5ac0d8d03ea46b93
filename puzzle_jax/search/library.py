"""The trained candidate library: BLD's artifact, read by scoring, costs, the MIP, realize and evaluate.

Apart from the trainer so that reading it needs neither optax nor the mesh code. On disk:
`library.json` (the parent arch, the BLD settings and one entry per candidate) and `params/` (orbax,
one stacked pytree per same-shape group). `library.json` is written last: its presence means complete.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from puzzle_jax import artifacts
from puzzle_jax.core import hf_config
from puzzle_jax.core import model
from puzzle_jax.core.arch import Arch, spec_from_key
from puzzle_jax.search import candidates as cands
from puzzle_jax.search.candidates import Candidate

Params = dict[str, Any]
FORMAT = "puzzle_jax.library/v1"
META, PARAMS = "library.json", "params"


@dataclasses.dataclass
class Library(cands.CandidateSet):
  """Every candidate (arch, candidates, `at`), its held-out BLD loss, and its trained params."""
  bld_loss: dict[str, float]
  rows: dict[str, tuple[str, int]]  # candidate id -> (group name, row in the stacked params)
  params_by_group: dict[str, Params]

  def params(self, c: Candidate, parent_params: Params) -> Params:
    """The candidate's sub-block params (the parent's own for the parent variant)."""
    if c.spec.kind == "noop":
      return {}
    if cands.is_parent(self.arch, c):
      attn_p, ffn_p = model.split_layer(parent_params["model"]["layers"][c.layer])
      return attn_p if c.sub == "attn" else ffn_p
    name, row = self.rows[c.id]
    return jax.tree_util.tree_map(lambda x: x[row], self.params_by_group[name])


def save_library(path: pathlib.Path, arch: Arch, library: Sequence[Candidate], groups: Sequence[Any],
                 params_by_group: Mapping[str, Params], losses: Mapping[str, float],
                 settings: Any) -> None:
  """Params first (orbax), `library.json` last and atomically. `groups` are `bld.Group`s (name,
  members); padding rows beyond a group's members are dropped."""
  import orbax.checkpoint as ocp
  path.mkdir(parents=True, exist_ok=True)
  real = {g.name: jax.tree_util.tree_map(lambda x, n=len(g.members): np.asarray(x[:n]), params_by_group[g.name])
          for g in groups}
  params_dir = path / PARAMS
  if params_dir.exists():  # an interrupted save of this same stage: orbax will not overwrite it
    import shutil
    shutil.rmtree(params_dir)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(params_dir.absolute(), real)
  rows = {c.id: (g.name, i) for g in groups for i, c in enumerate(g.members)}
  entries = []
  for c in library:
    loss = losses.get(c.id, 1.0 if c.spec.kind == "noop" else 0.0)  # no-op: NMSE of 0 is 1; parent: 0
    entries.append({"id": c.id, "layer": c.layer, "sub": c.sub, "key": c.key, "loss": loss,
                    "trainable": cands.is_trainable(arch, c), "group": rows.get(c.id)})
  settings = dataclasses.asdict(settings) if dataclasses.is_dataclass(settings) else dict(settings)
  artifacts.write_json(path / META, {"format": FORMAT, "arch": hf_config.arch_to_hf(arch), "bld": settings,
                                     "candidates": entries})


def load_library(path: pathlib.Path) -> Library:
  """The library at `path`; `artifacts.ArtifactError` names the file when it is incomplete or corrupt."""
  import orbax.checkpoint as ocp
  doc = artifacts.read_json(path / META, required=("arch", "candidates"), fmt=FORMAT)
  try:
    arch = hf_config.arch_from_hf(doc["arch"])
    cs = [Candidate(e["layer"], e["sub"], spec_from_key(e["key"])) for e in doc["candidates"]]
    rows = {e["id"]: tuple(e["group"]) for e in doc["candidates"] if e["group"]}
    losses = {e["id"]: e["loss"] for e in doc["candidates"]}
  except (KeyError, TypeError, ValueError) as e:
    raise artifacts.ArtifactError(path / META, f"malformed candidate entry ({e!r})") from e
  params_dir = (path / PARAMS).absolute()
  if not params_dir.is_dir() or not ocp.utils.is_checkpoint_finalized(params_dir):
    raise artifacts.ArtifactError(params_dir, "missing or not finalized")
  try:
    with ocp.StandardCheckpointer() as ckptr:
      params = ckptr.restore(params_dir)
  except Exception as e:  # orbax/tensorstore raise many types for truncated files
    raise artifacts.ArtifactError(params_dir, f"cannot be restored ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:200]})") from e
  missing = {name for name, _ in rows.values()} - set(params)
  if missing:
    raise artifacts.ArtifactError(params_dir, f"lacks the groups {sorted(missing)}")
  return Library(arch, cs, losses, rows, params)
