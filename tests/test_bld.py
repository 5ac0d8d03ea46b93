"""BLD: vmapped == sequential, sharded == single device, kill-and-resume, NaN guard."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from puzzle_jax.search import bld
from puzzle_jax.search import candidates as cands
from puzzle_jax.search import library as library_lib
from puzzle_jax.core import model
from puzzle_jax.core.arch import uniform_arch

ARCH = uniform_arch(vocab_size=128, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2,
                    intermediate_size=64)
LIB_CFG = cands.LibraryConfig(ffn_fractions=(0.5,), ffn_multiple=16)
CFG = bld.BLDConfig(steps=6, batch_size=4, seq_len=16, lr=1e-2, warmup_steps=1, checkpoint_every=3,
                    calib_batches=1)


@pytest.fixture(scope="module")
def setup():
  params = model.init_params(jax.random.PRNGKey(0), ARCH)
  tokens = np.random.default_rng(0).integers(0, 128, (16, 16))
  return params, tokens, cands.build_library(ARCH, LIB_CFG)


def _train(setup, tmp_path, mesh, batches=None):
  params, tokens, lib = setup
  batches = batches or bld.ArrayBatches(tokens, CFG.batch_size)
  return bld.train(ARCH, params, lib, CFG, batches, [tokens[:4]], tmp_path, mesh=mesh,
                   key=jax.random.PRNGKey(1), progress=False)


def test_library_contents(setup):
  _, _, lib = setup
  keys = {c.key for c in lib if c.layer == 0}
  assert keys == {"attn/gqa_kv2", "attn/gqa_kv1", "attn/linear", "attn/noop", "ffn/swiglu_64",
                  "ffn/swiglu_32", "ffn/linear", "ffn/noop"}
  trainable = {c.key for c in lib if c.layer == 0 and cands.is_trainable(ARCH, c)}
  assert trainable == {"attn/gqa_kv1", "attn/linear", "ffn/swiglu_32", "ffn/linear"}


def test_vmapped_step_equals_sequential(setup):
  params, tokens, lib = setup
  groups = bld.make_groups(ARCH, lib)
  opt = bld.make_optimizer(CFG)
  stats = bld.calibrate(ARCH, params, [tokens[:4]])
  init = bld.init_groups(ARCH, params, groups, CFG, stats, jax.random.PRNGKey(0))
  acts_fn = jax.jit(functools.partial(bld.teacher_acts, ARCH))
  for g in groups:
    p_C, o_C = init[g.name], jax.vmap(opt.init)(init[g.name])
    seq = [(cands.unstack(p_C, len(g.layers))[i], None) for i in range(len(g.layers))]
    seq = [(p, opt.init(p)) for p, _ in seq]
    vstep = jax.jit(functools.partial(bld.group_update, arch=ARCH, group=g, optimizer=opt))
    sstep = jax.jit(functools.partial(bld.candidate_update, arch=ARCH, sub=g.sub, spec=g.spec, optimizer=opt))
    for t in range(3):
      x_C, y_C = bld.group_io(acts_fn(params, jnp.asarray(tokens[4 * t: 4 * t + 4])), g)
      p_C, o_C, loss_C = vstep(p_C, o_C, x_C, y_C)
      out = [sstep(p, o, x_C[i], y_C[i]) for i, (p, o) in enumerate(seq)]
      seq = [(p, o) for p, o, _ in out]
      np.testing.assert_allclose(loss_C, [l for _, _, l in out], rtol=1e-5, atol=1e-7)
    for i, (p, _) in enumerate(seq):
      jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a[i], b, rtol=1e-4, atol=1e-5), p_C, p)


def test_sharded_equals_single_device(setup, tmp_path):
  assert len(jax.devices()) == 8, "conftest sets 8 fake CPU devices"
  mesh8 = bld.make_mesh((("candidate", -1), ("data", 1)))
  mesh1 = bld.make_mesh((("candidate", 1), ("data", 1)), jax.devices()[:1])
  mesh_cd = bld.make_mesh((("candidate", 4), ("data", 2)))
  g8, p8 = _train(setup, tmp_path / "a", mesh8)
  g1, p1 = _train(setup, tmp_path / "b", mesh1)
  g42, p42 = _train(setup, tmp_path / "c", mesh_cd)
  assert p8["attn__linear"]["self_attn"]["linear_attn"]["weight"].sharding.spec[0] == "candidate"
  for a, b, c in zip(g8, g1, g42):
    n = len(b.members)
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x[:n], y[:n], rtol=1e-4, atol=1e-5),
                           p8[a.name], p1[b.name])
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x[:n], y[:n], rtol=1e-4, atol=1e-5),
                           p42[c.name], p1[b.name])


class _Killed(Exception):
  pass


class _DiesAfter(bld.ArrayBatches):
  def __init__(self, *a, die_at, **kw):
    super().__init__(*a, **kw)
    self.die_at = die_at

  def __next__(self):
    if self.pos == self.die_at:
      raise _Killed()
    return super().__next__()


def test_kill_and_resume_matches_uninterrupted(setup, tmp_path):
  mesh = bld.make_mesh((("candidate", 1), ("data", 1)), jax.devices()[:1])
  _, tokens, _ = setup
  groups, ref = _train(setup, tmp_path / "ref", mesh)
  with pytest.raises(_Killed):  # dies in step 5, after the step-3 checkpoint
    _train(setup, tmp_path / "run", mesh, _DiesAfter(tokens, CFG.batch_size, die_at=4))
  assert (tmp_path / "run" / "ckpt" / "3").exists()
  _, resumed = _train(setup, tmp_path / "run", mesh)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), ref, resumed)
  log = lambda d: [json.loads(l) for l in (tmp_path / d / "losses.jsonl").read_text().splitlines()]
  assert [r["step"] for r in log("run")] == list(range(1, CFG.steps + 1))
  assert log("run") == log("ref")


def test_truncated_newest_checkpoint_falls_back_to_the_one_before(setup, tmp_path, capsys):
  import shutil
  mesh = bld.make_mesh((("candidate", 1), ("data", 1)), jax.devices()[:1])
  _, ref = _train(setup, tmp_path / "ref", mesh)  # checkpoints at steps 3 and 6
  shutil.copytree(tmp_path / "ref", tmp_path / "run")
  newest = max((f for f in (tmp_path / "run" / "ckpt" / "6").rglob("*") if f.is_file()),
               key=lambda f: f.stat().st_size)
  newest.write_bytes(newest.read_bytes()[:newest.stat().st_size // 2])
  _, resumed = _train(setup, tmp_path / "run", mesh)  # restores step 3, trains 4..6 again
  assert "checkpoint step 6 is unreadable" in capsys.readouterr().out
  assert list((tmp_path / "run" / "ckpt_corrupt").iterdir())  # moved aside, not deleted
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), ref, resumed)


def test_nan_in_teacher_raises_clear_error(setup, tmp_path):
  params, tokens, lib = setup
  bad = jax.tree_util.tree_map(lambda x: x, params)
  bad["model"]["layers"][1]["mlp"]["up_proj"]["weight"] = params["model"]["layers"][1]["mlp"]["up_proj"]["weight"].at[0, 0].set(jnp.nan)
  mesh = bld.make_mesh((("candidate", 1), ("data", 1)), jax.devices()[:1])
  with pytest.raises(FloatingPointError, match="NaN/Inf at step"):
    bld.train(ARCH, bad, lib, dataclasses_replace(CFG, init="random"), bld.ArrayBatches(tokens, 4), [],
              tmp_path, mesh=mesh, key=jax.random.PRNGKey(0), progress=False)


def dataclasses_replace(cfg, **kw):
  import dataclasses
  return dataclasses.replace(cfg, **kw)


def test_library_roundtrip_and_params(setup, tmp_path):
  params, tokens, lib = setup
  mesh = bld.make_mesh((("candidate", 1), ("data", 1)), jax.devices()[:1])
  groups, trained = _train(setup, tmp_path, mesh)
  losses = bld.evaluate(ARCH, params, groups, trained, [tokens[:4]])
  library_lib.save_library(tmp_path / "library", ARCH, lib, groups, trained, losses, CFG)
  loaded = library_lib.load_library(tmp_path / "library")
  assert loaded.arch == ARCH and loaded.candidates == lib
  for c in lib:
    p = loaded.params(c, params)
    if c.spec.kind == "noop":
      assert p == {} and loaded.bld_loss[c.id] == 1.0
    elif cands.is_parent(ARCH, c):
      assert loaded.bld_loss[c.id] == 0.0
    else:
      assert np.isclose(loaded.bld_loss[c.id], losses[c.id])
      # params evaluate to the same candidate output as the stacked ones
      x = jnp.ones((1, 4, 32))
      g, row = loaded.rows[c.id]
      ref = jax.tree_util.tree_map(lambda a: a[row], trained[g])
      np.testing.assert_allclose(cands.apply_candidate(ARCH, c.sub, c.spec, p, x),
                                 cands.apply_candidate(ARCH, c.sub, c.spec, ref, x), rtol=1e-6)


def test_parent_inits_beat_random_and_short_bld_improves(smollm2_small, real_tokens, tmp_path):
  """On the real parent and real text: every parent-derived init starts below a random init of
  the same shape, and a short BLD lowers every trainable candidate's held-out loss further."""
  import dataclasses
  arch, params = smollm2_small
  lib = cands.build_library(arch, cands.LibraryConfig(ffn_fractions=(0.5,)))
  cfg = bld.BLDConfig(steps=8, batch_size=2, seq_len=128, lr=1e-3, warmup_steps=1, checkpoint_every=8)
  groups = bld.make_groups(arch, lib)
  held = [real_tokens[14:16]]
  calib = [real_tokens[i:i + 4] for i in range(0, 12, 4)]  # 1,536 tokens > hidden size: LS well posed
  stats = bld.calibrate(arch, params, calib)
  init = bld.evaluate(arch, params, groups, bld.init_groups(arch, params, groups, cfg, stats, None), held)
  rand = bld.evaluate(arch, params, groups, bld.init_groups(
      arch, params, groups, dataclasses.replace(cfg, init="random"), None, jax.random.PRNGKey(0)), held)
  assert set(init) == {c.id for c in lib if cands.is_trainable(arch, c)}
  for cid in init:
    assert init[cid] < rand[cid], (cid, init[cid], rand[cid])
  mesh = bld.make_mesh((("candidate", 1), ("data", 1)), jax.devices()[:1])
  groups, trained = bld.train(arch, params, lib, cfg, bld.ArrayBatches(real_tokens[:12], 2), calib,
                              tmp_path, mesh=mesh, key=jax.random.PRNGKey(0), progress=False)
  after = bld.evaluate(arch, params, groups, trained, held)
  for cid in init:
    if cid.endswith("/linear"):
      # The least-squares init is already the MSE optimum on the calibration text (the
      # training text here): BLD can only hold it, so it must not regress by more than 1%.
      assert after[cid] < 1.01 * init[cid], (cid, init[cid], after[cid])
    else:
      assert after[cid] < init[cid], (cid, init[cid], after[cid])
