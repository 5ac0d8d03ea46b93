# coding=utf-8
"""DeciLM / nemotron-nas configuration, shipped next to exported weights (transformers remote code).

A heterogeneous Llama: `block_configs[i]` says what layer i is.

  attention: {"n_heads_in_group": G | "num_key_value_heads": K, "window_length": W | None,
              "no_op": bool, "replace_with_linear": bool, ...}
  ffn:       {"intermediate_size": F | "ffn_mult": m, "no_op": bool, "replace_with_linear": bool}
  parallel_group: int | None   (consecutive blocks with the same id read the same input and their
                                residual deltas are summed; a puzzle_jax extension)

`intermediate_size` wins over `ffn_mult` when both are given; `ffn_mult` follows NVIDIA's rule
(int(2 * m * D / 3) rounded up to a multiple of 256). RoPE is read from `rope_parameters`
(transformers 5) or `rope_theta` + `rope_scaling` (the released spelling); `default` and `llama3`.

Block entries are dicts that also allow attribute access (`block_configs[i].attention.no_op`), as
the NVIDIA block dataclasses do, so loaders written for either form can read them.

Imports only transformers (no puzzle_jax): this file must run on its own.
"""

from transformers import PretrainedConfig

ATTENTION_DEFAULTS = {
    "n_heads_in_group": None, "num_key_value_heads": None, "window_length": None,
    "no_op": False, "replace_with_linear": False, "sparsify": None, "num_sink_tokens": None,
    "unshifted_sink": False, "use_prefill_window_in_sink_attention": False,
}
FFN_DEFAULTS = {"ffn_mult": None, "intermediate_size": None, "no_op": False, "replace_with_linear": False,
                "sparsify": None}
# Sub-block features this modeling code cannot run; a config that turns one on is refused.
UNSUPPORTED_ATTENTION = ("sparsify", "num_sink_tokens", "unshifted_sink", "llama4", "mamba")
UNSUPPORTED_FFN = ("sparsify", "moe")


class AttrDict(dict):
    """A dict whose keys are also attributes (JSON-serializable like a dict)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        self[name] = value


def ffn_mult_to_intermediate_size(ffn_mult, hidden_size):
    """NVIDIA's rule: int(2 * mult * D / 3) rounded up to a multiple of 256."""
    size = int(2 * ffn_mult * hidden_size / 3)
    return size if size % 256 == 0 else size + 256 - size % 256


def _normalize_block(block, num_heads, hidden_size, index):
    block = dict(block)
    attn = {**ATTENTION_DEFAULTS, **dict(block.get("attention") or {})}
    ffn = {**FFN_DEFAULTS, **dict(block.get("ffn") or {})}
    for key in UNSUPPORTED_ATTENTION:
        if attn.get(key):
            raise ValueError(f"block_configs[{index}].attention.{key}={attn[key]!r} is not supported by "
                             "this modeling code")
    for key in UNSUPPORTED_FFN:
        if ffn.get(key):
            raise ValueError(f"block_configs[{index}].ffn.{key}={ffn[key]!r} is not supported by this "
                             "modeling code")
    if not (attn["no_op"] or attn["replace_with_linear"]):
        if attn["num_key_value_heads"] is None:
            if not attn["n_heads_in_group"]:
                raise ValueError(f"block_configs[{index}].attention needs n_heads_in_group or "
                                 "num_key_value_heads")
            attn["num_key_value_heads"] = num_heads // attn["n_heads_in_group"]
        if attn["n_heads_in_group"] is None:
            attn["n_heads_in_group"] = num_heads // attn["num_key_value_heads"]
        if num_heads % attn["num_key_value_heads"]:
            raise ValueError(f"block_configs[{index}]: num_key_value_heads={attn['num_key_value_heads']} "
                             f"does not divide num_attention_heads={num_heads}")
    if not (ffn["no_op"] or ffn["replace_with_linear"]) and ffn["intermediate_size"] is None:
        if ffn["ffn_mult"] is None:
            raise ValueError(f"block_configs[{index}].ffn needs intermediate_size or ffn_mult")
        ffn["intermediate_size"] = ffn_mult_to_intermediate_size(ffn["ffn_mult"], hidden_size)
    block["attention"], block["ffn"] = AttrDict(attn), AttrDict(ffn)
    block.setdefault("parallel_group", None)
    return AttrDict(block)


def _rope_parameters(rope_theta, rope_scaling, rope_parameters):
    """One flat dict {rope_type, rope_theta, ...} from either spelling (rope_parameters wins)."""
    params = {**dict(rope_scaling or {}), **dict(rope_parameters or {})}
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    params.setdefault("rope_type", "default")
    params.setdefault("rope_theta", 10000.0 if rope_theta is None else rope_theta)
    if params["rope_type"] not in ("default", "llama3"):
        raise ValueError(f"rope_type {params['rope_type']!r} is not supported (default, llama3)")
    if params["rope_type"] == "llama3":
        if "factor" not in params:
            raise ValueError("llama3 rope scaling needs 'factor'")
        params.setdefault("low_freq_factor", 1.0)
        params.setdefault("high_freq_factor", 4.0)
        params.setdefault("original_max_position_embeddings", 8192)
    return params


class DeciLMConfig(PretrainedConfig):
    model_type = "nemotron-nas"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size=32000,
        hidden_size=4096,
        num_attention_heads=32,
        num_hidden_layers=32,
        head_dim=None,
        rms_norm_eps=1e-5,
        max_position_embeddings=8192,
        rope_theta=None,
        rope_scaling=None,
        rope_parameters=None,
        block_configs=None,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        attention_dropout=0.0,
        initializer_range=0.02,
        use_cache=True,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        **kwargs,
    ):
        if hidden_act != "silu":
            raise ValueError(f"hidden_act={hidden_act!r} is not supported (silu only)")
        if attention_bias or mlp_bias:
            raise ValueError("attention_bias / mlp_bias are not supported")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.num_hidden_layers = num_hidden_layers
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.rms_norm_eps = rms_norm_eps
        self.max_position_embeddings = max_position_embeddings
        params = _rope_parameters(rope_theta, rope_scaling, rope_parameters)
        self.rope_theta = params["rope_theta"]
        self.rope_parameters = params
        if block_configs is None:
            default_block = {"attention": {"n_heads_in_group": 1}, "ffn": {"ffn_mult": 2.6875}}
            block_configs = [default_block] * num_hidden_layers
        if len(block_configs) != num_hidden_layers:
            raise ValueError(f"{len(block_configs)} block_configs for num_hidden_layers={num_hidden_layers}")
        self.block_configs = [_normalize_block(b, num_attention_heads, hidden_size, i)
                              for i, b in enumerate(block_configs)]
        self.hidden_act = hidden_act
        self.attention_bias = attention_bias
        self.mlp_bias = mlp_bias
        self.attention_dropout = attention_dropout
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.tie_word_embeddings = tie_word_embeddings
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        super().__init__(tie_word_embeddings=tie_word_embeddings, bos_token_id=bos_token_id,
                         eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)

    @property
    def layer_types(self):
        """What the KV cache allocates per layer: "full_attention" for attention layers (windows are
        applied by the mask, so every slot is kept), "moe" -- transformers' label for a layer without
        attention, whose cache entry is a placeholder -- for linear / no-op attention."""
        has_kv = [not (b.attention.no_op or b.attention.replace_with_linear) for b in self.block_configs]
        if not any(has_kv):  # nothing is cached; plain (never filled) layers keep the cache dynamic
            return ["full_attention"] * len(has_kv)
        return ["full_attention" if kv else "moe" for kv in has_kv]
