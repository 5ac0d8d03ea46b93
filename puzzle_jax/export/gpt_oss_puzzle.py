"""Export a gpt-oss-shaped child as the `gpt_oss_puzzle` directory vLLM's `gpt_oss_puzzle` model reads.

config.json: `model_type: "gpt_oss_puzzle"`, `architectures: ["GptOssPuzzleForCausalLM"]`, the
gpt-oss global fields, YaRN in transformers 5's `rope_parameters`, and one `block_configs[i]` per
layer (`num_local_experts`, `sliding_window` int or null, plus `num_experts_per_tok`,
`intermediate_size`, `kv_cache_dtype`), see `core.hf_gpt_oss`. Safetensors under gpt-oss tensor
names; per-layer `self_attn.k_scale` / `v_scale` (float32) on FP8-KV layers; optionally the expert
matrices repacked to MXFP4 (`*_blocks` / `*_scales`, with a `quantization_config`). The remote code
in `gpt_oss_puzzle_hf/` (config class with `get_gpt_oss_config_for_layer(i)`, modeling on top of
transformers' gpt-oss) makes it loadable with `trust_remote_code=True`.

`ep_size`: with expert parallelism every layer's expert count must split evenly over the EP ranks;
the export refuses a child that breaks this (the MIP only offers such counts, see
`LibraryConfig.ep_size`) and records the size in the config.
"""

from __future__ import annotations

import pathlib
import sys
from typing import Any

import numpy as np

from puzzle_jax.core import hf_gpt_oss
from puzzle_jax.core.arch import Arch, ArchError
from puzzle_jax.export import gpt_oss_puzzle_hf
from puzzle_jax.export import nemotron_nas as nn_export
from puzzle_jax.moe import mxfp4 as mxfp4_lib

Params = dict[str, Any]
AUTO_MAP = {"AutoConfig": "configuration_gpt_oss_puzzle.GptOssPuzzleConfig",
            "AutoModelForCausalLM": "modeling_gpt_oss_puzzle.GptOssPuzzleForCausalLM"}
SCALE_SUFFIXES = ("k_scale", "v_scale")


def check_ep(arch: Arch, ep_size: int) -> None:
  for i, b in enumerate(arch.blocks):
    if b.ffn.kind == "moe" and b.ffn.num_experts % ep_size:
      raise ArchError(f"layer {i} has {b.ffn.num_experts} experts, not divisible by ep_size={ep_size}; "
                      f"search with library.ep_size={ep_size} so every candidate's count is a multiple")


def puzzle_config(arch: Arch, dtype: str, ep_size: int, mxfp4: bool) -> dict[str, Any]:
  cfg = {**hf_gpt_oss.arch_to_gpt_oss_puzzle(arch, dtype=dtype), "auto_map": dict(AUTO_MAP),
         "expert_parallel_size": ep_size}
  if mxfp4:
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
  return cfg


def tensors(arch: Arch, params: Params, dtype: str, mxfp4: bool) -> dict[str, np.ndarray]:
  flat = nn_export.check_params(arch, params)
  # FP8 scales stay float32 (what serving engines read), whatever the weights' dtype.
  out = {k: nn_export.to_numpy(k, v, "float32" if k.endswith(SCALE_SUFFIXES) else dtype) for k, v in flat.items()}
  return mxfp4_lib.quantize_flat(out) if mxfp4 else out


def export(arch: Arch, params: Params, out_dir: str | pathlib.Path, *, tokenizer=None, dtype: str = "bfloat16",
           mxfp4: bool = False, ep_size: int = 1) -> pathlib.Path:
  """Write the gpt_oss_puzzle directory; returns its path (an earlier export there is replaced)."""
  if sys.byteorder != "little":
    raise RuntimeError("safetensors export assumes a little-endian host")
  hf_gpt_oss.check_gpt_oss(arch)
  check_ep(arch, ep_size)
  if dtype not in nn_export.DTYPES:
    raise ValueError(f"dtype {dtype!r} unsupported; use one of {sorted(nn_export.DTYPES)}")
  out = pathlib.Path(out_dir).resolve()
  flat = tensors(arch, params, dtype, mxfp4)

  def weights(tmp: pathlib.Path) -> None:
    nn_export.write_safetensors(tmp / nn_export.SAFETENSORS_FILE, flat)
    if tokenizer is not None:
      tokenizer.save(tmp)
  return nn_export._write_export(arch, out, dtype, weights, config=puzzle_config(arch, dtype, ep_size, mxfp4),
                                 code_pkg=gpt_oss_puzzle_hf)
