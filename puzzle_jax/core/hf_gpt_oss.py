"""gpt-oss config.json <-> `Arch`: OpenAI's `gpt_oss` and NVIDIA's heterogeneous `gpt_oss_puzzle`.

`gpt_oss`: every layer the same MoE (`num_local_experts`, `num_experts_per_tok`, `intermediate_size`),
attention with biases and sinks, `layer_types` alternating "sliding_attention" (window
`sliding_window`) and "full_attention", YaRN RoPE in transformers 5's `rope_parameters`.

`gpt_oss_puzzle` (what vLLM's `gpt_oss_puzzle` model reads): the same global fields plus one
`block_configs[i]` per layer with `num_local_experts` and `sliding_window` (an int, or null for full
attention); we also write `num_experts_per_tok`, `intermediate_size` and `kv_cache_dtype` per layer,
which readers that do not know them ignore (they then take the global values).
"""

from __future__ import annotations

from typing import Any

from puzzle_jax.core.arch import Arch, ArchError, AttnSpec, BlockSpec, FFNSpec, RopeSpec
from puzzle_jax.core.hf_common import global_fields

GPT_OSS_TYPES = ("gpt_oss", "gpt_oss_puzzle")
PUZZLE_ARCH = "GptOssPuzzleForCausalLM"
PUZZLE_MODEL_TYPE = "gpt_oss_puzzle"


def rope_from_gpt_oss(cfg: dict[str, Any]) -> RopeSpec:
  p = {**(cfg.get("rope_scaling") or {}), **(cfg.get("rope_parameters") or {})}
  theta = float(p.get("rope_theta", cfg.get("rope_theta", 150000.0)))
  kind = p.get("rope_type", p.get("type", "default"))
  if kind == "default":
    return RopeSpec(theta=theta)
  if kind != "yarn":
    raise ArchError(f"gpt-oss rope_type {kind!r} unsupported; expected 'yarn' or 'default'")
  return RopeSpec(theta=theta, rope_type="yarn", factor=float(p["factor"]),
                  beta_fast=float(p.get("beta_fast") or 32.0), beta_slow=float(p.get("beta_slow") or 1.0),
                  truncate=bool(p.get("truncate", True)),
                  original_max_position=int(p["original_max_position_embeddings"]))


def rope_to_gpt_oss(rope: RopeSpec) -> dict[str, Any]:
  """transformers 5 spelling: everything inside `rope_parameters` (it rejects the old rope_scaling)."""
  if rope.rope_type == "default":
    return {"rope_parameters": {"rope_type": "default", "rope_theta": rope.theta}}
  if rope.rope_type != "yarn":
    raise ArchError(f"gpt-oss export supports yarn or default RoPE, not {rope.rope_type!r}")
  return {"rope_parameters": {"rope_type": "yarn", "rope_theta": rope.theta, "factor": rope.factor,
                              "beta_fast": rope.beta_fast, "beta_slow": rope.beta_slow,
                              "truncate": rope.truncate,
                              "original_max_position_embeddings": rope.original_max_position}}


def _block(cfg: dict[str, Any], layer: dict[str, Any]) -> BlockSpec:
  attn = AttnSpec("gqa", num_kv_heads=int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]),
                  window=layer.get("sliding_window"), bias=bool(cfg.get("attention_bias", True)), sinks=True,
                  kv_dtype="fp8" if layer.get("kv_cache_dtype") in ("fp8", "fp8_e4m3") else None)
  ffn = FFNSpec("moe", int(layer.get("intermediate_size") or cfg["intermediate_size"]),
                num_experts=int(layer.get("num_local_experts") or cfg["num_local_experts"]),
                top_k=int(layer.get("num_experts_per_tok") or cfg["num_experts_per_tok"]))
  return BlockSpec(attn, ffn)


