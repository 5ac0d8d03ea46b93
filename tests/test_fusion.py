"""FFN Fusion and block parallelism in the model core, serving-engine rules, engine-layout export.

A fused run (one wide SwiGLU + no-op placeholders) must equal its members run in parallel from the
same input, in JAX and through the exported PyTorch modeling code.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from puzzle_jax.core import model
from puzzle_jax.core.arch import (Arch, ArchError, AttnSpec, BlockSpec, FFNSpec, fuse_ffn_run,
                                  parallel_arch, uniform_arch)
from puzzle_jax.export import engines
from archs import random_params

V = 97


def ffn_run_arch(widths=(256, 512, 256), hidden=64) -> Arch:
  """Full block, a run of FFN-only blocks of `widths`, full block."""
  B = BlockSpec
  full = B(AttnSpec("gqa", num_kv_heads=2), FFNSpec("swiglu", 256))
  run = tuple(B(AttnSpec("noop"), FFNSpec("swiglu", w)) for w in widths)
  return Arch(vocab_size=V, hidden_size=hidden, num_heads=4, head_dim=16, blocks=(full, *run, full),
              bos_token_id=1, eos_token_id=2)


@pytest.fixture(scope="module")
def setup():
  arch = ffn_run_arch()
  params = jax.tree_util.tree_map(jnp.asarray, random_params(arch))  # non-unit norms: folding matters
  tokens = jnp.asarray(np.random.RandomState(0).randint(3, V, size=(2, 10)))
  return arch, params, tokens


def test_fused_ffn_equals_sum_of_members(setup):
  arch, params, _ = setup
  run = [1, 2, 3]
  fused_arch = fuse_ffn_run(arch, run)
  fused = model.fuse_ffn_params(arch, params, run)
  assert fused_arch.blocks[1].ffn.intermediate_size == 1024
  assert [b.ffn.kind for b in fused_arch.blocks[2:4]] == ["noop", "noop"]
  assert fused["model"]["layers"][2] == {} and model.count_params(fused) < model.count_params(params)
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 7, arch.hidden_size))
  layers = params["model"]["layers"]
  members = sum(model.ffn_apply(layers[i], x, arch.blocks[i].ffn, arch) for i in run)
  got = model.ffn_apply(fused["model"]["layers"][1], x, fused_arch.blocks[1].ffn, fused_arch)
  np.testing.assert_allclose(got, members, rtol=1e-5, atol=1e-5)


def test_fused_forward_equals_parallel_and_differs_from_sequential(setup):
  arch, params, tokens = setup
  par = parallel_arch(arch, [1, 2, 3])
  fused_arch, fused = model.fuse_parallel_ffns(par, params)
  assert fused_arch == fuse_ffn_run(arch, [1, 2, 3])
  want = model.forward(par, params, tokens)
  np.testing.assert_allclose(model.forward(fused_arch, fused, tokens), want, rtol=1e-5, atol=1e-5)
  assert not np.allclose(model.forward(arch, params, tokens), want, atol=1e-4)  # fusion changes the model


def test_fusion_refuses_blocks_with_attention(setup):
  arch, _, _ = setup
  with pytest.raises(ArchError, match=r"layers \[0\] are not FFN-only"):
    fuse_ffn_run(arch, [0, 1])
  with pytest.raises(ArchError, match="consecutive"):
    fuse_ffn_run(arch, [1, 3])
  with pytest.raises(ArchError, match="already belong"):
    parallel_arch(parallel_arch(arch, [0, 1]), [1, 2])


def test_whole_block_parallelism_reads_one_input(setup):
  arch, params, tokens = setup
  par = parallel_arch(arch, [3, 4])  # an FFN-only block beside a full block
  seen = {}
  out = model.forward(par, params, tokens, hook=lambda i, h, a, mid, f: seen.setdefault(i, (h, a + f)))
  np.testing.assert_array_equal(seen[3][0], seen[4][0])
  # Reference: h4_out = h3_in + delta3(h3_in) + delta4(h3_in), by hand through block_apply.
  ctx = model.forward_ctx(arch, tokens)
  h = model.embed(params, tokens)
  layers = params["model"]["layers"]
  for i in range(3):
    a, mid, f, _ = model.block_apply(layers[i], h, i, arch, ctx, None)
    h = mid + f
  d = sum(sum(model.block_apply(layers[i], h, i, arch, ctx, None)[j] for j in (0, 2)) for i in (3, 4))
  np.testing.assert_allclose(out, model.lm_head(arch, params, h + d), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- engines
def test_engine_rules_per_variant():
  H = 576
  assert engines.loadable(AttnSpec("linear"), "trtllm", H) and not engines.loadable(AttnSpec("linear"), "vllm", H)
  assert not engines.loadable(FFNSpec("linear"), "vllm", H)
  assert not engines.loadable(AttnSpec("gqa", num_kv_heads=1, window=128), "vllm", H)
  for engine in ("vllm", "trtllm"):
    assert engines.loadable(FFNSpec("swiglu", 1536), engine, H)  # SmolLM2's width: ffn_mult 4.0
    assert not engines.loadable(FFNSpec("swiglu", 384), engine, H)  # loads as 512 there
  assert all(engines.loadable(s, "transformers", H) for s in (AttnSpec("linear"), FFNSpec("swiglu", 384)))
  with pytest.raises(ValueError, match="unknown"):
    engines.rules("sglang")


def test_vllm_export_refuses_naming_layers(tmp_path):
  from puzzle_jax import export as ex
  arch = ffn_run_arch().replace_block(0, attn=AttnSpec("linear")).replace_block(4, ffn=FFNSpec("swiglu", 384))
  arch = parallel_arch(arch, [0, 1])  # whole-block parallelism: not fusable
  with pytest.raises(engines.EngineError) as e:
    ex.export_config(arch, tmp_path / "x", engine="vllm")
  msg = str(e.value)
  assert "layer 0 (linear)" in msg and "layer 4 (swiglu 384)" in msg and "layers [0, 1]" in msg
  assert not (tmp_path / "x").exists()


def test_mip_forbids_what_the_engine_cannot_load():
  from puzzle_jax.search import mip, select
  layers = mip.random_layers(0, 4)
  named = [mip.LayerOptions(
      attn=tuple(mip.Option(k, o.score, o.costs) for k, o in zip(("attn/gqa_kv3", "attn/linear", "attn/noop"), lo.attn)),
      ffn=tuple(mip.Option(k, o.score, o.costs) for k, o in zip(("ffn/swiglu_1536", "ffn/swiglu_384", "ffn/linear"), lo.ffn)))
      for lo in layers]
  forb = select.engine_forbidden(named, "vllm", 576)
  assert forb[(0, "attn")] == ["attn/linear"] and forb[(2, "ffn")] == ["ffn/swiglu_384", "ffn/linear"]
  assert select.engine_forbidden(named, "transformers", 576) == {}
  sol = mip.solve(named, {}, forbidden=forb)
  assert all(a != "attn/linear" and f in ("ffn/swiglu_1536",) for a, f in sol.choices)


@pytest.mark.usefixtures("one_torch_thread")
def test_engine_export_writes_253b_layout_and_matches_in_pytorch(setup, tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from puzzle_jax import export as ex
  arch, params, tokens = setup
  par = parallel_arch(arch, [1, 2, 3])
  out = ex.export(par, params, tmp_path / "vllm", dtype="float32", engine="vllm")
  cfg = json.loads((out / "config.json").read_text())
  assert ex.check_engine_config(cfg, "vllm") == []
  blocks = cfg["block_configs"]
  assert all("parallel_group" not in b for b in blocks)
  assert blocks[1]["ffn"]["ffn_mult"] == pytest.approx(1024 * 3 / (2 * 64))  # one wide FFN
  assert all(b["attention"]["no_op"] and b["ffn"]["no_op"] for b in blocks[2:4])  # placeholders
  m = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
  with torch.no_grad():
    got = m(torch.tensor(np.asarray(tokens))).logits.numpy()
  want = np.asarray(model.forward(par, params, tokens))  # the unfused parallel members
  assert np.abs(got - want).max() / np.abs(want).max() < 1e-4
  # The parallel (unfused) export for transformers keeps parallel_group, and a vLLM check flags it.
  cfg_t = json.loads((ex.export(par, params, tmp_path / "tf", dtype="float32") / "config.json").read_text())
  assert any("parallel_group" in p for p in ex.check_engine_config(cfg_t, "vllm"))
  assert ex.check_engine_config(cfg_t, "transformers") == []


def test_config_validation_names_engine_and_fusion_keys():
  from conftest import tiny_config
  from puzzle_jax import stages
  c = tiny_config("/tmp/unused")
  c.export.engine, c.fusion.max_run, c.fusion.threshold = "sglang", 0, -1.0
  errors = "\n".join(stages.validate(c))
  assert "export.engine='sglang'" in errors and "fusion.max_run=0" in errors and "fusion.threshold=-1.0" in errors
