"""Tensor-parallel fused FFN on 8 fake CPU devices (conftest) vs one device: same output, one all-reduce
per fused run where its members in sequence would issue one each."""

import jax
import numpy as np
import pytest

from puzzle_jax.core import model
from puzzle_jax.core.arch import ArchError, AttnSpec, FFNSpec, fuse_ffn_run, uniform_arch
from puzzle_jax.fusion import tp


def test_fused_ffn_tp_matches_one_device_with_one_psum():
  assert len(jax.devices()) == 8, "conftest sets 8 fake CPU devices"
  arch = uniform_arch(vocab_size=31, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2,
                      intermediate_size=128)
  for i in (0, 1, 2):
    arch = arch.replace_block(i, attn=AttnSpec("noop"))
  params = model.init_params(jax.random.PRNGKey(0), arch)
  run = [0, 1, 2]
  fa, fp = fuse_ffn_run(arch, run), model.fuse_ffn_params(arch, params, run)
  spec, p = fa.blocks[0].ffn, fp["model"]["layers"][0]
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 64))
  members = sum(model.ffn_apply(params["model"]["layers"][i], x, arch.blocks[i].ffn, arch) for i in run)
  mesh8 = jax.make_mesh((8,), ("model",))
  mesh1 = jax.make_mesh((1,), ("model",), devices=jax.devices()[:1])
  fused8 = jax.jit(lambda p, x: tp.ffn_apply_tp(p, x, spec, fa, mesh8))
  got8, got1 = fused8(p, x), tp.ffn_apply_tp(p, x, spec, fa, mesh1)
  np.testing.assert_allclose(got8, got1, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got8, members, rtol=1e-5, atol=1e-5)
  assert tp.count_all_reduces(fused8, p, x) == 1

  def sequential(ps, x):  # the members as separate TP FFNs: one all-reduce each
    return sum(tp.ffn_apply_tp(ps[k], x, arch.blocks[i].ffn, arch, mesh8) for k, i in enumerate(run))
  ps = [params["model"]["layers"][i] for i in run]
  np.testing.assert_allclose(jax.jit(sequential)(ps, x), members, rtol=1e-5, atol=1e-5)
  assert tp.count_all_reduces(sequential, ps, x) == 3
  with pytest.raises(ArchError, match="divides"):
    tp.ffn_apply_tp(p, x, FFNSpec("swiglu", 100), fa, mesh8)
