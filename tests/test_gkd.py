"""GKD: loss terms against numpy, sharded == one device, kill-and-resume, and on the real parent
slice a short GKD lowers the child's held-out KL to the parent and its perplexity."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from puzzle_jax import training
from puzzle_jax.core import model
from puzzle_jax.core.arch import BlockSpec, spec_from_key, uniform_arch
from puzzle_jax.distill import gkd
from test_bld import _DiesAfter, _Killed  # batches that die mid-run, as in BLD's resume test

ARCH = uniform_arch(vocab_size=128, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2,
                    intermediate_size=64)
CFG = gkd.GKDConfig(steps=4, batch_size=8, seq_len=16, lr=3e-3, warmup_steps=1, checkpoint_every=2,
                    kl_weight=1.0, lm_weight=0.5, hidden_weight=0.5, hidden_loss="nmse", top_k=16,
                    temperature=2.0, compute_dtype="float32")


def drop(arch, params, layer: int, sub: str):
  """A child: one sub-block of the parent replaced by a no-op (its params removed)."""
  b = arch.blocks[layer]
  noop = spec_from_key(f"{sub}/noop")
  blocks = list(arch.blocks)
  blocks[layer] = BlockSpec(noop, b.ffn) if sub == "attn" else BlockSpec(b.attn, noop)
  keys = model.ATTN_KEYS if sub == "attn" else model.FFN_KEYS
  layers = list(params["model"]["layers"])
  layers[layer] = {k: v for k, v in layers[layer].items() if k not in keys}
  return dataclasses.replace(arch, blocks=tuple(blocks)), {**params, "model": {**params["model"], "layers": layers}}


@pytest.fixture(scope="module")
def setup():
  parent = model.init_params(jax.random.PRNGKey(0), ARCH)
  child_arch, child = drop(ARCH, parent, 1, "ffn")
  tokens = np.random.default_rng(0).integers(0, 128, (32, 16))
  return parent, child_arch, child, tokens


def _np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_loss_terms_match_numpy():
  rng = np.random.default_rng(0)
  t, s = rng.normal(size=(2, 5, 40)) * 3, rng.normal(size=(2, 5, 40)) * 3
  for temp, k in ((1.0, 0), (2.0, 0), (0.5, 7)):
    tl, sl = _np_log_softmax(t / temp), _np_log_softmax(s / temp)
    if k:  # the teacher's top k tokens and one bucket for the rest, in both distributions
      idx = np.argsort(-t, -1)[..., :k]
      coarse = lambda lp: np.log(np.concatenate([np.exp(np.take_along_axis(lp, idx, -1)),
                                                 1 - np.exp(np.take_along_axis(lp, idx, -1)).sum(-1, keepdims=True)], -1))
      tl, sl = coarse(tl), coarse(sl)
    want = (np.exp(tl) * (tl - sl)).sum(-1) * temp**2
    np.testing.assert_allclose(gkd.kl_per_token(t, s, temp, k), want, rtol=1e-4, atol=1e-6)
  full = gkd.kl_per_token(t, s, 1.0, 0)
  np.testing.assert_allclose(gkd.kl_per_token(t, s, 1.0, 40), full, rtol=1e-4, atol=1e-6)  # k = V
  assert np.all(gkd.kl_per_token(t, s, 1.0, 3) <= full + 1e-6)  # coarsening never adds divergence
  tokens = rng.integers(0, 40, (2, 5))
  want = -np.take_along_axis(_np_log_softmax(s[:, :-1]), tokens[:, 1:, None], -1)[..., 0]
  np.testing.assert_allclose(gkd.lm_per_token(s, tokens), want, rtol=1e-5)
  hs, ht = rng.normal(size=(3, 2, 5, 8)), rng.normal(size=(3, 2, 5, 8))
  cos = (hs * ht).sum(-1) / np.linalg.norm(hs, axis=-1) / np.linalg.norm(ht, axis=-1)
  np.testing.assert_allclose(gkd.hidden_distance(hs, ht, "cosine"), np.mean(1 - cos), rtol=1e-5)
  nmse = [((hs[i] - ht[i]) ** 2).sum() / (ht[i] ** 2).sum() for i in range(3)]
  np.testing.assert_allclose(gkd.hidden_distance(hs, ht, "nmse"), np.mean(nmse), rtol=1e-5)


def test_student_equal_to_teacher_has_zero_distillation_loss(setup):
  parent, _, _, tokens = setup
  logits, hidden = gkd.forward_hidden(ARCH, parent, jnp.asarray(tokens[:4]))
  _, m = gkd.gkd_loss(parent, logits, hidden, jnp.asarray(tokens[:4]), arch=ARCH, cfg=CFG)
  assert abs(float(m["kl"])) < 1e-5 and abs(float(m["hidden"])) < 1e-6 and float(m["lm"]) > 1.0


def test_bad_settings_raise(setup):
  with pytest.raises(ValueError, match="hidden_loss"):
    gkd.GKDConfig(hidden_loss="l1")
  with pytest.raises(ValueError, match="kl_weight=1.0"):
    gkd.GKDConfig(kl_weight=0.0)
  shallow = dataclasses.replace(ARCH, blocks=ARCH.blocks[:2])
  with pytest.raises(ValueError, match="hidden_weight=0"):
    gkd.check_aligned(shallow, ARCH, CFG)


def _train(setup, path, mesh, batches=None, cfg=CFG):
  parent, child_arch, child, tokens = setup
  batches = batches or training.ArrayBatches(tokens, cfg.batch_size)
  return gkd.train(child_arch, child, ARCH, parent, cfg, batches, path, mesh=mesh, progress=False)


def test_sharded_equals_single_device(setup, tmp_path):
  assert len(jax.devices()) == 8, "conftest sets 8 fake CPU devices"
  p8 = _train(setup, tmp_path / "a", training.make_mesh((("data", -1),)))
  p1 = _train(setup, tmp_path / "b", training.make_mesh((("data", 1),), jax.devices()[:1]))
  w = p8["model"]["layers"][0]["mlp"]["up_proj"]["weight"]
  assert "data" in w.sharding.spec and len(w.sharding.device_set) == 8
  l8, l1 = (training.read_log(tmp_path / d / "losses.jsonl") for d in "ab")
  assert len(l8) == len(l1) == CFG.steps
  for a, b in zip(l8, l1):
    for k in a["loss"]:
      np.testing.assert_allclose(a["loss"][k], b["loss"][k], rtol=2e-5, err_msg=k)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), p8, p1)


def test_kill_and_resume_matches_uninterrupted(setup, tmp_path):
  mesh = training.make_mesh((("data", 2),), jax.devices()[:2])
  ref = _train(setup, tmp_path / "ref", mesh)
  with pytest.raises(_Killed):  # dies in step 4, after the step-2 checkpoint
    _train(setup, tmp_path / "run", mesh, _DiesAfter(setup[3], CFG.batch_size, die_at=3))
  assert (tmp_path / "run" / "ckpt" / "2").exists() and not (tmp_path / "run" / "ckpt" / "4").exists()
  resumed = _train(setup, tmp_path / "run", mesh)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), ref, resumed)
  log = lambda d: training.read_log(tmp_path / d / "losses.jsonl")
  assert log("run") == log("ref") and [r["step"] for r in log("run")] == list(range(1, CFG.steps + 1))
  gkd.plot_losses(tmp_path / "run" / "losses.jsonl", tmp_path / "losses.png")
  assert (tmp_path / "losses.png").stat().st_size > 1000


def test_bf16_compute_keeps_float32_master_weights(setup):
  parent, child_arch, child, tokens = setup
  cfg = dataclasses.replace(CFG, compute_dtype="bfloat16")
  mesh = training.make_mesh((("data", 1),), jax.devices()[:1])
  opt = gkd.make_optimizer(cfg)
  state = gkd.init_state(child, opt)
  teacher = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), parent)
  step = gkd.compile_step(child_arch, ARCH, cfg, opt, mesh, state, teacher)
  state, m16 = step(state, teacher, tokens[:8])
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(state["params"]))
  step32 = gkd.compile_step(child_arch, ARCH, CFG, opt, mesh, gkd.init_state(child, opt), parent)
  _, m32 = step32(gkd.init_state(child, opt), parent, tokens[:8])
  np.testing.assert_allclose(float(m16["loss"]), float(m32["loss"]), rtol=3e-2)


def test_gkd_lowers_heldout_kl_and_perplexity(smollm2_parent, smollm2_small, real_tokens, tmp_path):
  """Teacher: the real 30-block SmolLM2. Child: its first 4 blocks (a depth-pruned child with the
  parent's weights, KL ~3 nats). A short GKD on 12 sequences lowers the child's KL to the parent
  and its perplexity on 4 held-out sequences."""
  from puzzle_jax.search.evaluate import Reference
  arch, params = smollm2_parent
  child_arch, child = smollm2_small
  train_toks, held = real_tokens[:12, :64], real_tokens[12:, :64]
  cfg = gkd.GKDConfig(steps=6, batch_size=4, seq_len=64, lr=1e-3, warmup_steps=1, checkpoint_every=6,
                      compute_dtype="float32")
  mesh = training.make_mesh((("data", 2),), jax.devices()[:2])
  trained = gkd.train(child_arch, child, arch, params, cfg, training.ArrayBatches(train_toks, 4),
                      tmp_path, mesh=mesh, progress=False)
  ref = Reference(arch, params, held, batch_size=4)
  before, after = ref.evaluate(child_arch, child), ref.evaluate(child_arch, jax.device_get(trained))
  print(gkd.summary(before, after))
  assert after["kl"] < 0.8 * before["kl"]
  assert after["ppl"] < 0.5 * before["ppl"]
