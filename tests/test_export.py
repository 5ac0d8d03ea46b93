"""Export: transformers loads our HF directories and matches our forward / generate.

The heterogeneous child covers every sub-block kind: KV heads 4/2/1, a sliding window, linear
attention and FFN, no-op attention and FFN, a fully no-op block, a 2-block parallel group, FFN widths
128 / 256, llama3 RoPE scaling; untied and tied. Params are random with non-unit norms.
"""

import ast
import json
import pathlib
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch
import transformers

from puzzle_jax import export as ex
from puzzle_jax.export import hf_export
from puzzle_jax.core import hf_config
from puzzle_jax.core import model
from puzzle_jax.core import names
from puzzle_jax.core.arch import Arch, ArchError, AttnSpec, BlockSpec, FFNSpec, RopeSpec, uniform_arch
from archs import hetero_child, random_params

V, L, NEW = 97, 12, 16
EOS = 2
PAD_LEFT = 5  # row 1 of the padded batch starts with this many padding slots
TOL = 1e-4


def llama_arch() -> Arch:
  return uniform_arch(vocab_size=V, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=256, rope=RopeSpec(theta=500000.0), bos_token_id=1,
                      eos_token_id=EOS)


def batches():
  """(tokens [2, L], all-ones mask, left-padded mask)."""
  tokens = np.random.RandomState(1).randint(3, V, size=(2, L))
  full = np.ones((2, L), np.int64)
  padded = full.copy()
  padded[1, :PAD_LEFT] = 0
  return tokens, full, padded


_forward = jax.jit(model.forward, static_argnums=0)


def ref_logits(arch, params, tokens, mask) -> np.ndarray:
  return np.asarray(_forward(arch, params, jnp.asarray(tokens), jnp.asarray(mask, bool)))


def rel_err(got, want, mask=None) -> float:
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  diff = np.abs(got - want)
  if mask is not None:
    diff = diff[np.asarray(mask, bool)]
  return float(diff.max() / np.abs(want).max())


def load_hf(path, dtype=torch.float32, attn="sdpa"):
  m = transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=dtype,
                                                        attn_implementation=attn)
  return m.eval()


def hf_logits(m, tokens, mask) -> np.ndarray:
  with torch.no_grad():
    out = m(torch.tensor(tokens), attention_mask=torch.tensor(mask))
  return out.logits.float().numpy()


def hf_generate(m, tokens, mask, use_cache) -> np.ndarray:
  with torch.no_grad():
    out = m.generate(torch.tensor(tokens), attention_mask=torch.tensor(mask), max_new_tokens=NEW,
                     min_new_tokens=NEW, do_sample=False, use_cache=use_cache, eos_token_id=EOS,
                     pad_token_id=EOS)
  return out[:, tokens.shape[1]:].numpy()


def export_quietly(arch, params, out, **kw) -> pathlib.Path:
  with warnings.catch_warnings():  # width 128 is not a multiple of 256: arch_to_hf warns (expected)
    warnings.simplefilter("ignore", UserWarning)
    return ex.export(arch, params, out, **kw)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # fixture in conftest.py


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def hetero(request, tmp_path_factory):
  arch = hetero_child(tie=request.param)
  params = random_params(arch)
  out = export_quietly(arch, params, tmp_path_factory.mktemp("hetero") / "model", dtype="float32")
  return arch, params, out


# ----------------------------------------------------------------------------- parity
def test_remote_code_is_self_contained():
  for fname in hf_export.FILES:
    tree = ast.parse((hf_export.DIR / fname).read_text())
    roots = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        roots |= {a.name.split(".")[0] for a in node.names}
      elif isinstance(node, ast.ImportFrom) and node.level == 0:
        roots.add(node.module.split(".")[0])
    assert roots <= {"math", "torch", "transformers"}, (fname, roots)


