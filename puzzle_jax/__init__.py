"""puzzle_jax: Puzzle-style post-training architecture search in JAX.

Stable public API: `load_pretrained(path) -> (arch, params)`, `forward(arch, params, tokens)`,
`Arch` (`num_params`, `table`), `arch_from_hf(config_dict) -> Arch`, `arch_to_hf(arch) -> dict`
(HF config.json, from `puzzle_jax.core.hf_config`), `save_checkpoint`, `load_checkpoint`;
HF export is `puzzle_jax.export.export(arch, params, out_dir)`.
"""

from puzzle_jax.core import arch as arch_lib
from puzzle_jax import io
from puzzle_jax.core import model
from puzzle_jax.core.arch import Arch, AttnSpec, BlockSpec, FFNSpec
from puzzle_jax.core.hf_config import arch_from_hf, arch_to_hf
from puzzle_jax.io.checkpoint import load_checkpoint, load_pretrained, save_checkpoint
from puzzle_jax.core.model import forward, init_params


__all__ = ["Arch", "AttnSpec", "BlockSpec", "FFNSpec", "arch_from_hf", "arch_lib", "arch_to_hf", "forward",
           "init_params", "io", "load_checkpoint", "load_pretrained", "model", "save_checkpoint"]
