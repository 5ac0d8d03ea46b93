"""Architecture data: accounting (params, KV bytes from head_dim, FLOPs) and HF config I/O."""

import ast
import json
import pathlib
import subprocess
import sys

import jax
import pytest

from puzzle_jax.core import hf_config
from puzzle_jax.core import model
from puzzle_jax.core.arch import ArchError, AttnSpec, FFNSpec, spec_from_key, uniform_arch, variant_key


def test_kv_bytes_use_head_dim_not_hidden_over_heads():
  # hidden 64 / 4 heads = 16, but head_dim is 32 (as in several real models)
  a = uniform_arch(vocab_size=10, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                   intermediate_size=128, head_dim=32)
  assert a.kv_bytes_per_token("bfloat16") == 2 * (2 * 2 * 32 * 2)
  assert a.kv_cache_bytes(batch=3, context=100, dtype="float32") == 3 * 100 * 2 * (2 * 2 * 32 * 4)
  windowed = a.replace_block(0, attn=AttnSpec("gqa", num_kv_heads=2, window=10))
  assert windowed.kv_cache_bytes(1, 100) == 10 * 2 * 2 * 32 * 2 + 100 * 2 * 2 * 32 * 2


def test_flops_and_params_shrink_with_candidates():
  a = uniform_arch(vocab_size=10, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4,
                   intermediate_size=128)
  smaller = a.replace_block(1, attn=AttnSpec("gqa", num_kv_heads=1), ffn=FFNSpec("swiglu", 64))
  for f in (lambda x: x.num_params(), lambda x: x.flops_per_token(512, "decode"),
            lambda x: x.flops_per_token(512, "prefill"), lambda x: x.kv_bytes_per_token()):
    assert f(smaller) < f(a)
  assert a.replace_block(0, attn=AttnSpec("noop"), ffn=FFNSpec("noop")).block_params(0) == 0


def test_bad_specs_raise():
  with pytest.raises(ArchError, match="does not divide"):
    uniform_arch(vocab_size=10, hidden_size=64, num_layers=1, num_heads=6, num_kv_heads=4, intermediate_size=8)
  with pytest.raises(ArchError, match="unknown"):
    AttnSpec("sparse")
  with pytest.raises(ArchError, match="intermediate_size"):
    FFNSpec("swiglu")


def test_variant_keys_round_trip():
  for s in (AttnSpec("gqa", num_kv_heads=2, window=128), AttnSpec("linear"), AttnSpec("noop"),
            FFNSpec("swiglu", 768), FFNSpec("linear"), FFNSpec("noop"), FFNSpec("moe", 64, num_experts=8, top_k=2)):
    assert spec_from_key(variant_key(s)) == s


DECI = {
    "architectures": ["DeciLMForCausalLM"], "model_type": "nemotron-nas", "hidden_size": 8192,
    "num_attention_heads": 64, "num_hidden_layers": 4, "vocab_size": 128256, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "max_position_embeddings": 131072, "tie_word_embeddings": False,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "block_configs": [
        {"attention": {"n_heads_in_group": 8, "no_op": False, "replace_with_linear": False, "window_length": None,
                       "num_sink_tokens": None, "sparsify": None, "unshifted_sink": False,
                       "use_prefill_window_in_sink_attention": False},
         "ffn": {"ffn_mult": 5.25, "no_op": False, "replace_with_linear": False, "sparsify": None}},
        {"attention": {"n_heads_in_group": None, "no_op": True, "replace_with_linear": False},
         "ffn": {"ffn_mult": 2.625, "no_op": False, "replace_with_linear": False}},
        {"attention": {"n_heads_in_group": 64, "no_op": False, "replace_with_linear": False, "window_length": 4096},
         "ffn": {"ffn_mult": None, "no_op": False, "replace_with_linear": True}},
        {"attention": {"n_heads_in_group": None, "no_op": True, "replace_with_linear": False},
         "ffn": {"ffn_mult": None, "no_op": True, "replace_with_linear": False}},
    ],
}


