"""Loading an exported directory (`puzzle_jax.export.nemotron_nas`) for PyTorch serving.

The model classes are the package's own (`puzzle_jax.export.hf_export`), never code from the
directory: an export ships copies of them (for transformers' `trust_remote_code` elsewhere), and
`verify_export_code` refuses a directory whose shipped files differ from the package's, so a
directory cannot run modeling code this package did not write.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import warnings

import torch

from puzzle_jax.export import hf_export

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ExportCodeError(ValueError):
  """An exported directory whose Python files are not this package's modeling code."""


def _sha256(path: pathlib.Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


def verify_export_code(path: str | os.PathLike) -> None:
  """Raise ExportCodeError unless every .py file in the export is a byte-identical copy of the
  package's `hf_export` file of that name (what `export` writes)."""
  p = pathlib.Path(path)
  for f in sorted(p.glob("*.py")):
    ours = hf_export.DIR / f.name
    if f.name not in hf_export.FILES or _sha256(f) != _sha256(ours):
      raise ExportCodeError(
          f"{f}: not this package's modeling code (it differs from puzzle_jax/export/hf_export/{f.name}, or "
          "the package ships no such file); this loader never runs code from a model directory. Re-export the "
          "model with `python -m puzzle_jax export`, or delete the file if the directory's config needs no "
          "remote code")


def device_default() -> torch.device:
  return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(path: str | os.PathLike, *, dtype: torch.dtype = torch.bfloat16,
               device: torch.device | str | None = None, random_weights: bool = False) -> torch.nn.Module:
  """An exported directory as the package's DeciLM module, in eval mode on `device`.

  Its shipped modeling files must be the package's own (`verify_export_code`). `random_weights`:
  build the module from config.json alone (`export.export_config` dirs, no safetensors), weights
  drawn by the modeling code's `_init_weights` (N(0, 0.02), norms 1), directly on `device`, so an
  8B model never sits in host memory. For speed runs: the values are meaningless."""
  from puzzle_jax.export.hf_export import configuration_decilm, modeling_decilm
  verify_export_code(path)
  device = torch.device(device) if device is not None else device_default()
  cfg = configuration_decilm.DeciLMConfig.from_pretrained(str(path))
  if random_weights:
    with device:
      m = modeling_decilm.DeciLMForCausalLM._from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    return m.eval()
  m = modeling_decilm.DeciLMForCausalLM.from_pretrained(str(path), config=cfg, dtype=dtype,
                                                        attn_implementation="sdpa")
  return m.to(device).eval()


def load_tokenizer(path: str | os.PathLike):
  """The directory's tokenizer, or None when the export has none (never remote code)."""
  p = pathlib.Path(path)
  if not any((p / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
    return None
  import transformers
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return transformers.AutoTokenizer.from_pretrained(str(p))


def vocab_size_of(path: str | os.PathLike) -> int:
  return json.loads((pathlib.Path(path) / "config.json").read_text())["vocab_size"]


def eos_ids_of(model: torch.nn.Module, tokenizer=None) -> tuple[int, ...]:
  """Stop ids from generation_config.json (and the tokenizer's eos), deduplicated."""
  ids: list[int] = []
  for src in (getattr(getattr(model, "generation_config", None), "eos_token_id", None),
              getattr(model.config, "eos_token_id", None),
              getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None):
    if src is None:
      continue
    ids += [int(t) for t in (src if isinstance(src, (list, tuple)) else [src])]
  return tuple(dict.fromkeys(ids))
