"""Export an architecture + params as a Hugging Face directory (nemotron-nas / DeciLM).

The directory holds `config.json` (`hf_config.arch_to_hf`, the NVIDIA `block_configs` format),
safetensors weights under the HF names of `puzzle_jax.core.names` (one `model.safetensors`, or shards plus
`model.safetensors.index.json` above `max_shard_bytes`), the remote code of `puzzle_jax/hf_export`
(so `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` runs it),
`generation_config.json` and, when given, the tokenizer. `export_config` writes the same directory
without weights (an architecture for speed runs on random weights).

Everything is validated first (every tensor present with the shape the arch implies, no NaN/Inf, an
arch the format can express), then written into `<out_dir>.tmp-<id>` and renamed into place, so a
directory under the final name is always a complete export.

`check_nemotron_nas_config` lists what an external `nemotron_nas` loader (vLLM, TensorRT-LLM) would
miss or misread in a config.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import sys
import uuid
from typing import Any, Callable, Iterable

import jax
import ml_dtypes
import numpy as np

from puzzle_jax.export import hf_export
from puzzle_jax.core.model import expected_shapes  # (re-exported)
from puzzle_jax.core import hf_config, model, names
from puzzle_jax.core.arch import Arch, ArchError, fusable_groups, fuse_ffn_run
from puzzle_jax.export import engines
from puzzle_jax.core.hf_config import DECI_ARCH, DECI_MODEL_TYPE, ffn_mult_to_intermediate_size

Params = dict[str, Any]

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
AUTO_MAP = {"AutoConfig": "configuration_decilm.DeciLMConfig",
            "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM"}
# dtype name -> (safetensors dtype tag, numpy dtype)
DTYPES = {"float32": ("F32", np.dtype(np.float32)), "bfloat16": ("BF16", np.dtype(ml_dtypes.bfloat16)),
          "float16": ("F16", np.dtype(np.float16))}


class ExportError(ValueError):
  """Params that cannot be exported as they are; the message names the tensor and the fix."""


# ----------------------------------------------------------------------------- validation
def check_exportable(arch: Arch) -> None:
  """Raise ArchError if the nemotron-nas format (and the shipped modeling code) cannot express `arch`."""
  for i, b in enumerate(arch.blocks):
    if b.ffn.kind == "moe":
      raise ArchError(f"layer {i}: MoE FFN ({b.ffn.num_experts} experts) cannot be exported: the "
                      "nemotron-nas block_configs format has no MoE block. Replace it with a swiglu/linear/"
                      "noop FFN before exporting.")
    if b.attn.num_sink_tokens:
      raise ArchError(f"layer {i}: attention sinks (num_sink_tokens={b.attn.num_sink_tokens}) cannot be "
                      "exported: the shipped DeciLM modeling code does not implement them.")
    if b.attn.bias:
      raise ArchError(f"layer {i}: q/k/v/o biases cannot be exported: nemotron-nas attention has none.")


def check_params(arch: Arch, params: Params) -> dict[str, Any]:
  """The flat {name: array} of `params`, after checking names and shapes against `arch`."""
  flat = names.flatten(params)
  want = expected_shapes(arch)
  missing = [k for k in want if k not in flat]
  if missing:
    raise ExportError(f"params lack tensor {missing[0]!r} (shape {want[missing[0]]})"
                      + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
                      + "; the arch implies it. Export the params that belong to this arch.")
  extra = [k for k in flat if k not in want]
  if extra:
    raise ExportError(f"params have tensor {extra[0]!r} that the arch has no place for"
                      + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
                      + "; check the arch (no-op sub-blocks own no tensors; a tied model has no lm_head).")
  for k, shape in want.items():
    if tuple(np.shape(flat[k])) != shape:
      raise ExportError(f"tensor {k!r} has shape {tuple(np.shape(flat[k]))} but the arch implies {shape}")
  return {k: flat[k] for k in want}


def to_numpy(name: str, value: Any, dtype: str) -> np.ndarray:
  """One tensor as a C-contiguous numpy array of `dtype`, refusing NaN/Inf."""
  src = np.asarray(jax.device_get(value))
  if not np.isfinite(src.astype(np.float32)).all():
    raise ExportError(f"tensor {name!r} contains NaN or Inf; fix the params before exporting")
  with np.errstate(over="ignore"):  # an overflow is reported just below, by name
    out = np.ascontiguousarray(src.astype(DTYPES[dtype][1])).reshape(src.shape)  # keeps 0-d scalars 0-d
  if not np.isfinite(out.astype(np.float32)).all():
    raise ExportError(f"tensor {name!r} overflows {dtype} (finite in {src.dtype}, Inf after the cast); "
                      "export in a wider dtype")
  return out


# ----------------------------------------------------------------------------- safetensors
def write_safetensors(path: pathlib.Path, tensors: dict[str, np.ndarray]) -> None:
  """A safetensors file (8-byte header length, JSON header, raw little-endian data), bf16 included."""
  tags = {**{dt: tag for tag, dt in DTYPES.values()}, np.dtype(np.uint8): "U8"}  # U8: MXFP4 blocks/scales
  header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
  offset = 0
  for k, arr in tensors.items():
    header[k] = {"dtype": tags[arr.dtype], "shape": list(arr.shape),
                 "data_offsets": [offset, offset + arr.nbytes]}
    offset += arr.nbytes
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  with open(path, "wb") as f:
    f.write(len(blob).to_bytes(8, "little"))
    f.write(blob)
    for arr in tensors.values():
      f.write(arr.tobytes())


def plan_shards(sizes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
  """Greedy, in order: a shard closes before it would exceed the limit (a huge tensor is alone)."""
  shards: list[list[str]] = [[]]
  used = 0
  for k, n in sizes.items():
    if shards[-1] and used + n > max_shard_bytes:
      shards.append([])
      used = 0
    shards[-1].append(k)
    used += n
  return shards


def write_weights(out: pathlib.Path, flat: dict[str, Any], dtype: str, max_shard_bytes: int) -> list[str]:
  """Write (sharded) safetensors into `out`; returns the file names. Converts one shard at a time."""
  itemsize = DTYPES[dtype][1].itemsize
  sizes = {k: int(np.prod(np.shape(v))) * itemsize for k, v in flat.items()}
  shards = plan_shards(sizes, max_shard_bytes)
  if len(shards) == 1:
    write_safetensors(out / SAFETENSORS_FILE, {k: to_numpy(k, flat[k], dtype) for k in shards[0]})
    return [SAFETENSORS_FILE]
  files, weight_map = [], {}
  for i, keys in enumerate(shards):
    fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    write_safetensors(out / fname, {k: to_numpy(k, flat[k], dtype) for k in keys})
    files.append(fname)
    weight_map.update({k: fname for k in keys})
  index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
  (out / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
  return files + [SAFETENSORS_INDEX]


# ----------------------------------------------------------------------------- export
def generation_config(arch: Arch) -> dict[str, Any]:
  eos = list(arch.eos_token_id) if isinstance(arch.eos_token_id, tuple) else arch.eos_token_id
  cfg = {"bos_token_id": arch.bos_token_id, "eos_token_id": eos}
  return {k: v for k, v in cfg.items() if v is not None}


def for_engine(arch: Arch, params: Params | None, engine: str) -> tuple[Arch, Params | None]:
  """The arch (and params) `engine` loads: for engines without parallel blocks, parallel groups of
  FFN-only blocks become one wide FFN + no-op placeholders (the 253B layout, exactly equal); then
  every layer is checked against the engine's rules (EngineError naming the layers)."""
  if not engines.rules(engine).parallel_blocks:
    if params is not None:
      arch, params = model.fuse_parallel_ffns(arch, params)
    for run in fusable_groups(arch):
      arch = fuse_ffn_run(arch, run)
  engines.check_arch(arch, engine)
  return arch, params


