r"""Long-context decode tokens/s: a gpt-oss-20b-shaped parent vs a child with expert pruning,
wider-window replacements of full-attention layers and an FP8 KV cache (random weights, JAX).

  python benchmarks/gpt_oss_decode.py                      # H200: 24 layers, contexts 8K and 32K
  python benchmarks/gpt_oss_decode.py --small              # this CPU: 2 tiny layers, same code path

Parent: gpt-oss-20b shapes (hidden 2880, 64 heads of 64, 8 KV heads, 32 experts top-4, width 2880,
vocab 201088, layers alternating 128-token windows and full attention, bf16 KV). Child: every layer
keeps `--keep_experts` experts, full-attention layers become `--child_window`-token windows, and
K/V are stored as float8_e4m3 (per-layer scales). The cache is filled with random K/V up to the
context (no prefill: decode time is what is measured); each timed call runs `--steps` greedy
decode steps inside one jit. Correctness first, at a tiny size in float32: cached decoding of the
parent and of the child equals their full forward. Writes $OUT/gpt_oss_decode.json when $OUT is set.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import write_out
from puzzle_jax.core import hf_gpt_oss, model
from puzzle_jax.core.arch import Arch
from puzzle_jax.moe import prune

GPT_OSS_20B = dict(vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_hidden_layers=24,
                   num_attention_heads=64, num_key_value_heads=8, head_dim=64, num_local_experts=32,
                   num_experts_per_tok=4, sliding_window=128, max_position_embeddings=131072,
                   rope_parameters=dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0,
                                        truncate=False, original_max_position_embeddings=4096, rope_theta=150000.0))
SMALL = dict(GPT_OSS_20B, vocab_size=97, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=8,
             num_experts_per_tok=2, sliding_window=4)


def child_of(arch: Arch, params, keep_experts: int, window: int):
  """Experts 0..keep-1 kept (router rows sliced), full layers windowed, FP8 KV (scale 0.05)."""
  layers, blocks = [], []
  for b, p in zip(arch.blocks, params["model"]["layers"]):
    mlp = prune.prune_mlp(p["mlp"], range(keep_experts))
    attn = {**p["self_attn"], "k_scale": jnp.float32(0.05), "v_scale": jnp.float32(0.05)}
    layers.append({**p, "mlp": mlp, "self_attn": attn})
    blocks.append(dataclasses.replace(b, attn=dataclasses.replace(b.attn, window=b.attn.window or window,
                                                                  kv_dtype="fp8"),
                                      ffn=prune.pruned_spec(b.ffn, keep_experts)))
  return dataclasses.replace(arch, blocks=tuple(blocks)), {**params, "model": {**params["model"], "layers": layers}}


def check_decode(arch: Arch, params, seq: int = 10) -> float:
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, arch.vocab_size, (2, seq)))
  full = model.forward(arch, params, tokens)
  cache = model.init_cache(arch, 2, seq)
  logits, cache = model.extend(arch, params, tokens[:, :seq // 2], cache)
  outs = [logits]
  for t in range(seq // 2, seq):
    logits, cache = model.extend(arch, params, tokens[:, t:t + 1], cache)
    outs.append(logits)
  return float(jnp.max(jnp.abs(jnp.concatenate(outs, 1) - full)) / jnp.max(jnp.abs(full)))


def filled_cache(arch: Arch, batch: int, context: int, steps: int, dtype, seed: int = 0):
  cache = model.init_cache(arch, batch, context + steps, dtype)
  key = jax.random.PRNGKey(seed)
  for i, c in enumerate(cache["layers"]):
    for n in ("k", "v"):
      x = jax.random.normal(jax.random.fold_in(key, 2 * i + (n == "v")), c[n].shape, jnp.float32)
      c[n] = jnp.where(jnp.arange(context + steps)[None, :, None, None] < context, x, 0).astype(c[n].dtype)
  valid = jnp.broadcast_to(jnp.arange(context + steps)[None] < context, (batch, context + steps))
  return {**cache, "index": jnp.int32(context), "valid": valid, "next_pos": jnp.full((batch,), context, jnp.int32)}


@functools.partial(jax.jit, static_argnames=("arch", "steps"), donate_argnames=("cache",))
def decode(arch: Arch, params, cache, tok_B, *, steps: int):
  def body(_, carry):
    tok, cache = carry
    logits, cache = model.extend(arch, params, tok[:, None], cache, dtype=jnp.bfloat16)
    return jnp.argmax(logits[:, -1], -1).astype(jnp.int32), cache
  return jax.lax.fori_loop(0, steps, body, (tok_B, cache))


def time_decode(arch, params, batch, context, steps, repeats):
  times = []
  for r in range(repeats + 1):  # the first call compiles
    cache = filled_cache(arch, batch, context, steps, jnp.bfloat16, seed=r)
    tok = jnp.zeros((batch,), jnp.int32)
    jax.block_until_ready(cache)
    t0 = time.perf_counter()
    jax.block_until_ready(decode(arch, params, cache, tok, steps=steps))
    times.append(time.perf_counter() - t0)
  return batch * steps / float(np.median(times[1:]))


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser()
  ap.add_argument("--small", action="store_true")
  ap.add_argument("--layers", type=int, default=24)
  ap.add_argument("--contexts", type=int, nargs="*", default=None)
  ap.add_argument("--batch", type=int, default=None)
  ap.add_argument("--steps", type=int, default=16)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--keep_experts", type=int, default=None, help="child's experts per layer (default 3/4)")
  ap.add_argument("--child_window", type=int, default=1024)
  args = ap.parse_args(argv)
  shape = dict(SMALL if args.small else GPT_OSS_20B)
  if not args.small:
    shape["num_hidden_layers"] = args.layers
  arch = hf_gpt_oss.arch_from_gpt_oss(shape)
  keep = args.keep_experts or shape["num_local_experts"] * 3 // 4
  window = 8 if args.small else args.child_window

  tiny = hf_gpt_oss.arch_from_gpt_oss(SMALL)
  tiny_params = model.init_params(jax.random.PRNGKey(1), tiny)
  errs = {"parent": check_decode(tiny, tiny_params), "child": check_decode(*child_of(tiny, tiny_params, 6, 8))}
  print(f"correctness (cached decode vs full forward, float32, tiny): {errs}")
  assert max(errs.values()) < 1e-3, errs

  params = jax.jit(model.init_params, static_argnums=(1, 2))(jax.random.PRNGKey(0), arch, jnp.bfloat16)
  c_arch, c_params = child_of(arch, params, keep, window)
  print(f"parent {arch.num_params() / 1e9:.2f}B params, child {c_arch.num_params() / 1e9:.2f}B "
        f"({keep}/{shape['num_local_experts']} experts, full layers -> window {window}, FP8 KV)")
  contexts = args.contexts or ([64, 256] if args.small else [8192, 32768])
  rows = []
  for ctx in contexts:
    batch = args.batch or (2 if args.small else (32 if ctx <= 8192 else 8))
    row = {"context": ctx, "batch": batch,
           "parent_tok_s": time_decode(arch, params, batch, ctx, args.steps, args.repeats),
           "child_tok_s": time_decode(c_arch, c_params, batch, ctx, args.steps, args.repeats),
           "parent_kv_gb": arch.kv_cache_bytes(batch, ctx) / 1e9, "child_kv_gb": c_arch.kv_cache_bytes(batch, ctx) / 1e9}
    row["speedup"] = row["child_tok_s"] / row["parent_tok_s"]
    rows.append(row)
    print(f"context {ctx:>6} batch {batch:>3}: parent {row['parent_tok_s']:>9,.0f} tok/s  child "
          f"{row['child_tok_s']:>9,.0f} tok/s  speedup {row['speedup']:.2f}x  KV {row['parent_kv_gb']:.1f} -> "
          f"{row['child_kv_gb']:.1f} GB")
  result = {"device": jax.devices()[0].device_kind, "layers": arch.num_layers, "keep_experts": keep,
            "child_window": window, "steps": args.steps, "check": errs, "rows": rows}
  write_out("gpt_oss_decode.json", result)
  return result


if __name__ == "__main__":
  main()