def layer_dicts(cfg: dict[str, Any]) -> list[dict[str, Any]]:
  """Per-layer overrides: block_configs (gpt_oss_puzzle), else derived from layer_types."""
  if "block_configs" in cfg:
    return [dict(b) for b in cfg["block_configs"]]
  n = int(cfg["num_hidden_layers"])
  types = cfg.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
  if len(types) != n:
    raise ArchError(f"layer_types has {len(types)} entries for num_hidden_layers={n}; give one per layer")
  return [{"sliding_window": cfg.get("sliding_window") if t == "sliding_attention" else None} for t in types]


def arch_from_gpt_oss(cfg: dict[str, Any]) -> Arch:
  blocks = tuple(_block(cfg, layer) for layer in layer_dicts(cfg))
  eos = cfg.get("eos_token_id")
  return Arch(vocab_size=int(cfg["vocab_size"]), hidden_size=int(cfg["hidden_size"]),
              num_heads=int(cfg["num_attention_heads"]),
              head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]),
              blocks=blocks, rms_eps=float(cfg.get("rms_norm_eps", 1e-5)), rope=rope_from_gpt_oss(cfg),
              tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
              max_position=int(cfg.get("max_position_embeddings", 131072)),
              bos_token_id=cfg.get("bos_token_id"),
              eos_token_id=tuple(eos) if isinstance(eos, list) else eos)


def is_gpt_oss_like(arch: Arch) -> bool:
  return any(b.ffn.kind == "moe" or b.attn.sinks for b in arch.blocks)


def check_gpt_oss(arch: Arch) -> None:
  """Raise unless every layer is gpt-oss shaped (what the gpt_oss_puzzle format can hold)."""
  kv = {b.attn.num_kv_heads for b in arch.blocks}
  for i, b in enumerate(arch.blocks):
    if b.attn.kind != "gqa" or not b.attn.sinks or not b.attn.bias or b.ffn.kind != "moe":
      raise ArchError(f"layer {i} ({b.attn.kind}/{b.ffn.kind}) is not gpt-oss shaped (gqa with bias and sinks, "
                      f"MoE FFN); gpt_oss_puzzle cannot hold it: keep such layers out of the candidate library")
  if len(kv) != 1:
    raise ArchError(f"gpt_oss_puzzle has one num_key_value_heads for all layers, got {sorted(kv)}; "
                    f"drop KV-head candidates from a gpt-oss search")


def arch_to_gpt_oss_puzzle(arch: Arch, *, dtype: str = "bfloat16") -> dict[str, Any]:
  check_gpt_oss(arch)
  first = arch.blocks[0]
  windows = sorted({b.attn.window for b in arch.blocks if b.attn.window})
  blocks = [{"num_local_experts": b.ffn.num_experts, "sliding_window": b.attn.window,
             "num_experts_per_tok": b.ffn.top_k, "intermediate_size": b.ffn.intermediate_size,
             "kv_cache_dtype": "fp8_e4m3" if b.attn.kv_dtype == "fp8" else None} for b in arch.blocks]
  return {
      "architectures": [PUZZLE_ARCH], "model_type": PUZZLE_MODEL_TYPE,
      "auto_map": {"AutoConfig": "configuration_gpt_oss_puzzle.GptOssPuzzleConfig",
                   "AutoModelForCausalLM": "modeling_gpt_oss_puzzle.GptOssPuzzleForCausalLM"},
      **global_fields(arch), "num_key_value_heads": first.attn.num_kv_heads,
      "intermediate_size": max(b.ffn.intermediate_size for b in arch.blocks),
      "num_local_experts": max(b.ffn.num_experts for b in arch.blocks),
      "num_experts_per_tok": max(b.ffn.top_k for b in arch.blocks),
      "sliding_window": windows[0] if windows else None,
      "layer_types": ["sliding_attention" if b.attn.window else "full_attention" for b in arch.blocks],
      **rope_to_gpt_oss(arch.rope), "attention_bias": True, "swiglu_limit": 7.0, "swiglu_alpha": 1.702,
      "torch_dtype": dtype, "block_configs": blocks,
  }