def test_block_configs_round_trip():
  arch = hf_config.arch_from_hf(DECI)
  assert arch.blocks[0].attn.num_kv_heads == 8 and arch.blocks[0].ffn.intermediate_size == 28672
  assert arch.blocks[1].attn.kind == "noop" and arch.blocks[1].ffn.intermediate_size == 14336
  assert arch.blocks[2].attn.window == 4096 and arch.blocks[2].ffn.kind == "linear"
  assert arch.blocks[3].attn.kind == arch.blocks[3].ffn.kind == "noop"
  assert arch.rope.rope_type == "llama3" and arch.rope.factor == 8.0
  again = hf_config.arch_from_hf(json.loads(json.dumps(hf_config.arch_to_hf(arch))))
  assert again == arch
  for got, want in zip(hf_config.arch_to_hf(arch)["block_configs"], DECI["block_configs"]):
    for sub in ("attention", "ffn"):
      for k, v in want[sub].items():
        assert got[sub][k] == v, (sub, k)


def test_both_rope_spellings_and_newer_block_keys():
  new = {**DECI, "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 8192}}
  del new["rope_theta"], new["rope_scaling"]
  assert hf_config.arch_from_hf(new) == hf_config.arch_from_hf(DECI)
  blocks = [{"attention": {"num_key_value_heads": 8}, "ffn": {"intermediate_size": 28672}}] * 2
  a = hf_config.arch_from_hf({**DECI, "block_configs": blocks})
  assert a.blocks[0].attn.num_kv_heads == 8 and a.blocks[0].ffn.intermediate_size == 28672


def test_param_count_matches_created_params_for_deci():
  small = {**DECI, "hidden_size": 64, "num_attention_heads": 8, "vocab_size": 100,
           "block_configs": [{"attention": {"n_heads_in_group": 2}, "ffn": {"ffn_mult": 6.0}},
                             {"attention": {"replace_with_linear": True}, "ffn": {"no_op": True}},
                             {"attention": {"no_op": True}, "ffn": {"ffn_mult": 12.0}}]}
  arch = hf_config.arch_from_hf(small)
  params = jax.eval_shape(lambda: model.init_params(jax.random.PRNGKey(0), arch))
  assert model.count_params(params) == arch.num_params()


def test_unknown_architecture_and_missing_keys():
  with pytest.raises(ArchError, match="unsupported architecture"):
    hf_config.arch_from_hf({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "hidden_size": 8,
                            "num_attention_heads": 2})
  with pytest.raises(ArchError, match="vocab_size"):
    hf_config.arch_from_hf({k: v for k, v in DECI.items() if k != "vocab_size"})


def test_ffn_mult_rule():
  assert hf_config.ffn_mult_to_intermediate_size(5.25, 8192) == 28672
  for size in (256, 1536, 14336, 28672):
    m = hf_config.intermediate_size_to_ffn_mult(size, 4096)
    assert hf_config.ffn_mult_to_intermediate_size(m, 4096) == size
  assert hf_config.intermediate_size_to_ffn_mult(100, 4096) is None


def test_arch_does_not_import_hf_config():
  # arch is the bottom of the core: hf_config (and hf_gpt_oss) import it, never the other way round.
  # `puzzle_jax/__init__.py` itself imports io and hf_config (for `pj.arch_from_hf`), so the fresh
  # interpreter registers the package without running its __init__ and then imports arch alone.
  import puzzle_jax
  root = str(pathlib.Path(puzzle_jax.__file__).parent)
  code = ("import sys, types; pkg = types.ModuleType('puzzle_jax'); pkg.__path__ = [sys.argv[1]]; "
          "sys.modules['puzzle_jax'] = pkg; import puzzle_jax.core.arch; "
          "print(sorted(m for m in sys.modules if m.startswith('puzzle_jax')))")
  out = subprocess.run([sys.executable, "-c", code, root], capture_output=True, text=True, check=True, timeout=120)
  loaded = eval(out.stdout.strip())
  assert "puzzle_jax.core.arch" in loaded, loaded
  assert "puzzle_jax.core.hf_config" not in loaded, loaded
  assert loaded == ["puzzle_jax", "puzzle_jax.core", "puzzle_jax.core.arch"], loaded
  # Nor lazily, inside a function (the old HF-config methods on `Arch` did that: an import cycle).
  tree = ast.parse((pathlib.Path(root) / "core" / "arch.py").read_text())
  imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
  imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
  assert not [m for m in imported if m.startswith("puzzle_jax")], imported