def test_export_layout(hetero):
  arch, _, out = hetero
  files = sorted(p.name for p in out.iterdir())
  assert files == sorted(["config.json", "generation_config.json", "model.safetensors", *hf_export.FILES])
  cfg = json.loads((out / "config.json").read_text())
  assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_decilm.DeciLMForCausalLM"
  assert cfg["torch_dtype"] == "float32"
  assert json.loads((out / "generation_config.json").read_text()) == {"bos_token_id": 1, "eos_token_id": EOS}
  assert not list(out.parent.glob("*.tmp-*"))


def test_export_config_is_the_export_without_weights(hetero, tmp_path):
  arch, params, full = hetero
  with warnings.catch_warnings():  # width 128 is not a multiple of 256: arch_to_hf warns (expected)
    warnings.simplefilter("ignore", UserWarning)
    out = ex.export_config(arch, tmp_path / "cfg", dtype="float32")
  files = sorted(p.name for p in out.iterdir())
  assert files == sorted(["config.json", "generation_config.json", *hf_export.FILES])
  for fname in files:  # byte for byte what `export` writes beside its weights
    assert (out / fname).read_bytes() == (full / fname).read_bytes(), fname
  cfg = json.loads((out / "config.json").read_text())
  assert hf_config.arch_from_hf(cfg) == arch
  plain = ex.export_config(llama_arch(), tmp_path / "plain")  # the external-loader check needs no parallel group
  assert ex.check_nemotron_nas_config(json.loads((plain / "config.json").read_text())) == []
  assert hf_config.arch_from_hf(json.loads((plain / "config.json").read_text())) == llama_arch()
  bare = ex.export_config(llama_arch(), tmp_path / "bare", code=False)  # what benchmarks/data commits
  assert sorted(p.name for p in bare.iterdir()) == ["config.json", "generation_config.json"]
  ex.export(arch, params, out, dtype="float32")  # a config-only dir is an earlier export: replaced
  assert (out / "model.safetensors").exists() and not list(tmp_path.glob("*.tmp-*"))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_hetero_logits_match(hetero, attn):
  arch, params, out = hetero
  m = load_hf(out, attn=attn)
  tokens, full, padded = batches()
  for mask in (full, padded):
    want = ref_logits(arch, params, tokens, mask)
    got = hf_logits(m, tokens, mask)
    assert rel_err(got, want) < TOL, (attn, mask.tolist())
  # Tensor names: no-op sub-blocks own nothing, tied models have no lm_head.
  sd = m.state_dict()
  want_names = set(names.flatten(params))
  got_names = set(sd) - ({"lm_head.weight"} if arch.tie_embeddings else set())
  assert got_names == want_names
  if arch.tie_embeddings:
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()


def test_hetero_generate_matches(hetero):
  arch, params, out = hetero
  m = load_hf(out)
  tokens, full, padded = batches()
  for mask in (full, padded):
    want = np.asarray(model.generate(arch, params, tokens, mask, max_new_tokens=NEW, stop_tokens=(EOS,)))
    for use_cache in (True, False):
      got = hf_generate(m, tokens, mask, use_cache)
      np.testing.assert_array_equal(got, want, err_msg=f"use_cache={use_cache} mask={mask.tolist()}")


def test_kv_cache_holds_attention_layers_only(hetero):
  arch, _, out = hetero
  m = load_hf(out)
  tokens, _, _ = batches()
  with torch.no_grad():
    out = m(torch.tensor(tokens), use_cache=True)
    cache = getattr(out, "cache", None) or out.past_key_values  # renamed in transformers 5.24
  for i, b in enumerate(arch.blocks):
    layer = cache.layers[i]
    if b.attn.kind == "gqa":
      assert tuple(layer.keys.shape) == (2, b.attn.num_kv_heads, L, arch.head_dim)
    else:
      assert getattr(layer, "keys", None) is None
  assert cache.get_seq_length() == L