def export(arch: Arch, params: Params, out_dir: str | pathlib.Path, *, tokenizer=None,
           dtype: str = "bfloat16", max_shard_bytes: int = 5 * 2**30,
           engine: str = "transformers") -> pathlib.Path:
  """Write an HF directory loadable with `AutoModelForCausalLM.from_pretrained(out_dir,
  trust_remote_code=True)` and by `engine` (see `puzzle_jax.export.engines`). Replaces an earlier
  export at `out_dir`; returns its path."""
  arch, params = for_engine(arch, params, engine)
  out = _target(arch, out_dir, dtype)
  if sys.byteorder != "little":
    raise RuntimeError("safetensors export assumes a little-endian host")
  flat = check_params(arch, params)

  def weights(tmp: pathlib.Path) -> None:
    write_weights(tmp, flat, dtype, max_shard_bytes)
    if tokenizer is not None:
      tokenizer.save(tmp)
  return _write_export(arch, out, dtype, weights)


def export_config(arch: Arch, out_dir: str | pathlib.Path, *, dtype: str = "bfloat16",
                  code: bool = True, engine: str = "transformers") -> pathlib.Path:
  """A weightless export: config.json, generation_config.json and (with `code`) the remote code,
  no safetensors.

  Enough for speed runs, which build random weights from the config
  (`puzzle_jax.serving.load.load_model(..., random_weights=True)`, with this package's copy of the
  modeling code, so committed descriptions need no `code`)."""
  arch, _ = for_engine(arch, None, engine)
  return _write_export(arch, _target(arch, out_dir, dtype), dtype, lambda tmp: None, code)


