"""gpt-oss in the model: parity with transformers' GptOssForCausalLM (bf16 / MXFP4 checkpoints),
sinks, windows, YaRN, and the grouped MoE against brute force, under jit and expert sharding."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from puzzle_jax import io
from puzzle_jax.core import hf_config, model, names
from puzzle_jax.core.arch import AttnSpec, spec_from_key, variant_key
from puzzle_jax.moe import layer as moe_layer
from puzzle_jax.moe import mxfp4
from tests.gpt_oss_fixtures import hf_gpt_oss

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  m = hf_gpt_oss()
  d = tmp_path_factory.mktemp("gptoss")
  m.save_pretrained(d)
  return m, d


def _hf_logits(m, tokens):
  import torch
  with torch.no_grad():
    return m(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def _rel(a, b):
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_logits_match_transformers_float32(hf_dir):
  m, d = hf_dir
  arch, params = io.load_pretrained(d, dtype=jnp.float32)
  assert [b.attn.window for b in arch.blocks] == [4, None, 4]
  assert arch.rope.rope_type == "yarn" and arch.blocks[0].ffn.num_experts == 8
  assert arch.num_params() == model.count_params(params)
  tokens = np.random.RandomState(0).randint(0, 97, (2, 12))  # longer than the window
  ours = np.asarray(jax.jit(model.forward, static_argnums=0)(arch, params, tokens))
  assert _rel(ours, _hf_logits(m, tokens)) < 1e-4


def test_sinks_change_softmax_as_transformers(hf_dir):
  """Per-layer attention against transformers' eager_attention_forward (sinks join, then drop)."""
  import torch
  from transformers.models.gpt_oss import modeling_gpt_oss as hf
  rng = np.random.RandomState(1)
  q, k, v = (rng.randn(1, 4, 6, 16).astype(np.float32) for _ in range(3))
  k, v = k[:, :2], v[:, :2]
  sinks = rng.randn(4).astype(np.float32) * 2
  causal = np.tril(np.ones((6, 6), bool))
  mod = type("M", (), {"num_key_value_groups": 2, "sinks": torch.tensor(sinks), "training": False})()
  mask = torch.tensor(np.where(causal, 0.0, -np.inf)[None, None], dtype=torch.float32)
  ref, _ = hf.eager_attention_forward(mod, *(torch.tensor(x) for x in (q, k, v)), mask, scaling=16 ** -0.5)
  t = lambda x: jnp.asarray(x.transpose(0, 2, 1, 3))
  ours = model.grouped_attention(t(q), t(k), t(v), jnp.asarray(causal)[None], jnp.asarray(sinks))
  np.testing.assert_allclose(np.asarray(ours), ref.numpy(), atol=1e-5)
  plain = model.grouped_attention(t(q), t(k), t(v), jnp.asarray(causal)[None])
  assert float(jnp.max(jnp.abs(plain - ours))) > 1e-2  # the sinks matter


def test_bf16_checkpoint_loads(tmp_path):
  import torch
  mb = hf_gpt_oss().to(torch.bfloat16)
  mb.save_pretrained(tmp_path)
  arch, params = io.load_pretrained(tmp_path)
  assert params["model"]["layers"][0]["mlp"]["experts"]["gate_up_proj"].dtype == jnp.bfloat16
  tokens = np.random.RandomState(0).randint(0, 97, (1, 10))
  ours = np.asarray(model.forward(arch, jax.tree.map(lambda x: x.astype(jnp.float32), params), tokens))
  from transformers import GptOssForCausalLM
  mf = GptOssForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager")
  ref = _hf_logits(mf, tokens)  # the same bf16 weights, computed in float32
  assert _rel(ours, ref) < 1e-4


