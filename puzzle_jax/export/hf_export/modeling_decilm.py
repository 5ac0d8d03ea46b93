# coding=utf-8
"""DeciLM / nemotron-nas modeling, shipped next to exported weights (transformers remote code).

A Llama whose layers differ (see configuration_decilm.py): each layer's attention is GQA with its own
KV-head count (optionally sliding-window), a single linear map, or absent; each FFN is SwiGLU of its
own width, a single linear map, or absent. An absent sub-block owns no tensors and no norm. Blocks that
share a `parallel_group` (and are consecutive) read the same input; their residual deltas are summed.

Semantics follow puzzle_jax.core.model exactly: HF-order RMSNorm, rotate-half RoPE (llama3 scaling),
scores and softmax in float32, window = keys with 0 <= q_slot - k_slot < window_length, left padding
from `attention_mask` (positions count only real tokens), masked scores set to -1e30 (finite, so a
padding row attends uniformly instead of producing NaN).

KV cache: a transformers `Cache` indexed by layer; only attention layers write to it (the config's
`layer_types` gives the others a placeholder entry). Every slot is kept; windows are applied by the mask.

Imports only torch and transformers (no puzzle_jax, no jax): this file must run on its own.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_decilm import DeciLMConfig

# transformers 5.24 renamed the cache argument and output field `past_key_values` -> `cache`
# (generate passes `cache=`); accept and return whichever this version uses.
CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"

NEG_INF = -1e30  # the masked-score value of the reference implementation


def _is_attention(block):
    return not (block.attention.no_op or block.attention.replace_with_linear)


def _parallel_runs(block_configs):
    """Consecutive layer indices grouped by parallel_group (singletons for None)."""
    runs, prev = [], object()
    for i, block in enumerate(block_configs):
        group = block.get("parallel_group")
        if group is not None and group == prev:
            runs[-1].append(i)
        else:
            runs.append([i])
        prev = group
    return runs


class DeciLMRMSNorm(nn.Module):
    def __init__(self, hidden_size, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        x = hidden_states.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight.to(input_dtype) * x.to(input_dtype)


def rope_inv_freq(rope, head_dim):
    """Inverse frequencies [head_dim / 2] in float32 (CPU), with Llama-3 scaling when configured."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    inv = 1.0 / (float(rope["rope_theta"]) ** exponent)
    if rope.get("rope_type", "default") != "llama3":
        return inv
    factor, low, high = float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
    old_len = float(rope["original_max_position_embeddings"])
    low_wl, high_wl = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wl, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
    return torch.where(medium, smoothed, scaled)


class DeciLMRotaryEmbedding(nn.Module):
    """cos/sin tables [B, L, head_dim] in float32. The inverse frequencies are computed on first use
    (not a buffer), so meta-device construction and dtype casts cannot change them."""

    def __init__(self, config):
        super().__init__()
        self.rope = dict(config.rope_parameters)
        self.head_dim = config.head_dim
        self._inv_freq = {}

    def forward(self, position_ids):
        device = position_ids.device
        if device not in self._inv_freq:
            self._inv_freq[device] = rope_inv_freq(self.rope, self.head_dim).to(device)
        freqs = position_ids.to(torch.float32)[..., None] * self._inv_freq[device]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x, cos, sin):
    """x [B, heads, L, H]; cos/sin [B, L, H] float32, cast to x's dtype (HF / reference order)."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    return x * cos + rotate_half(x) * sin


def repeat_kv(x, groups):
    """[B, K, S, H] -> [B, K * groups, S, H]; query head n reads kv head n // groups."""
    if groups == 1:
        return x
    b, k, s, h = x.shape
    return x[:, :, None].expand(b, k, groups, s, h).reshape(b, k * groups, s, h)


class DeciLMAttention(nn.Module):
    """Grouped-query attention with this layer's own KV-head count and optional window."""

    def __init__(self, config, layer_idx):
        super().__init__()
        attn = config.block_configs[layer_idx].attention
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = attn.num_key_value_heads
        self.head_dim = config.head_dim
        self.window = attn.window_length
        self.scaling = self.head_dim ** -0.5
        d, n, k, h = config.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim
        self.q_proj = nn.Linear(d, n * h, bias=False)
        self.k_proj = nn.Linear(d, k * h, bias=False)
        self.v_proj = nn.Linear(d, k * h, bias=False)
        self.o_proj = nn.Linear(n * h, d, bias=False)

    def forward(self, x, position_embeddings, allowed, past_key_values=None):
        """x [B, L, D]; allowed [B, L, S] bool (which keys each query may read)."""
        b, length, _ = x.shape
        cos, sin = position_embeddings
        q = self.q_proj(x).view(b, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        groups = self.num_heads // self.num_kv_heads
        k, v = repeat_kv(k.to(q.dtype), groups), repeat_kv(v.to(q.dtype), groups)
        if self.config._attn_implementation == "eager":
            out = self._eager(q, k, v, allowed)
        else:
            out = self._sdpa(q, k, v, allowed)
        return self.o_proj(out.transpose(1, 2).reshape(b, length, self.num_heads * self.head_dim))

    def _eager(self, q, k, v, allowed):
        scores = torch.matmul(q.to(torch.float32), k.to(torch.float32).transpose(-1, -2)) * self.scaling
        scores = scores.masked_fill(~allowed[:, None], NEG_INF)
        weights = torch.softmax(scores, dim=-1).to(v.dtype)
        return torch.matmul(weights, v)

    def _sdpa(self, q, k, v, allowed):
        # An explicit mask built from `allowed` (causal + window + padding). Finite rather than -inf,
        # so a padding row with no allowed key is uniform, as in the reference, on every backend.
        neg = max(NEG_INF, torch.finfo(q.dtype).min / 2)
        bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill(~allowed, neg)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias[:, None], scale=self.scaling)


