"""Replace-1-block scoring on the real parent (a 4-block slice of SmolLM2, real text)."""

import jax
import numpy as np
import pytest

from puzzle_jax.search import bld
from puzzle_jax.search import candidates as cands
from puzzle_jax.search import library as library_lib
from puzzle_jax.search import scoring


@pytest.fixture(scope="module")
def library(smollm2_small, real_tokens, tmp_path_factory):
  arch, params = smollm2_small
  lib = cands.build_library(arch, cands.LibraryConfig(ffn_fractions=(0.5,)))
  cfg = bld.BLDConfig(steps=2, batch_size=2, seq_len=64, warmup_steps=1, checkpoint_every=2)
  wd = tmp_path_factory.mktemp("bld")
  mesh = bld.make_mesh((("candidate", 1), ("data", 1)), jax.devices()[:1])
  groups, trained = bld.train(arch, params, lib, cfg, bld.ArrayBatches(real_tokens[:4, :64], 2),
                              [real_tokens[:2, :64]], wd, mesh=mesh, key=jax.random.PRNGKey(0), progress=False)
  library_lib.save_library(wd / "lib", arch, lib, groups, trained, bld.evaluate(arch, params, groups, trained, [real_tokens[12:14, :64]]), cfg)
  return library_lib.load_library(wd / "lib")


@pytest.fixture(scope="module")
def scores(smollm2_small, library, real_tokens):
  arch, params = smollm2_small
  return scoring.Scorer(arch, params, scoring.ScoreConfig(batch_size=2, candidate_chunk=3)).score(
      library, real_tokens[14:16, :64], progress=False)


def test_parent_subblocks_score_zero(smollm2_small, library, scores):
  arch, _ = smollm2_small
  for c in library.candidates:
    if cands.is_parent(arch, c):
      assert abs(scores[c.id]["kl"]) < 1e-5 and scores[c.id]["top1"] == 1.0, c.id
      assert abs(scores[c.id]["lm_loss_delta"]) < 1e-5


def test_noop_worse_than_parent_on_average(library, scores):
  noop = [scores[c.id]["kl"] for c in library.candidates if c.spec.kind == "noop"]
  assert np.mean(noop) > 0.01 and min(noop) > 0


def test_score_equals_explicit_child_forward(smollm2_small, library, scores, real_tokens):
  """The fast path (parent once to layer i, vmapped tail) equals building the child and running it."""
  from puzzle_jax.search.evaluate import Reference
  from puzzle_jax.search.realize import parent_choices, realize
  arch, params = smollm2_small
  ref = Reference(arch, params, real_tokens[14:16, :64], batch_size=2)
  for cid in ("L001/attn/gqa_kv1", "L002/ffn/swiglu_768", "L003/attn/linear", "L000/ffn/noop"):
    c = next(c for c in library.candidates if c.id == cid)
    choices = parent_choices(arch)
    choices[c.layer] = (c.key, choices[c.layer][1]) if c.sub == "attn" else (choices[c.layer][0], c.key)
    child_arch, child_params = realize(library, params, choices)
    m = ref.evaluate(child_arch, child_params)
    np.testing.assert_allclose(m["kl"], scores[cid]["kl"], rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(m["top1"], scores[cid]["top1"], atol=1e-9)


def test_heatmap_written(library, scores, tmp_path):
  scoring.plot_heatmap(scores, library, tmp_path / "h.png")
  assert (tmp_path / "h.png").stat().st_size > 1000
