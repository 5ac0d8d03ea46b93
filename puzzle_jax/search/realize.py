"""Realize a child: the chosen candidate per (layer, sub-block) -> child Arch + params."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Sequence

from puzzle_jax.core.arch import Arch, BlockSpec, spec_from_key
from puzzle_jax.search.candidates import Candidate

Params = dict[str, Any]
Choices = Sequence[tuple[str, str]]  # per layer: (attention variant key, FFN variant key)


def child_arch(parent: Arch, choices: Choices) -> Arch:
  if len(choices) != parent.num_layers:
    raise ValueError(f"{len(choices)} choices for a {parent.num_layers}-layer parent; need one per layer")
  blocks = tuple(BlockSpec(spec_from_key(a), spec_from_key(f)) for a, f in choices)
  return dataclasses.replace(parent, blocks=blocks)


def realize(library, parent_params: Params, choices: Choices) -> tuple[Arch, Params]:
  """Child arch and params from a `bld.Library` (BLD-trained weights; the parent's own where kept)."""
  arch = child_arch(library.arch, choices)
  layers = []
  for i, (a_key, f_key) in enumerate(choices):
    a = Candidate(i, "attn", spec_from_key(a_key))
    f = Candidate(i, "ffn", spec_from_key(f_key))
    for c in (a, f):
      if c.id not in library.bld_loss:
        raise KeyError(f"layer {i}: {c.key} is not in the candidate library; re-run BLD with it")
    layers.append({**library.params(a, parent_params), **library.params(f, parent_params)})
  params = {**parent_params, "model": {**parent_params["model"], "layers": layers}}
  return arch, params


def parent_choices(arch: Arch) -> list[tuple[str, str]]:
  from puzzle_jax.core.arch import variant_key
  return [(variant_key(b.attn), variant_key(b.ffn)) for b in arch.blocks]


def run(config) -> pathlib.Path:
  """`python -m puzzle_jax realize`: the MIP's choice -> child checkpoint (orbax + arch.json)."""
  import json
  from puzzle_jax import io, workdir as W
  from puzzle_jax.search import bld
  paths = W.Paths.from_config(config)
  if W.finished("realize", paths.child, paths.child / "arch.json"):
    return paths.child
  if not paths.solution.exists():
    raise FileNotFoundError(f"{paths.solution} missing: run the `mip` stage first")
  choices = [tuple(c) for c in json.loads(paths.solution.read_text())["choices"]]
  _, parent_params = W.load_parent(config)
  arch, params = realize(bld.load_library(paths.library), parent_params, choices)
  io.save_checkpoint(paths.child, arch, params, overwrite=True)
  print(arch.table())
  return paths.child