def test_mxfp4_checkpoint_loads_like_transformers(hf_dir, tmp_path):
  """Expert tensors repacked to *_blocks/*_scales; dequantized bit-equal to transformers' decoder."""
  import shutil

  import torch
  from safetensors.numpy import load_file, save_file
  from transformers.integrations.mxfp4 import convert_moe_packed_tensors
  _, d = hf_dir
  flat = load_file(str(d / "model.safetensors"))
  packed = mxfp4.quantize_flat(flat)
  assert "model.layers.0.mlp.experts.gate_up_proj_blocks" in packed
  blocks = packed["model.layers.0.mlp.experts.gate_up_proj_blocks"]
  assert blocks.shape == (8, 64, 2, 16) and blocks.dtype == np.uint8
  save_file(packed, str(tmp_path / "model.safetensors"))
  shutil.copy(d / "config.json", tmp_path / "config.json")
  arch, params = io.load_pretrained(tmp_path)
  for proj in ("gate_up_proj", "down_proj"):
    key = f"model.layers.1.mlp.experts.{proj}"
    ref = convert_moe_packed_tensors(torch.tensor(packed[key + "_blocks"]), torch.tensor(packed[key + "_scales"]),
                                     dtype=torch.float32).numpy()
    np.testing.assert_array_equal(np.asarray(names.flatten(params)[key]), ref)
    err = np.abs(ref - flat[key]).max() / np.abs(flat[key]).max()
    assert 0 < err < 0.2  # really quantized, and to the right values


def test_grouped_moe_equals_dense_and_shards_over_experts():
  key = jax.random.PRNGKey(0)
  p = moe_layer.init(key, 32, 16, 24)
  p["router"]["bias"] = jax.random.normal(key, (16,))
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 9, 32)) * 3  # large enough that the clamps bite
  ref = moe_layer.dense_reference(p, x, 4)
  got = jax.jit(moe_layer.moe_apply, static_argnums=2)(p, x, 4)
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)
  mesh = jax.make_mesh((8,), ("expert",))
  spec = lambda a: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("expert"))
  ps = {"router": p["router"], "experts": jax.device_put(p["experts"], jax.tree.map(spec, p["experts"]))}
  assert len(ps["experts"]["gate_up_proj"].sharding.device_set) == 8
  ep = jax.jit(moe_layer.moe_apply_ep, static_argnums=(2, 3))(ps, x, 4, mesh)
  np.testing.assert_allclose(np.asarray(ep), np.asarray(ref), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="divides every layer"):
    moe_layer.moe_apply_ep(p, x, 4, jax.make_mesh((3,), ("expert",), devices=jax.devices()[:3]))


def test_window_at_least_sequence_equals_full_attention(hf_dir):
  _, d = hf_dir
  arch, params = io.load_pretrained(d, dtype=jnp.float32)
  tokens = np.random.RandomState(2).randint(0, 97, (1, 10))
  full = arch.replace_block(0, attn=AttnSpec("gqa", num_kv_heads=2, bias=True, sinks=True))
  wide = arch.replace_block(0, attn=AttnSpec("gqa", num_kv_heads=2, bias=True, sinks=True, window=10))
  np.testing.assert_array_equal(np.asarray(model.forward(full, params, tokens)),
                                np.asarray(model.forward(wide, params, tokens)))
  assert float(jnp.max(jnp.abs(model.forward(arch, params, tokens) - model.forward(full, params, tokens)))) > 1e-3


def test_config_round_trip_and_keys(hf_dir):
  _, d = hf_dir
  arch, _ = io.load_pretrained(d)
  cfg = hf_config.arch_to_hf(arch)
  assert cfg["model_type"] == "gpt_oss_puzzle"
  assert [b["sliding_window"] for b in cfg["block_configs"]] == [4, None, 4]
  assert cfg["rope_parameters"]["rope_type"] == "yarn" and "rope_scaling" not in cfg
  assert hf_config.arch_from_hf(json.loads(json.dumps(cfg))) == arch
  for b in arch.blocks:
    assert spec_from_key(variant_key(b.attn)) == b.attn and spec_from_key(variant_key(b.ffn)) == b.ffn


def test_windowed_decode_reads_only_the_window_and_matches_forward(hf_dir):
  """Cached decoding past the window (the windowed layers slice their cache) == full forward."""
  _, d = hf_dir
  arch, params = io.load_pretrained(d, dtype=jnp.float32)
  tokens = jnp.asarray(np.random.RandomState(4).randint(0, 97, (2, 12)))
  full = model.forward(arch, params, tokens)
  extend = jax.jit(model.extend, static_argnums=0)
  cache = model.init_cache(arch, 2, 12)
  logits, cache = extend(arch, params, tokens[:, :7], cache)
  steps = [logits]
  for t in range(7, 12):
    logits, cache = extend(arch, params, tokens[:, t:t + 1], cache)
    steps.append(logits)
  np.testing.assert_allclose(np.asarray(jnp.concatenate(steps, 1)), np.asarray(full), rtol=2e-5, atol=2e-5)
