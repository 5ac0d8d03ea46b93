"""Params pytree <-> flat Hugging Face tensor names ("model.layers.3.mlp.up_proj.weight").

The pytree mirrors HF names exactly (lists for `layers`), so these two functions are the whole
name mapping for import and export; only GGUF needs its own table.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """Nested params -> {"model.layers.0.self_attn.q_proj.weight": array, ...}."""
  out: dict[str, Any] = {}
  items = enumerate(params) if isinstance(params, (list, tuple)) else params.items()
  for k, v in items:
    name = f"{prefix}{k}"
    if isinstance(v, (dict, list, tuple)):
      out.update(flatten(v, name + "."))
    else:
      out[name] = v
  return out


def unflatten(flat: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
  """Inverse of `flatten`; `layers` becomes a list of length num_layers (empty dicts for
  blocks whose both halves are no-op, which own no tensors)."""
  root: dict[str, Any] = {"model": {"layers": [{} for _ in range(num_layers)]}}
  for name, value in flat.items():
    parts = name.split(".")
    node: Any = root
    for part in parts[:-1]:
      if isinstance(node, list):
        idx = int(part)
        if idx >= num_layers:
          raise KeyError(f"tensor {name!r} names layer {idx}, but the config has {num_layers} layers")
        node = node[idx]
      else:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
  return root


def shapes(params: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
  return {k: tuple(np.shape(v)) for k, v in flatten(params).items()}
