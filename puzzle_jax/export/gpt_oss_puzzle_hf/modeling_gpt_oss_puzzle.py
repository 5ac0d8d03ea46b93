# coding=utf-8
"""gpt_oss_puzzle model: transformers' gpt-oss with per-layer expert counts, windows and FP8 KV.

Each decoder layer is transformers' own `GptOssDecoderLayer`, built from
`config.get_gpt_oss_config_for_layer(i)`; the model builds one attention mask per distinct window.
A layer whose `kv_cache_dtype` is "fp8_e4m3" rounds its keys (after RoPE) and values through
float8_e4m3fn as `clamp(x / scale, -448, 448)` and multiplies back, the values an FP8 KV cache
would hold; `k_scale` / `v_scale` are per-layer tensors of the checkpoint (vLLM's names).

Imports only torch and transformers (no puzzle_jax): this file must run on its own.
"""

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import MoeModelOutputWithPast
from transformers.models.gpt_oss import modeling_gpt_oss as hf

from .configuration_gpt_oss_puzzle import GptOssPuzzleConfig

FP8_MAX = 448.0


def fp8_round_trip(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    s = scale.to(torch.float32)
    q = (x.to(torch.float32) / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return (q.to(torch.float32) * s).to(x.dtype)


class GptOssPuzzleAttention(hf.GptOssAttention):
    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.fp8 = getattr(config, "kv_cache_dtype", None) in ("fp8", "fp8_e4m3")
        if self.fp8:
            self.k_scale = nn.Parameter(torch.ones(()), requires_grad=False)
            self.v_scale = nn.Parameter(torch.ones(()), requires_grad=False)

    def forward(self, hidden_states, position_embeddings, attention_mask, cache=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = hf.apply_rotary_pos_emb(q, k, cos, sin)
        if self.fp8:
            k, v = fp8_round_trip(k, self.k_scale), fp8_round_trip(v, self.v_scale)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)
        out, weights = hf.eager_attention_forward(self, q, k, v, attention_mask, scaling=self.scaling,
                                                  dropout=0.0, sliding_window=self.sliding_window)
        return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


class GptOssPuzzleDecoderLayer(hf.GptOssDecoderLayer):
    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.self_attn = GptOssPuzzleAttention(config, layer_idx)


class GptOssPuzzleModel(hf.GptOssModel):
    config_class = GptOssPuzzleConfig

    def __init__(self, config: GptOssPuzzleConfig):
        super().__init__(config)
        self.layer_configs = [config.get_gpt_oss_config_for_layer(i) for i in range(config.num_hidden_layers)]
        self.layers = nn.ModuleList([GptOssPuzzleDecoderLayer(c, i) for i, c in enumerate(self.layer_configs)])
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, **kwargs):
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = hf.DynamicCache(config=self.config)
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past)[None]
        masks = {}
        for c in self.layer_configs:
            window = c.sliding_window if c.layer_types[0] == "sliding_attention" else None
            if window not in masks:
                make = create_sliding_window_causal_mask if window else create_causal_mask
                masks[window] = make(config=c, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                     cache=cache)
        h = inputs_embeds
        pos = self.rotary_emb(h, position_ids)
        for layer, c in zip(self.layers, self.layer_configs):
            window = c.sliding_window if c.layer_types[0] == "sliding_attention" else None
            h = layer(h, attention_mask=masks[window], position_embeddings=pos, position_ids=position_ids,
                      cache=cache, use_cache=use_cache, **kwargs)
        return MoeModelOutputWithPast(last_hidden_state=self.norm(h), cache=cache)


class GptOssPuzzleForCausalLM(hf.GptOssForCausalLM):
    config_class = GptOssPuzzleConfig

    def __init__(self, config: GptOssPuzzleConfig):
        super().__init__(config)
        self.model = GptOssPuzzleModel(config)
        self.post_init()


__all__ = ["GptOssPuzzleConfig", "GptOssPuzzleForCausalLM", "GptOssPuzzleModel"]