def _target(arch: Arch, out_dir: str | pathlib.Path, dtype: str) -> pathlib.Path:
  """The resolved export path, after the checks that need no params (dtype, target, arch)."""
  if dtype not in DTYPES:
    raise ValueError(f"dtype {dtype!r} unsupported; use one of {sorted(DTYPES)}")
  out = pathlib.Path(out_dir).resolve()
  if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not _earlier_export(out))):
    raise FileExistsError(f"{out} exists and was not written by puzzle_jax's export (a model directory of "
                          "your own, the parent, notes...); nothing in it was touched: pick a new directory")
  check_exportable(arch)
  return out


def _earlier_export(out: pathlib.Path) -> bool:
  """A directory this module wrote: our remote code byte for byte beside a config.json that maps to it,
  or (weightless `export_config` output) nothing but the config files and that code."""
  names = {p.name for p in out.iterdir()}
  if CONFIG_FILE not in names:
    return False
  ours = lambda f: (out / f).read_bytes() == (hf_export.DIR / f).read_bytes()
  if names <= {CONFIG_FILE, GENERATION_CONFIG_FILE, *hf_export.FILES}:
    return all(ours(f) for f in names & set(hf_export.FILES))
  try:
    auto_map = json.loads((out / CONFIG_FILE).read_text()).get("auto_map")
  except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
    return False
  return auto_map == AUTO_MAP and all(f in names and ours(f) for f in hf_export.FILES)