def test_attention_free_child_generates(tmp_path):
  """No layer has a KV cache: generate with use_cache must still see each new token correctly."""
  arch = Arch(vocab_size=V, hidden_size=64, num_heads=4, head_dim=16, blocks=(
      BlockSpec(AttnSpec("linear"), FFNSpec("swiglu", 256)),
      BlockSpec(AttnSpec("noop"), FFNSpec("linear"))), bos_token_id=1, eos_token_id=EOS)
  params = random_params(arch, seed=5)
  m = load_hf(ex.export(arch, params, tmp_path / "m", dtype="float32"))
  tokens, _, padded = batches()
  assert rel_err(hf_logits(m, tokens, padded), ref_logits(arch, params, tokens, padded)) < TOL
  want = np.asarray(model.generate(arch, params, tokens, padded, max_new_tokens=NEW, stop_tokens=(EOS,)))
  for use_cache in (True, False):
    np.testing.assert_array_equal(hf_generate(m, tokens, padded, use_cache), want)


def test_transformers_resave_round_trips(hetero, tmp_path):
  """A model loaded and re-saved by transformers (e.g. after HF fine-tuning) comes back unchanged."""
  arch, params, out = hetero
  m = load_hf(out)
  m.save_pretrained(tmp_path / "resaved")
  arch2, params2 = read_export(tmp_path / "resaved")
  assert arch2 == arch
  assert_params_bitwise_equal(params2, params)
  tokens, _, padded = batches()
  np.testing.assert_array_equal(hf_logits(load_hf(tmp_path / "resaved"), tokens, padded),
                                hf_logits(m, tokens, padded))


def test_bfloat16_export_loads(tmp_path):
  arch = hetero_child()
  params = random_params(arch)
  out = export_quietly(arch, params, tmp_path / "bf16", dtype="bfloat16")
  from safetensors import safe_open
  with safe_open(str(out / "model.safetensors"), framework="numpy") as f:
    w = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
  want = np.asarray(params["model"]["layers"][0]["self_attn"]["q_proj"]["weight"].astype(jnp.bfloat16))
  np.testing.assert_array_equal(w.view(np.uint16), want.view(np.uint16))
  m = load_hf(out, dtype=torch.bfloat16)
  assert m.model.embed_tokens.weight.dtype == torch.bfloat16
  tokens, _, padded = batches()
  bf16_params = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
  want = ref_logits(arch, bf16_params, tokens, padded)
  assert rel_err(hf_logits(m, tokens, padded), want, padded) < 5e-2
  assert hf_generate(m, tokens, padded, use_cache=True).shape == (2, NEW)


def test_plain_llama_loads_in_shipped_code_and_transformers_llama(tmp_path):
  arch = llama_arch()
  params = random_params(arch, seed=3)
  out = ex.export(arch, params, tmp_path / "llama", dtype="float32")
  tokens, full, padded = batches()
  want_full = ref_logits(arch, params, tokens, full)
  want_pad = ref_logits(arch, params, tokens, padded)

  deci = load_hf(out)
  assert rel_err(hf_logits(deci, tokens, full), want_full) < TOL
  assert rel_err(hf_logits(deci, tokens, padded), want_pad) < TOL

  # The same weights under a plain LlamaConfig, through transformers' own LlamaForCausalLM.
  llama_dir = tmp_path / "as_llama"
  llama_dir.mkdir()
  shutil.copy(out / "model.safetensors", llama_dir)
  cfg = json.loads((out / "config.json").read_text())
  llama_cfg = {k: cfg[k] for k in ("vocab_size", "hidden_size", "num_attention_heads", "head_dim",
                                   "num_hidden_layers", "rms_norm_eps", "rope_theta",
                                   "max_position_embeddings", "tie_word_embeddings", "bos_token_id",
                                   "eos_token_id")}
  llama_cfg.update(architectures=["LlamaForCausalLM"], model_type="llama", num_key_value_heads=2,
                   intermediate_size=256, hidden_act="silu", torch_dtype="float32")
  (llama_dir / "config.json").write_text(json.dumps(llama_cfg))
  llama = transformers.LlamaForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
  assert rel_err(hf_logits(llama, tokens, full), want_full) < TOL
  positions = np.maximum(np.cumsum(padded, axis=1) - 1, 0)
  with torch.no_grad():
    got = llama(torch.tensor(tokens), attention_mask=torch.tensor(padded),
                position_ids=torch.tensor(positions)).logits.numpy()
  assert rel_err(got, want_pad, padded) < TOL


