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
  """Child arch and params from a `library.Library` (BLD-trained weights; the parent's own where kept)."""
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
