"""The functional model: heterogeneous forward, cached decoding == full forward, vmap, jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from puzzle_jax.core import model
from puzzle_jax.core.arch import AttnSpec, FFNSpec, RopeSpec, uniform_arch

BASE = uniform_arch(vocab_size=97, hidden_size=48, num_layers=8, num_heads=6, num_kv_heads=3,
                    intermediate_size=96, head_dim=16,
                    rope=RopeSpec(theta=5e5, rope_type="llama3", factor=8.0, original_max_position=16))


def hetero():
  a = BASE
  a = a.replace_block(1, attn=AttnSpec("gqa", num_kv_heads=1), ffn=FFNSpec("swiglu", 32))
  a = a.replace_block(2, attn=AttnSpec("linear"), ffn=FFNSpec("linear"))
  a = a.replace_block(3, attn=AttnSpec("noop"), ffn=FFNSpec("swiglu", 64))
  a = a.replace_block(4, attn=AttnSpec("gqa", num_kv_heads=6, window=3), ffn=FFNSpec("noop"))
  a = a.replace_block(5, attn=AttnSpec("noop"), ffn=FFNSpec("noop"))
  a = a.replace_block(6, attn=AttnSpec("gqa", num_kv_heads=2))
  return a


@pytest.fixture(scope="module")
def setup():
  arch = hetero()
  params = model.init_params(jax.random.PRNGKey(0), arch)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (3, 11), 0, arch.vocab_size)
  return arch, params, tokens


def test_param_count_equals_created_shapes(setup):
  arch, params, _ = setup
  assert model.count_params(params) == arch.num_params()
  assert params["model"]["layers"][5] == {}  # a fully no-op block owns no tensors
  assert "input_layernorm" not in params["model"]["layers"][3]  # no-op attention has no norm


@pytest.mark.parametrize("jit", [False, True])
def test_cached_decoding_equals_full_forward(setup, jit):
  arch, params, tokens = setup
  full = model.forward(arch, params, tokens)
  ext = jax.jit(model.extend, static_argnums=0) if jit else model.extend
  cache = model.init_cache(arch, tokens.shape[0], tokens.shape[1])
  assert [c is not None for c in cache["layers"]] == [b.attn.kind == "gqa" for b in arch.blocks]
  assert cache["layers"][1]["k"].shape[2] == 1 and cache["layers"][4]["k"].shape[2] == 6
  logits, cache = ext(arch, params, tokens[:, :4], cache)
  steps = [logits]
  for t in range(4, tokens.shape[1]):
    logits, cache = ext(arch, params, tokens[:, t:t + 1], cache)
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, rtol=1e-5, atol=1e-5)


def test_left_padding_matches_unpadded(setup):
  arch, params, tokens = setup
  pad = 3
  padded = jnp.concatenate([jnp.zeros((3, pad), tokens.dtype), tokens], axis=1)
  mask = jnp.concatenate([jnp.zeros((3, pad), bool), jnp.ones(tokens.shape, bool)], axis=1)
  np.testing.assert_allclose(model.forward(arch, params, padded, mask)[:, pad:],
                             model.forward(arch, params, tokens), rtol=1e-5, atol=1e-5)
  g_pad = model.generate(arch, params, padded, mask, max_new_tokens=6)
  g = model.generate(arch, params, tokens, max_new_tokens=6)
  np.testing.assert_array_equal(g_pad, g)


def test_causality(setup):
  arch, params, tokens = setup
  changed = tokens.at[:, 7].set((tokens[:, 7] + 1) % arch.vocab_size)
  a, b = model.forward(arch, params, tokens), model.forward(arch, params, changed)
  np.testing.assert_allclose(a[:, :7], b[:, :7], rtol=1e-6, atol=1e-6)
  assert not np.allclose(a[:, 7:], b[:, 7:])


def test_window_limits_context():
  arch = uniform_arch(vocab_size=50, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                      intermediate_size=64).replace_block(0, attn=AttnSpec("gqa", num_kv_heads=2, window=2))
  params = model.init_params(jax.random.PRNGKey(0), arch)
  t = jax.random.randint(jax.random.PRNGKey(1), (1, 8), 0, 50)
  changed = t.at[0, 0].set((t[0, 0] + 1) % 50)
  a, b = model.forward(arch, params, t), model.forward(arch, params, changed)
  assert not np.allclose(a[:, 1], b[:, 1])  # position 1 still sees token 0
  np.testing.assert_allclose(a[:, 2:], b[:, 2:], rtol=1e-6, atol=1e-6)  # window 2: it does not


def test_subblocks_vmap_over_stacked_params():
  arch = BASE
  spec = FFNSpec("swiglu", 32)
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  stacked = jax.vmap(lambda k: model.ffn_init(k, spec, arch))(keys)
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 2, 5, arch.hidden_size))
  out = jax.jit(jax.vmap(lambda p, h: model.ffn_apply(p, h, spec, arch)))(stacked, x)
  for i in range(4):
    one = model.ffn_apply(jax.tree_util.tree_map(lambda a: a[i], stacked), x[i], spec, arch)
    np.testing.assert_allclose(out[i], one, rtol=1e-5, atol=1e-6)


def test_parallel_group_sums_deltas(setup):
  arch, params, tokens = setup
  import dataclasses
  blocks = list(arch.blocks)
  blocks[6] = dataclasses.replace(blocks[6], parallel_group=1)
  blocks[7] = dataclasses.replace(blocks[7], parallel_group=1)
  par = dataclasses.replace(arch, blocks=tuple(blocks))
  rec = {}
  model.forward(par, params, tokens, hook=lambda i, h, a, mid, f: rec.setdefault(i, (h, a + f)))
  np.testing.assert_array_equal(rec[6][0], rec[7][0])  # both read the same input


def test_sampling_reproducible(setup):
  arch, params, tokens = setup
  s1 = model.generate(arch, params, tokens, max_new_tokens=5, temperature=1.0, top_p=0.9, key=jax.random.PRNGKey(3))
  s2 = model.generate(arch, params, tokens, max_new_tokens=5, temperature=1.0, top_p=0.9, key=jax.random.PRNGKey(3))
  s3 = model.generate(arch, params, tokens, max_new_tokens=5, temperature=1.0, top_p=0.9, key=jax.random.PRNGKey(4))
  np.testing.assert_array_equal(s1, s2)
  assert not np.array_equal(s1, s3)


def test_stop_tokens_repeat_after_stop(setup):
  arch, params, tokens = setup
  free = np.asarray(model.generate(arch, params, tokens, max_new_tokens=6))
  stop = int(free[0, 1])
  out = np.asarray(model.generate(arch, params, tokens, max_new_tokens=6, stop_tokens=(stop,)))
  first = list(out[0]).index(stop)
  assert first <= 1 and all(t == stop for t in out[0, first:])