# ----------------------------------------------------------------------------- round trip
def read_export(path: pathlib.Path) -> tuple[Arch, dict]:
  from safetensors import safe_open
  cfg = json.loads((path / "config.json").read_text())
  arch = hf_config.arch_from_hf(cfg)
  index = path / "model.safetensors.index.json"
  files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists()
           else ["model.safetensors"])
  flat = {}
  for fname in files:
    with safe_open(str(path / fname), framework="numpy") as f:
      flat.update({k: f.get_tensor(k) for k in f.keys()})
  return arch, names.unflatten(flat, arch.num_layers)


def assert_params_bitwise_equal(got, want):
  got_flat, want_flat = names.flatten(got), names.flatten(want)
  assert set(got_flat) == set(want_flat)
  for k, w in want_flat.items():
    g = np.asarray(got_flat[k])
    assert g.dtype == np.asarray(w).dtype, k
    np.testing.assert_array_equal(g.view(np.uint32), np.asarray(w).view(np.uint32), err_msg=k)


def test_round_trip_bitwise(hetero):
  arch, params, out = hetero
  arch2, params2 = read_export(out)
  assert arch2 == arch
  assert_params_bitwise_equal(params2, params)


def test_round_trip_through_load_pretrained(hetero):
  from puzzle_jax import io
  arch, params, out = hetero
  arch2, params2 = io.load_pretrained(out)
  assert arch2 == arch
  assert_params_bitwise_equal(params2, params)


def test_sharded_export_loads(tmp_path, hetero):
  arch, params, _ = hetero
  out = export_quietly(arch, params, tmp_path / "sharded", dtype="float32", max_shard_bytes=40_000)
  index = json.loads((out / "model.safetensors.index.json").read_text())
  shards = sorted(set(index["weight_map"].values()))
  assert len(shards) > 2 and not (out / "model.safetensors").exists()
  assert set(index["weight_map"]) == set(names.flatten(params))
  assert index["metadata"]["total_size"] == sum(np.asarray(x).nbytes for x in names.flatten(params).values())
  arch2, params2 = read_export(out)
  assert arch2 == arch
  assert_params_bitwise_equal(params2, params)
  tokens, _, padded = batches()
  got = hf_logits(load_hf(out), tokens, padded)
  assert rel_err(got, ref_logits(arch, params, tokens, padded)) < TOL


def test_reexport_replaces_and_foreign_dir_is_refused(tmp_path):
  arch = llama_arch()
  params = random_params(arch)
  out = ex.export(arch, params, tmp_path / "m", dtype="float32")
  (out / "stale.txt").write_text("from an earlier export")
  ex.export(arch, params, out, dtype="float32")
  assert not (out / "stale.txt").exists()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
  foreign = tmp_path / "notes"
  foreign.mkdir()
  (foreign / "keep.txt").write_text("not an export")
  with pytest.raises(FileExistsError):
    ex.export(arch, params, foreign)
  assert (foreign / "keep.txt").exists()


