"""The sparse-upcycled SmolLM2 MoE test bed and heterogeneous expert pruning on real text."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from puzzle_jax.core import model
from puzzle_jax.moe import fit, prune, upcycle

SETTINGS = upcycle.UpcycleSettings(num_experts=8, top_k=4, fit=fit.FitSettings(steps=25, lr=3e-3, batch_tokens=192))


@pytest.fixture(scope="module")
def moe_parent(smollm2_small, real_tokens):
  arch, params = smollm2_small
  m_arch, m_params, report = upcycle.upcycle(arch, params, [real_tokens[:2, :96]], SETTINGS)
  return m_arch, m_params, report


def test_upcycle_is_exact_with_all_experts_and_trains_router(smollm2_small, real_tokens, moe_parent):
  arch, params = smollm2_small
  held = real_tokens[12:14, :64]
  ref = prune.forward(arch, params, held)
  # top_k = E with a zero router: uniform weights, every channel group -> the dense FFN.
  full_arch, full_params = upcycle.upcycle_init(arch, params, upcycle.UpcycleSettings(8, 8), {i: 10.0 for i in range(4)})
  assert all(b.attn.sinks and b.ffn.kind == "moe" for b in full_arch.blocks)
  assert prune.kl(ref, prune.forward(full_arch, full_params, held)) < 1e-4
  m_arch, m_params, report = moe_parent
  assert all(r["nmse_fit"] < r["nmse_init"] for r in report.values()), report
  kl = prune.kl(ref, prune.forward(m_arch, m_params, held))
  print(f"upcycled top-4-of-8 MoE: KL to the dense parent {kl:.3f}; router BLD {report}")
  assert np.isfinite(kl)


def test_pruning_all_experts_is_identity_and_bld_helps(moe_parent, real_tokens):
  arch, params, _ = moe_parent
  calib, held = [real_tokens[4:6, :64]], real_tokens[12:14, :48]
  stats = prune.layer_stats(arch, params, calib)
  assert set(stats) == {0, 1, 2, 3}
  np.testing.assert_allclose(stats[0]["frequency"].sum(), arch.blocks[0].ffn.top_k, rtol=1e-5)
  np.testing.assert_allclose(stats[0]["weight"].sum(), 1.0, rtol=1e-5)
  ref = prune.forward(arch, params, held)
  same_arch, same = prune.prune_layer(arch, params, 1, stats[1]["contribution"], 8)
  np.testing.assert_array_equal(np.asarray(prune.forward(same_arch, same, held)), np.asarray(ref))
  half_arch, half = prune.prune_layer(arch, params, 1, stats[1]["contribution"], 4)
  assert half_arch.blocks[1].ffn.num_experts == 4 and half["model"]["layers"][1]["mlp"]["router"]["weight"].shape[0] == 4
  trained, r = prune.bld_pruned(arch, params, 1, half["model"]["layers"][1]["mlp"], 4, calib,
                                fit.FitSettings(steps=15, lr=1e-3, batch_tokens=128))
  assert r["nmse_bld"] < r["nmse_init"], r
  ranks = prune.rank_by_kl(arch, params, {1: stats[1]}, 0.5, held)
  print(f"replace-1-block KL at E'=E/2 by importance signal: {ranks}")
  assert set(ranks) == set(prune.SIGNALS) and all(v > 0 for v in ranks.values())


def test_expert_counts_respect_ep_size():
  assert prune.expert_counts(32, (1, 0.75, 0.5, 0.25)) == [32, 24, 16, 8]
  assert prune.expert_counts(32, (1, 0.75, 0.5, 0.3), multiple=8) == [32, 24, 16, 8]
  assert all(n % 8 == 0 for n in prune.expert_counts(40, (1, 0.7, 0.45, 0.1), multiple=8))