def _write_export(arch: Arch, out: pathlib.Path, dtype: str, fill: Callable[[pathlib.Path], None],
                  code: bool = True, *, config: dict[str, Any] | None = None, code_pkg=hf_export) -> pathlib.Path:
  """Config, generation config, remote code (`code_pkg.FILES` from `code_pkg.DIR`) and whatever
  `fill` adds, written into a temporary directory that is renamed into place (a directory under
  the final name is always complete)."""
  config = config or {**hf_config.arch_to_hf(arch, dtype=dtype), "auto_map": dict(AUTO_MAP)}

  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.with_name(f"{out.name}.tmp-{uuid.uuid4().hex[:8]}")
  tmp.mkdir()
  try:
    fill(tmp)
    (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    (tmp / GENERATION_CONFIG_FILE).write_text(json.dumps(generation_config(arch), indent=2) + "\n")
    for fname in code_pkg.FILES if code else ():
      shutil.copyfile(code_pkg.DIR / fname, tmp / fname)
    _replace_dir(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out


def _replace_dir(src: pathlib.Path, dst: pathlib.Path) -> None:
  """Rename `src` to `dst`; an existing `dst` is moved aside first and deleted after."""
  if not dst.exists():
    src.rename(dst)
    return
  old = dst.with_name(f"{dst.name}.old-{uuid.uuid4().hex[:8]}")
  dst.rename(old)
  src.rename(dst)
  shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- external loaders
def _positive(value: Any, kind: type | tuple[type, ...] = int) -> bool:
  return isinstance(value, kind) and not isinstance(value, bool) and value > 0


def check_nemotron_nas_config(cfg: dict[str, Any]) -> list[str]:
  """Problems an external `nemotron_nas` loader (vLLM, TensorRT-LLM) would hit; [] if none.

  Those loaders read `architectures`/`model_type`, the global dims, `rope_theta`, and per block
  `attention.{n_heads_in_group,no_op,replace_with_linear,window_length}` and
  `ffn.{ffn_mult,no_op,replace_with_linear}`; the FFN width comes from `ffn_mult` alone, by NVIDIA's
  rounding rule, and `intermediate_size` / `parallel_group` are ignored.
  """
  problems = []
  if DECI_ARCH not in (cfg.get("architectures") or []):
    problems.append(f"architectures must include {DECI_ARCH!r}, got {cfg.get('architectures')!r}")
  if cfg.get("model_type") != DECI_MODEL_TYPE:
    problems.append(f"model_type must be {DECI_MODEL_TYPE!r}, got {cfg.get('model_type')!r}")
  for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size",
              "max_position_embeddings"):
    if not _positive(cfg.get(key)):
      problems.append(f"{key} must be a positive integer, got {cfg.get(key)!r}")
  if not _positive(cfg.get("rms_norm_eps"), (int, float)):
    problems.append(f"rms_norm_eps must be a positive number, got {cfg.get('rms_norm_eps')!r}")
  if not _positive(cfg.get("rope_theta"), (int, float)):
    problems.append(f"rope_theta must be a positive number at the top level, got {cfg.get('rope_theta')!r}")
  problems += _check_rope_scaling(cfg.get("rope_scaling"))
  blocks = cfg.get("block_configs")
  if not isinstance(blocks, list):
    return problems + ["block_configs (one entry per layer) is missing"]
  if len(blocks) != cfg.get("num_hidden_layers"):
    problems.append(f"block_configs has {len(blocks)} entries but num_hidden_layers is "
                    f"{cfg.get('num_hidden_layers')}")
  heads, hidden = cfg.get("num_attention_heads"), cfg.get("hidden_size")
  for i, b in enumerate(blocks):
    problems += [f"block_configs[{i}]: {p}" for p in _check_block(b, heads, hidden)]
  return problems


def check_engine_config(cfg: dict[str, Any], engine: str) -> list[str]:
  """`check_nemotron_nas_config` plus what `engine` does not read (see `engines`): for vLLM no
  `replace_with_linear` sub-block; for vLLM and TensorRT-LLM no `window_length`. [] if it loads."""
  r = engines.rules(engine)
  if not r.width_from_ffn_mult:
    return []  # the shipped modeling code reads every field we write
  problems = check_nemotron_nas_config(cfg)
  for i, b in enumerate(cfg.get("block_configs") or []):
    a, f = b.get("attention", {}), b.get("ffn", {})
    if a.get("replace_with_linear") and not r.linear_attn:
      problems.append(f"block_configs[{i}]: attention.replace_with_linear is not read by {engine}")
    if f.get("replace_with_linear") and not r.linear_ffn:
      problems.append(f"block_configs[{i}]: ffn.replace_with_linear is not read by {engine}")
    if a.get("window_length") and not a.get("no_op") and not r.window:
      problems.append(f"block_configs[{i}]: attention.window_length={a['window_length']} is not read by {engine}")
  return problems


def _check_rope_scaling(scaling: Any) -> list[str]:
  if scaling is None:
    return []
  if not isinstance(scaling, dict):
    return [f"rope_scaling must be a dict or null, got {scaling!r}"]
  rope_type = scaling.get("rope_type", scaling.get("type"))
  if rope_type not in ("llama3", "default"):
    return [f"rope_scaling type {rope_type!r} is not one a nemotron_nas loader supports (llama3)"]
  need = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
  return [f"rope_scaling (llama3) lacks {k!r}" for k in need if rope_type == "llama3" and k not in scaling]


def _missing(d: dict[str, Any], keys: Iterable[str], what: str) -> list[str]:
  return [f"{what}.{k} is missing" for k in keys if k not in d]


def _check_block(b: Any, heads: Any, hidden: Any) -> list[str]:
  if not (isinstance(b, dict) and isinstance(b.get("attention"), dict) and isinstance(b.get("ffn"), dict)):
    return ["needs 'attention' and 'ffn' dicts"]
  a, f = b["attention"], b["ffn"]
  problems = _missing(a, ("n_heads_in_group", "no_op", "replace_with_linear", "window_length"), "attention")
  problems += _missing(f, ("ffn_mult", "no_op", "replace_with_linear"), "ffn")
  if problems:
    return problems
  if a.get("sparsify") or a.get("num_sink_tokens") or f.get("sparsify"):
    problems.append("sparsify / attention sinks are not supported by the loaders")
  if b.get("parallel_group") is not None:
    problems.append(f"parallel_group={b['parallel_group']} is ignored by the loaders, which would run the "
                    "parallel blocks one after the other (wrong outputs)")
  if not (a["no_op"] or a["replace_with_linear"]):
    g = a["n_heads_in_group"]
    if not _positive(g) or (isinstance(heads, int) and heads % g):
      problems.append(f"attention.n_heads_in_group={g!r} must be a positive divisor of "
                      f"num_attention_heads={heads}")
    elif a.get("num_key_value_heads") is not None and a["num_key_value_heads"] * g != heads:
      problems.append(f"attention.num_key_value_heads={a['num_key_value_heads']} disagrees with "
                      f"n_heads_in_group={g} (num_attention_heads={heads})")
  if not (f["no_op"] or f["replace_with_linear"]):
    mult = f["ffn_mult"]
    if not _positive(mult, (int, float)):
      problems.append(f"ffn.ffn_mult={mult!r} must be a positive number")
    elif f.get("intermediate_size") is not None and isinstance(hidden, int):
      width = ffn_mult_to_intermediate_size(mult, hidden)
      if width != f["intermediate_size"]:
        problems.append(f"ffn.ffn_mult={mult} gives width {width} under NVIDIA's rounding (multiple of 256) "
                        f"but intermediate_size is {f['intermediate_size']}; vLLM / TensorRT-LLM would build "
                        "the wrong FFN (only this project's loader and the shipped modeling code read "
                        "intermediate_size)")
  return problems