def test_tokenizer_is_saved_and_loads_in_transformers(tmp_path):
  import tokenizers
  from puzzle_jax.io.tokenizer import Tokenizer
  vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
  backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok = Tokenizer(backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
  arch = llama_arch()
  out = ex.export(arch, random_params(arch), tmp_path / "m", tokenizer=tok)
  with warnings.catch_warnings():  # it reads config.json generically: "rope_scaling is deprecated"
    warnings.simplefilter("ignore", FutureWarning)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
  assert hf_tok("hello world", add_special_tokens=False)["input_ids"] == [3, 4]
  assert hf_tok.eos_token_id == EOS


# ----------------------------------------------------------------------------- external loaders
def test_check_nemotron_nas_config():
  B = BlockSpec
  clean = Arch(vocab_size=V, hidden_size=384, num_heads=4, head_dim=96, blocks=(
      B(AttnSpec("gqa", num_kv_heads=2, window=64), FFNSpec("swiglu", 512)),
      B(AttnSpec("linear"), FFNSpec("swiglu", 1024)),
      B(AttnSpec("noop"), FFNSpec("linear")),
      B(AttnSpec("gqa", num_kv_heads=4), FFNSpec("noop")),
  ), rope=RopeSpec(theta=500000.0, rope_type="llama3", factor=8.0))
  assert ex.check_nemotron_nas_config(hf_config.arch_to_hf(clean)) == []

  odd = clean.replace_block(1, ffn=FFNSpec("swiglu", 640))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    problems = ex.check_nemotron_nas_config(hf_config.arch_to_hf(odd))
  assert len(problems) == 1 and "block_configs[1]" in problems[0] and "640" in problems[0], problems

  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    problems = ex.check_nemotron_nas_config(hf_config.arch_to_hf(hetero_child()))
  assert any("parallel_group" in p for p in problems)

  cfg = hf_config.arch_to_hf(clean)
  del cfg["rope_theta"], cfg["block_configs"][0]["attention"]["n_heads_in_group"]
  cfg["block_configs"][3]["attention"]["n_heads_in_group"] = 3
  problems = ex.check_nemotron_nas_config(cfg)
  assert any("rope_theta" in p for p in problems)
  assert any("block_configs[0]: attention.n_heads_in_group is missing" in p for p in problems)
  assert any("block_configs[3]" in p and "divisor" in p for p in problems)


# ----------------------------------------------------------------------------- bad inputs
def test_nan_weight_is_refused(tmp_path):
  arch = llama_arch()
  params = random_params(arch)
  params["model"]["layers"][1]["mlp"]["up_proj"]["weight"][3, 5] = np.nan
  with pytest.raises(ex.ExportError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
    ex.export(arch, params, tmp_path / "m")
  assert list(tmp_path.iterdir()) == []  # nothing half-written left behind


def test_overflow_in_target_dtype_is_refused(tmp_path):
  arch = llama_arch()
  params = random_params(arch)
  params["model"]["norm"]["weight"][0] = 1e6
  with pytest.raises(ex.ExportError, match=r"model\.norm\.weight.*float16"):
    ex.export(arch, params, tmp_path / "m", dtype="float16")


def test_missing_and_misshaped_tensors_are_refused(tmp_path):
  arch = hetero_child()
  params = random_params(arch)
  del params["model"]["layers"][2]["self_attn"]["linear_attn"]
  with pytest.raises(ex.ExportError, match=r"model\.layers\.2\.self_attn\.linear_attn\.weight"):
    ex.export(arch, params, tmp_path / "m")
  params = random_params(arch)
  params["model"]["layers"][0]["mlp"]["up_proj"]["weight"] = jnp.zeros((128, 64))
  with pytest.raises(ex.ExportError, match=r"model\.layers\.0\.mlp\.up_proj\.weight.*\(256, 64\)"):
    ex.export(arch, params, tmp_path / "m")
  params = random_params(arch)
  params["model"]["layers"][3]["mlp"] = {"up_proj": {"weight": jnp.zeros((8, 64))}}
  with pytest.raises(ex.ExportError, match=r"model\.layers\.3\.mlp\.up_proj\.weight"):
    ex.export(arch, params, tmp_path / "m")
  assert list(tmp_path.iterdir()) == []


def test_inexpressible_archs_are_refused(tmp_path):
  base = llama_arch()
  params = random_params(base)
  moe = base.replace_block(0, ffn=FFNSpec("moe", 64, num_experts=4, top_k=2))
  with pytest.raises(ArchError, match="MoE"):
    ex.export(moe, params, tmp_path / "m")
  sinks = base.replace_block(1, attn=AttnSpec("gqa", num_kv_heads=2, num_sink_tokens=4))
  with pytest.raises(ArchError, match="sinks"):
    ex.export(sinks, params, tmp_path / "m")
  with pytest.raises(ValueError, match="dtype"):
    ex.export(base, params, tmp_path / "m", dtype="int4")
  assert list(tmp_path.iterdir()) == []
