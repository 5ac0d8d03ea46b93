"""The `generate` stage: prompt -> text with the parent, the child or any checkpoint."""

from __future__ import annotations

import jax
import numpy as np

from puzzle_jax.core import model


def resolve_checkpoint(config, which: str):
  """(arch, params) for "parent", "child" or a checkpoint/HF/GGUF path."""
  from puzzle_jax import io, workdir as W
  paths = W.Paths.from_config(config)
  if which == "parent":
    return W.load_parent(config)
  if which == "child":
    if not (paths.child / "arch.json").exists():
      raise FileNotFoundError(f"{paths.child} missing: run `python -m puzzle_jax run --config ...` first")
    return io.load_checkpoint(paths.child)
  import pathlib
  p = pathlib.Path(which)
  return io.load_checkpoint(p) if (p / "arch.json").exists() else io.load_pretrained(p)


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


def run(config) -> str:
  from puzzle_jax import workdir as W
  g = config.generate
  arch, params = resolve_checkpoint(config, g.checkpoint)
  text = complete(arch, params, W.load_tok(config), g.prompt, chat=g.chat, max_new_tokens=g.max_new_tokens,
                  temperature=g.temperature, top_p=g.top_p, seed=config.seed)
  print(f"[{g.checkpoint}] {g.prompt}\n-> {text}")
  return text