class DeciLMLinearAttention(nn.Module):
    """Attention replaced by one DxD map (`self_attn.linear_attn`)."""

    def __init__(self, config):
        super().__init__()
        self.linear_attn = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.linear_attn(x)


class DeciLMMLP(nn.Module):
    def __init__(self, config, intermediate_size):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DeciLMLinearMLP(nn.Module):
    """FFN replaced by one DxD map (`mlp.linear_mlp`)."""

    def __init__(self, config):
        super().__init__()
        self.linear_mlp = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.linear_mlp(x)


class DeciLMDecoderLayer(nn.Module):
    """One block: attention delta from h, FFN delta from h + attention delta (the caller adds them)."""

    def __init__(self, config, layer_idx):
        super().__init__()
        block = config.block_configs[layer_idx]
        self.layer_idx = layer_idx
        self.has_attention = not block.attention.no_op
        self.has_ffn = not block.ffn.no_op
        self.is_gqa = _is_attention(block)
        self.window = block.attention.window_length if self.is_gqa else None
        if self.has_attention:
            self.input_layernorm = DeciLMRMSNorm(config.hidden_size, config.rms_norm_eps)
            self.self_attn = (DeciLMAttention(config, layer_idx) if self.is_gqa
                              else DeciLMLinearAttention(config))
        if self.has_ffn:
            self.post_attention_layernorm = DeciLMRMSNorm(config.hidden_size, config.rms_norm_eps)
            self.mlp = (DeciLMLinearMLP(config) if block.ffn.replace_with_linear
                        else DeciLMMLP(config, block.ffn.intermediate_size))

    def forward(self, hidden_states, position_embeddings, masks, past_key_values=None):
        """-> [attention delta, FFN delta], leaving out no-op parts."""
        deltas = []
        if self.has_attention:
            x = self.input_layernorm(hidden_states)
            if self.is_gqa:
                deltas.append(self.self_attn(x, position_embeddings, masks[self.window], past_key_values))
            else:
                deltas.append(self.self_attn(x))
        if self.has_ffn:
            mid = hidden_states + deltas[0] if deltas else hidden_states
            deltas.append(self.mlp(self.post_attention_layernorm(mid)))
        return deltas


class DeciLMPreTrainedModel(PreTrainedModel):
    config_class = DeciLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["DeciLMDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_cache_class = True

    def _init_weights(self, module):
        std = getattr(self.config, "initializer_range", 0.02)
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, DeciLMRMSNorm):
            nn.init.ones_(module.weight)


class DeciLMModel(DeciLMPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([DeciLMDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = DeciLMRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = DeciLMRotaryEmbedding(config)
        self.runs = _parallel_runs(config.block_configs)
        self.attention_layers = [i for i, b in enumerate(config.block_configs) if _is_attention(b)]
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def _past_length(self, past_key_values):
        if past_key_values is None or not self.attention_layers:
            return 0
        return past_key_values.get_seq_length(self.attention_layers[0])

    def _masks(self, key_valid, past, length):
        """{window: [B, L, S] bool}: causal by slot, valid keys only, within the window if any."""
        device = key_valid.device
        q_slots = torch.arange(past, past + length, device=device)
        k_slots = torch.arange(key_valid.shape[1], device=device)
        rel = q_slots[:, None] - k_slots[None, :]
        masks = {}
        for window in {self.layers[i].window for i in self.attention_layers}:
            ok = rel >= 0
            if window is not None:
                ok = ok & (rel < window)
            masks[window] = ok[None] & key_valid[:, None, :]
        return masks

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, **kwargs):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        past_key_values = kwargs.get("cache") if past_key_values is None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if past_key_values is not None and not isinstance(past_key_values, Cache):
            raise ValueError("past_key_values must be a transformers Cache (e.g. DynamicCache)")
        batch, length = inputs_embeds.shape[:2]
        device = inputs_embeds.device
        past = self._past_length(past_key_values)
        total = past + length
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[1] < total:
                raise ValueError(f"attention_mask must be 2-D [batch, past + new tokens] = "
                                 f"[{batch}, {total}], got {tuple(attention_mask.shape)}")
            mask = attention_mask.to(device=device, dtype=torch.bool)
            key_valid = mask[:, -total:]
            if position_ids is None:
                position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]
        else:
            key_valid = torch.ones(batch, total, dtype=torch.bool, device=device)
            if position_ids is None:
                position_ids = torch.arange(past, total, device=device)[None].expand(batch, length)
        position_embeddings = self.rotary_emb(position_ids.to(device))
        masks = self._masks(key_valid, past, length)

        hidden = inputs_embeds
        for run in self.runs:
            delta = None
            for i in run:  # summed in the reference's order: ((a_0 + f_0) + a_1) + f_1 ...
                for d in self.layers[i](hidden, position_embeddings, masks, past_key_values):
                    delta = d if delta is None else delta + d
            if delta is not None:
                hidden = hidden + delta
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden),
                                       **{CACHE_FIELD: past_key_values if use_cache else None})


class DeciLMForCausalLM(DeciLMPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.model = DeciLMModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, return_dict=None,
                **kwargs):
        past_key_values = kwargs.get("cache") if past_key_values is None else past_key_values
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache)
        hidden = out.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden = hidden[:, -logits_to_keep:] if logits_to_keep > 0 else hidden
        else:
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
            shift_labels = labels[:, 1:].reshape(-1).to(logits.device)
            loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100)
        result = CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: getattr(out, CACHE_FIELD)})
        return result.to_tuple() if return_dict is False else result
