"""Fusion-aware MIP vs brute force; "fuse after"; penalties measured on a real model slice."""

import numpy as np
import pytest

from puzzle_jax.fusion import search as FS
from puzzle_jax.search import mip

PARENT_FFN = "ffn/swiglu_64"


def problem(seed: int, n_layers: int = 4):
  rng = np.random.default_rng(seed)
  layers = []
  for _ in range(n_layers):
    attn = (mip.Option("attn/gqa_kv2", 0.0, {"decode_s": 3.0}), mip.Option("attn/noop", rng.uniform(0.1, 1), {"decode_s": 0.0}))
    ffn = (mip.Option(PARENT_FFN, 0.0, {"decode_s": 2.0}), mip.Option("ffn/swiglu_32", rng.uniform(0.1, 1), {"decode_s": 1.2}),
           mip.Option("ffn/noop", rng.uniform(0.5, 2), {"decode_s": 0.0}))
    layers.append(mip.LayerOptions(attn, ffn))
  runs = [FS.FusionRun(r, float(rng.uniform(0, 0.3)), {"decode_s": float(0.4 * (len(r) - 1) + rng.uniform(0, 0.2))})
          for r in FS.candidate_runs(n_layers, 3, first=1)]
  return layers, runs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_joint_mip_equals_brute_force(seed):
  layers, runs = problem(seed)
  parent = 4 * 5.0
  for frac in (0.9, 0.7, 0.55, 0.4):
    b = {"decode_s": frac * parent}
    got = FS.solve_joint(layers, runs, b, PARENT_FFN)
    want = FS.brute_force_joint(layers, runs, b, PARENT_FFN)
    assert got.objective == pytest.approx(want.objective, abs=1e-9), (frac, got, want)
    assert got.totals["decode_s"] <= b["decode_s"] * (1 + 1e-9)
    for r in got.runs:
      assert all(got.choices[l] == ("attn/noop", PARENT_FFN) for l in r)


def test_joint_uses_fusion_savings_and_beats_fuse_after():
  layers, runs = problem(0)
  free = [FS.FusionRun(r.layers, 0.0, {"decode_s": 1.5 * (len(r.layers) - 1)}) for r in runs]
  plain = mip.solve(layers, {"decode_s": 0.6 * 20})
  fused = FS.fuse_after(plain.choices, free, PARENT_FFN, 3)
  obj_seq, tot_seq = FS.evaluate_joint(layers, free, plain.choices, fused)
  joint = FS.solve_joint(layers, free, {"decode_s": tot_seq["decode_s"]}, PARENT_FFN)
  assert joint.objective <= obj_seq + 1e-9  # same speed, never worse (the joint space contains it)
  assert FS.fuse_after([("attn/noop", PARENT_FFN)] * 4, runs, PARENT_FFN, 2) == \
      [i for i, r in enumerate(runs) if r.layers == (2, 3)]  # (0, 1) starts at layer 0: not a candidate


def test_run_penalties_on_real_slice(smollm2_small, real_tokens):
  import jax
  import jax.numpy as jnp
  from puzzle_jax.core import model
  arch, params = smollm2_small
  tokens = jnp.asarray(real_tokens[:2, :32])
  ref = jax.nn.log_softmax(model.forward(arch, params, tokens))

  def kl(a, p):
    lp = jax.nn.log_softmax(model.forward(a, p, tokens))
    return float(jnp.mean(jnp.sum(jnp.exp(ref) * (ref - lp), -1)))
  pen = FS.run_penalties(arch, params, [(1, 2), (2, 3)], kl)
  assert all(p > 0 for p in pen)  # parallel FFNs are a different model
  a, p = FS.drop_attention(arch, params, (1, 2))
  assert "self_attn" not in p["model"]["layers"][1] and a.blocks[1].attn.kind == "noop"
  sav = FS.run_savings({"ffn/swiglu_8": {"decode_s": 1.0, "prefill_s": 2.0},
                        "ffn/swiglu_16": {"decode_s": 1.5, "prefill_s": 3.5}}, [(1, 2)], 8)
  assert sav == [{"decode_s": 0.5, "prefill_s": 0.5}]


def test_healing_a_fused_run_lowers_its_error_and_kl(smollm2_small, real_tokens):
  import jax
  import jax.numpy as jnp
  from puzzle_jax.core import model
  from puzzle_jax.fusion import heal
  arch, params = smollm2_small
  a, p = FS.drop_attention(arch, params, (1, 2, 3))
  tokens = real_tokens[:4, :32]
  fa, fp, losses = heal.heal_fused(a, p, (1, 2, 3), tokens, heal.HealSettings(steps=8, lr=3e-4, batch_size=2))
  # The first step's loss is the exact concatenation's (== parallel members) error.
  h_in, h_out = heal.run_io(a, p, jnp.asarray(tokens[:2]), (1, 2, 3))
  unhealed = model.fuse_ffn_params(a, p, (1, 2, 3))["model"]["layers"][1]
  assert losses[0] == pytest.approx(float(heal._loss(unhealed, h_in, h_out, fa.blocks[1].ffn, fa)), rel=1e-4)
  assert losses[-1] < 0.9 * losses[0], losses
  ref = jax.nn.log_softmax(model.forward(a, p, jnp.asarray(tokens)))

  def kl(arch_, params_):
    lp = jax.nn.log_softmax(model.forward(arch_, params_, jnp.asarray(tokens)))
    return float(jnp.mean(jnp.sum(jnp.exp(ref) * (ref - lp), -1)))
  assert kl(fa, fp) < kl(fa, model.fuse_ffn_params(a, p, (1, 2, 3)))  # closer to the sequential run
