"""Hugging Face config.json <-> `Arch`.

Reads plain Llama configs and NVIDIA's heterogeneous `DeciLMForCausalLM` /
`nemotron-nas` configs (per-layer `block_configs`). RoPE is accepted in both the
released spelling (`rope_theta` + `rope_scaling`) and transformers 5's
(`rope_parameters` with the theta inside).
"""

from __future__ import annotations

from typing import Any

from puzzle_jax.core import hf_gpt_oss
from puzzle_jax.core.arch import Arch, ArchError, AttnSpec, BlockSpec, FFNSpec, RopeSpec
from puzzle_jax.core.hf_common import global_fields  # (re-exported)

DECI_ARCH = "DeciLMForCausalLM"
DECI_MODEL_TYPE = "nemotron-nas"
LLAMA_ARCHS = ("LlamaForCausalLM", "MistralForCausalLM")


def ffn_mult_to_intermediate_size(ffn_mult: float, hidden_size: int) -> int:
  """NVIDIA's rule: int(2 * mult * D / 3) rounded up to a multiple of 256."""
  size = int(2 * ffn_mult * hidden_size / 3)
  return size if size % 256 == 0 else size + 256 - size % 256


def intermediate_size_to_ffn_mult(size: int, hidden_size: int) -> float | None:
  """The ffn_mult that maps back to `size` exactly, or None if no multiplier can."""
  for digits in (4, 6, 8, 12):
    mult = round(size * 3 / (2 * hidden_size), digits)
    for m in (mult, mult + 10**-digits):
      if ffn_mult_to_intermediate_size(m, hidden_size) == size:
        return m
  return None


def rope_from_hf(cfg: dict[str, Any]) -> RopeSpec:
  params = dict(cfg.get("rope_parameters") or {})
  scaling = dict(cfg.get("rope_scaling") or {})
  params = {**scaling, **params}
  theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
  rope_type = params.get("rope_type", params.get("type", "default")) or "default"
  if rope_type not in ("default", "llama3"):
    raise ArchError(f"rope_type {rope_type!r} is not supported (supported: default, llama3)")
  if rope_type == "default":
    return RopeSpec(theta=float(theta))
  return RopeSpec(theta=float(theta), rope_type="llama3", factor=float(params["factor"]),
                  low_freq_factor=float(params.get("low_freq_factor", 1.0)),
                  high_freq_factor=float(params.get("high_freq_factor", 4.0)),
                  original_max_position=int(params.get("original_max_position_embeddings",
                                                       cfg.get("max_position_embeddings", 8192))))


def rope_to_hf(rope: RopeSpec) -> dict[str, Any]:
  """Both spellings, so older and newer readers each find theirs."""
  scaling = None
  if rope.rope_type == "llama3":
    scaling = dict(rope_type="llama3", factor=rope.factor, low_freq_factor=rope.low_freq_factor,
                   high_freq_factor=rope.high_freq_factor,
                   original_max_position_embeddings=rope.original_max_position)
  params = {"rope_type": "default", **(scaling or {}), "rope_theta": rope.theta}
  return {"rope_theta": rope.theta, "rope_scaling": scaling, "rope_parameters": params}


def _require(cfg: dict[str, Any], key: str) -> Any:
  if key not in cfg:
    raise ArchError(f"config.json has no {key!r}; it is required to build the architecture")
  return cfg[key]


def _deci_attn(a: dict[str, Any], num_heads: int) -> AttnSpec:
  if a.get("no_op"):
    return AttnSpec("noop")
  if a.get("replace_with_linear"):
    return AttnSpec("linear")
  if a.get("sparsify"):
    raise ArchError("attention 'sparsify' is not supported")
  kv = a.get("num_key_value_heads")
  if kv is None:
    group = a.get("n_heads_in_group")
    if not group:
      raise ArchError("block attention needs n_heads_in_group or num_key_value_heads")
    kv = num_heads // group
  return AttnSpec("gqa", num_kv_heads=int(kv), window=a.get("window_length"),
                  num_sink_tokens=a.get("num_sink_tokens"))


def _deci_ffn(f: dict[str, Any], hidden: int) -> FFNSpec:
  if f.get("no_op"):
    return FFNSpec("noop")
  if f.get("replace_with_linear"):
    return FFNSpec("linear")
  if f.get("sparsify"):
    raise ArchError("ffn 'sparsify' is not supported")
  size = f.get("intermediate_size")
  if size is None:
    if f.get("ffn_mult") is None:
      raise ArchError("block ffn needs ffn_mult or intermediate_size")
    size = ffn_mult_to_intermediate_size(f["ffn_mult"], hidden)
  return FFNSpec("swiglu", intermediate_size=int(size))


