"""A small random transformers `GptOssForCausalLM` (several experts, top-2, sinks, a window, YaRN)."""

import numpy as np

CFG = dict(vocab_size=97, hidden_size=64, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
           num_key_value_heads=2, head_dim=16, num_local_experts=8, num_experts_per_tok=2, sliding_window=4,
           max_position_embeddings=256,
           rope_parameters=dict(rope_type="yarn", factor=4.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
                                original_max_position_embeddings=64, rope_theta=150000.0))


def hf_gpt_oss(seed: int = 0, **overrides):
  """Random weights drawn large enough that sinks, biases and routing all matter."""
  import torch
  from transformers import GptOssConfig, GptOssForCausalLM
  torch.manual_seed(seed)
  cfg = GptOssConfig(**{**CFG, **overrides})
  cfg._attn_implementation = "eager"
  m = GptOssForCausalLM(cfg).eval()
  with torch.no_grad():
    for name, p in m.named_parameters():
      if "norm" in name:
        p.copy_(1 + 0.1 * torch.randn_like(p))
      elif p.ndim == 1 or name.endswith("_bias"):
        p.copy_(0.5 * torch.randn_like(p))
      else:
        fan_in = p.shape[-2] if "experts" in name else p.shape[-1]
        p.copy_(torch.randn_like(p) / np.sqrt(fan_in))
  return m
