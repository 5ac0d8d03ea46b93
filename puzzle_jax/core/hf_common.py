"""Config.json fields shared by every HF decoder format we write (nemotron-nas and gpt_oss_puzzle).

Its own module so that `hf_config` and `hf_gpt_oss` can both import it at module top without
importing each other in a cycle (`hf_config` imports `hf_gpt_oss`).
"""

from __future__ import annotations

from typing import Any

from puzzle_jax.core.arch import Arch


def global_fields(arch: Arch) -> dict[str, Any]:
  """The config.json fields every decoder format shares (sizes, norm eps, tying, special tokens)."""
  eos = list(arch.eos_token_id) if isinstance(arch.eos_token_id, tuple) else arch.eos_token_id
  return {"vocab_size": arch.vocab_size, "hidden_size": arch.hidden_size, "num_attention_heads": arch.num_heads,
          "head_dim": arch.head_dim, "num_hidden_layers": arch.num_layers, "rms_norm_eps": arch.rms_eps,
          "tie_word_embeddings": arch.tie_embeddings, "max_position_embeddings": arch.max_position,
          "bos_token_id": arch.bos_token_id, "eos_token_id": eos}
