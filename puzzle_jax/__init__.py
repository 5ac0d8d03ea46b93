"""puzzle_jax: Puzzle-style post-training architecture search in JAX.

Stable public API: `load_pretrained(path) -> (arch, params)`, `forward(arch, params, tokens)`,
`Arch` (`from_hf_config`, `to_hf_config`, `num_params`), `save_checkpoint`,
`load_checkpoint`; HF export is `puzzle_jax.export.export(arch, params, out_dir)`.
"""

from puzzle_jax.core import arch as arch_lib
from puzzle_jax import io
from puzzle_jax.core import model
from puzzle_jax.core.arch import Arch, AttnSpec, BlockSpec, FFNSpec
from puzzle_jax.io.checkpoint import load_checkpoint, load_pretrained, save_checkpoint
from puzzle_jax.core.model import forward, init_params


__all__ = ["Arch", "AttnSpec", "BlockSpec", "FFNSpec", "arch_lib", "forward",
           "init_params", "io", "load_checkpoint", "load_pretrained", "model", "save_checkpoint"]