def arch_from_hf(cfg: dict[str, Any]) -> Arch:
  """Build an `Arch` from a parsed config.json (Llama or nemotron-nas)."""
  archs = cfg.get("architectures") or []
  model_type = cfg.get("model_type")
  if model_type in hf_gpt_oss.GPT_OSS_TYPES:
    return hf_gpt_oss.arch_from_gpt_oss(cfg)
  hidden = int(_require(cfg, "hidden_size"))
  heads = int(_require(cfg, "num_attention_heads"))
  if "block_configs" in cfg:
    blocks = tuple(BlockSpec(_deci_attn(b["attention"], heads), _deci_ffn(b["ffn"], hidden),
                             b.get("parallel_group"))
                   for b in cfg["block_configs"])
  elif model_type in ("llama", "mistral") or any(a in LLAMA_ARCHS for a in archs):
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
      raise ArchError("Llama configs with attention_bias/mlp_bias are not supported")
    kv = int(cfg.get("num_key_value_heads") or heads)
    window = cfg.get("sliding_window") if model_type == "mistral" else None
    block = BlockSpec(AttnSpec("gqa", num_kv_heads=kv, window=window),
                      FFNSpec("swiglu", int(_require(cfg, "intermediate_size"))))
    blocks = (block,) * int(_require(cfg, "num_hidden_layers"))
  else:
    raise ArchError(f"unsupported architecture {archs or model_type!r}: expected a Llama config "
                    f"or a {DECI_ARCH} config with block_configs")
  eos = cfg.get("eos_token_id")
  return Arch(vocab_size=int(_require(cfg, "vocab_size")), hidden_size=hidden, num_heads=heads,
              head_dim=int(cfg.get("head_dim") or hidden // heads), blocks=blocks,
              rms_eps=float(cfg.get("rms_norm_eps", 1e-5)), rope=rope_from_hf(cfg),
              tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
              max_position=int(cfg.get("max_position_embeddings", 8192)),
              bos_token_id=cfg.get("bos_token_id"),
              eos_token_id=tuple(eos) if isinstance(eos, list) else eos)


def _attn_to_deci(a: AttnSpec, num_heads: int) -> dict[str, Any]:
  gqa = a.kind == "gqa"
  return {"n_heads_in_group": num_heads // a.num_kv_heads if gqa else None,
          "num_key_value_heads": a.num_kv_heads if gqa else None,
          "no_op": a.kind == "noop", "replace_with_linear": a.kind == "linear",
          "window_length": a.window, "num_sink_tokens": a.num_sink_tokens, "sparsify": None,
          "unshifted_sink": False, "use_prefill_window_in_sink_attention": False}


def _ffn_to_deci(f: FFNSpec, hidden: int) -> dict[str, Any]:
  if f.kind == "moe":
    raise ArchError("MoE blocks cannot be written as nemotron-nas block_configs")
  mult = None
  if f.kind == "swiglu":
    mult = intermediate_size_to_ffn_mult(f.intermediate_size, hidden)
    if mult is None:
      # Not a multiple of 256: engines that derive the width from ffn_mult (vLLM, TensorRT-LLM)
      # cannot reproduce it; this project and the shipped modeling code read intermediate_size.
      # export.check_nemotron_nas_config reports such layers.
      mult = round(f.intermediate_size * 3 / (2 * hidden), 6)
  return {"ffn_mult": mult, "intermediate_size": f.intermediate_size if f.kind == "swiglu" else None,
          "no_op": f.kind == "noop", "replace_with_linear": f.kind == "linear", "sparsify": None}


def arch_to_hf(arch: Arch, *, dtype: str = "bfloat16") -> dict[str, Any]:
  """A nemotron-nas config.json dict (a gpt_oss_puzzle one for MoE / attention-sink archs)."""
  if hf_gpt_oss.is_gpt_oss_like(arch):
    return hf_gpt_oss.arch_to_gpt_oss_puzzle(arch, dtype=dtype)
  blocks = []
  for b in arch.blocks:
    blk = {"attention": _attn_to_deci(b.attn, arch.num_heads),
           "ffn": _ffn_to_deci(b.ffn, arch.hidden_size)}
    if b.parallel_group is not None:
      blk["parallel_group"] = b.parallel_group
    blocks.append(blk)
  return {
      "architectures": [DECI_ARCH], "model_type": DECI_MODEL_TYPE,
      "auto_map": {"AutoConfig": "configuration_decilm.DeciLMConfig",
                   "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM"},
      **global_fields(arch), **rope_to_hf(arch.rope), "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
      "torch_dtype": dtype, "block_configs": blocks,
  }
