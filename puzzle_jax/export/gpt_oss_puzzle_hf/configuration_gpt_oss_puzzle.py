# coding=utf-8
"""gpt_oss_puzzle configuration: a gpt-oss whose layers differ (transformers remote code).

`block_configs[i]` overrides the global gpt-oss fields for layer i:
  num_local_experts   experts kept in this layer (expert pruning)
  sliding_window      window length, or null for full attention
  num_experts_per_tok top-k (optional; default: the global value)
  intermediate_size   expert width (optional; default: the global value)
  kv_cache_dtype      "fp8_e4m3": K/V stored as float8 of x / k_scale (per-layer k_scale, v_scale
                      tensors in the checkpoint), or null for the activation dtype
`get_gpt_oss_config_for_layer(i)` returns a plain `GptOssConfig` for layer i, which is what the
modeling code (and vLLM's gpt_oss_puzzle) builds each layer from.

Imports only transformers (no puzzle_jax): this file must run on its own.
"""

from huggingface_hub.dataclasses import strict
from transformers import GptOssConfig

LAYER_KEYS = ("num_local_experts", "num_experts_per_tok", "intermediate_size")


@strict
class GptOssPuzzleConfig(GptOssConfig):
    model_type = "gpt_oss_puzzle"
    block_configs: list | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.block_configs is None:
            self.block_configs = [{"num_local_experts": self.num_local_experts,
                                   "sliding_window": self.sliding_window if t == "sliding_attention" else None}
                                  for t in self.layer_types]
        if len(self.block_configs) != self.num_hidden_layers:
            raise ValueError(f"block_configs has {len(self.block_configs)} entries for "
                             f"num_hidden_layers={self.num_hidden_layers}; give one per layer")
        self.layer_types = ["sliding_attention" if b.get("sliding_window") else "full_attention"
                            for b in self.block_configs]

    def get_gpt_oss_config_for_layer(self, i: int) -> GptOssConfig:
        b = self.block_configs[i]
        d = self.to_dict()
        for k in ("block_configs", "auto_map", "architectures", "model_type", "transformers_version"):
            d.pop(k, None)
        d.update({k: b[k] for k in LAYER_KEYS if b.get(k) is not None})
        window = b.get("sliding_window")
        d["sliding_window"] = window or self.sliding_window
        d["layer_types"] = ["sliding_attention" if window else "full_attention"] * self.num_hidden_layers
        cfg = GptOssConfig(**d)
        cfg.kv_cache_dtype = b.get("kv_cache_dtype")
        cfg._attn_implementation = self._attn_implementation
        cfg._experts_implementation = getattr(self, "_experts_implementation", "eager")
        return cfg


__all__ = ["GptOssPuzzleConfig"]
