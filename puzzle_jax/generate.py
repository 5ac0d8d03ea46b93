"""Prompt -> text with any (arch, params): the chat template, sampling, stop tokens."""

from __future__ import annotations

import jax
import numpy as np

from puzzle_jax.core import model


def complete(arch, params, tok, prompt: str, *, chat: bool = True, max_new_tokens: int = 64,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> str:
  """One prompt -> decoded continuation (stops at the tokenizer's stop tokens)."""
  text = tok.apply_chat_template([{"role": "user", "content": prompt}]) if chat else prompt
  ids = tok.encode(text)
  out = model.generate(arch, params, np.asarray([ids], np.int32), max_new_tokens=max_new_tokens,
                       temperature=temperature, top_p=top_p, stop_tokens=tok.stop_ids,
                       key=jax.random.PRNGKey(seed))
  new = [int(t) for t in np.asarray(out[0])]
  for i, t in enumerate(new):
    if t in tok.stop_ids:
      new = new[:i]
      break
  return tok.decode(new, skip_special_tokens=True)
