"""Shared tiny test architectures (imported by several test modules)."""

from puzzle_jax.core.arch import Arch, AttnSpec, BlockSpec, FFNSpec, RopeSpec

VOCAB = 97
EOS = 2


def hetero_child(tie: bool = False) -> Arch:
  """Every sub-block kind: mixed KV heads, a window, linear and no-op attention, mixed FFN widths,
  linear and no-op FFN, a fully no-op block, a 2-block parallel group, llama3 RoPE scaling."""
  B = BlockSpec
  blocks = (
      B(AttnSpec("gqa", num_kv_heads=4), FFNSpec("swiglu", 256)),
      B(AttnSpec("gqa", num_kv_heads=2, window=4), FFNSpec("swiglu", 128)),
      B(AttnSpec("linear"), FFNSpec("linear")),
      B(AttnSpec("noop"), FFNSpec("noop")),
      B(AttnSpec("gqa", num_kv_heads=1), FFNSpec("swiglu", 256), parallel_group=0),
      B(AttnSpec("noop"), FFNSpec("swiglu", 128), parallel_group=0),
      B(AttnSpec("gqa", num_kv_heads=2), FFNSpec("noop")),
  )
  rope = RopeSpec(theta=10000.0, rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                  high_freq_factor=4.0, original_max_position=16)
  return Arch(vocab_size=VOCAB, hidden_size=64, num_heads=4, head_dim=16, blocks=blocks, rope=rope,
              tie_embeddings=tie, bos_token_id=1, eos_token_id=EOS)


def random_params(arch: Arch, seed: int = 0) -> dict:
  """init_params' tree drawn in numpy (much faster than jax.random on CPU): matrices
  N(0, 1/fan_in), norm weights 1 + N(0, 0.1^2) so the norms matter."""
  import jax
  import numpy as np
  from puzzle_jax.core import model
  rng = np.random.RandomState(seed)
  abstract = jax.eval_shape(lambda: model.init_params(jax.random.PRNGKey(0), arch))

  def draw(x):
    if len(x.shape) == 1:
      return np.asarray(1 + 0.1 * rng.randn(*x.shape), np.float32)
    return np.asarray(rng.randn(*x.shape) / np.sqrt(x.shape[1]), np.float32)
  return jax.tree_util.tree_map(draw, abstract)
