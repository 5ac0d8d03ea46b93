"""Block dependency analysis on a constructed case with a known answer (the CLI stage on the real
parent is in test_fusion_experiments.py)."""

import jax.numpy as jnp
import numpy as np

from puzzle_jax.core import model
from puzzle_jax.core.arch import Arch, AttnSpec, BlockSpec, FFNSpec
from puzzle_jax.fusion import deps as D


def subspace_model():
  """4 linear-FFN-only blocks on D=16 split into 4 groups of 4 coordinates; block k reads group r_k
  and writes group w_k: (r, w) = (0, 0), (1, 1), (0, 2), (3, 3). Only block 2 reads what another
  block (0) writes. Removing a contribution a block does not read only rescales its input through
  the RMSNorm, and a linear map of a rescaled input points the same way: cosine distance 0."""
  import jax
  rw = [(0, 0), (1, 1), (0, 2), (3, 3)]
  blocks = tuple(BlockSpec(AttnSpec("noop"), FFNSpec("linear")) for _ in rw)
  arch = Arch(vocab_size=31, hidden_size=16, num_heads=2, head_dim=8, blocks=blocks)
  params = model.init_params(jax.random.PRNGKey(0), arch)
  rng = np.random.RandomState(0)
  for k, (r, w) in enumerate(rw):
    m = np.zeros((16, 16), np.float32)
    m[4 * w:4 * w + 4, 4 * r:4 * r + 4] = 2.0 * rng.randn(4, 4)
    params["model"]["layers"][k]["mlp"]["linear_mlp"]["weight"] = jnp.asarray(m)
  return arch, params


def test_dependency_matrix_on_disjoint_subspaces():
  arch, params = subspace_model()
  tokens = np.random.RandomState(1).randint(0, 31, size=(4, 9))
  dep = D.dependency_matrix(arch, params, tokens, D.DepsSettings(batch_size=2))
  assert np.isnan(dep[np.tril_indices(4)]).all()
  assert dep[0, 2] > 0.05, dep  # block 2 reads block 0's output
  others = [dep[i, j] for i in range(4) for j in range(i + 1, 4) if (i, j) != (0, 2)]
  assert max(others) < 1e-5, dep
  # Brute force for the dependent pair: delta_2 with and without delta_0 in its input, by hand.
  ins, ds = {}, {}
  model.forward(arch, params, jnp.asarray(tokens), hook=lambda i, h, a, mid, f: (ins.setdefault(i, h), ds.setdefault(i, f)))
  lyr = params["model"]["layers"][2]
  y0 = np.asarray(model.ffn_apply(lyr, ins[2], arch.blocks[2].ffn, arch))
  y1 = np.asarray(model.ffn_apply(lyr, ins[2] - ds[0], arch.blocks[2].ffn, arch))
  cos = (y0 * y1).sum(-1) / np.linalg.norm(y0, axis=-1) / np.linalg.norm(y1, axis=-1)
  np.testing.assert_allclose(dep[0, 2], np.mean(1 - cos), rtol=1e-4)
  assert D.propose_runs(dep, 1e-4, 8) == [[0, 1], [2, 3]]
  assert D.propose_runs(dep, 1e-4, 8, start=10, allowed=[True, True, True, False]) == [[10, 11]]
  assert D.propose_runs(dep, 2.0, 3) == [[0, 1, 2]]  # max_run caps (cosine distance <= 2)
