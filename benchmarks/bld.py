r"""BLD speed: vmapped vs sequential candidates, MFU at Llama-3.1-8B shapes, SmolLM2 tokens/s.

  python benchmarks/bld.py --size h100 --gguf PATH --out bld.json    # on the GPU
  python benchmarks/bld.py --size cpu                                # tiny, any machine

1. vmap: K same-shape FFN candidates trained by one vmapped step vs K separate single-candidate
   steps on the same data (wall-time ratio; the goal is >= 0.8*K for K >= 4).
2. MFU: the vmapped step at Llama-3.1-8B layer shapes (D 4096, FFN 14336 -> candidates at half
   width; 32 heads, 8 KV heads -> GQA kv=4 candidates), bf16 compute on float32 master weights;
   model FLOPs = 6 x tokens x candidate matmul params (+ attention scores), over the measured
   bf16 matmul peak of the same device.
3. The full BLD step (teacher forward + every candidate of the default library) on SmolLM2 with
   real weights: tokens/s.
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from puzzle_jax.search import bld
from puzzle_jax.search import candidates as cands
from puzzle_jax.core import model
from puzzle_jax.core.arch import AttnSpec, FFNSpec, uniform_arch, variant_key

SIZES = {  # (tokens per candidate step B, L), K values, 8B-shape scale, steps for SmolLM2
    "cpu": dict(B=2, L=64, ks=(1, 4), d=256, f=512, heads=8, kv=2, k8b=2, smol_steps=3, smol_bl=(1, 64)),
    "h100": dict(B=8, L=512, ks=(1, 4, 8, 16), d=4096, f=14336, heads=32, kv=8, k8b=4, smol_steps=20,
                 smol_bl=(16, 512)),
}


def timeit(fn, *args, repeats: int = 10) -> float:
  out = fn(*args)
  jax.block_until_ready(out)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def matmul_peak(dtype=jnp.bfloat16) -> float:
  n = 8192 if jax.default_backend() == "gpu" else 1024
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  return 2 * n**3 / timeit(f, a)


def _group(arch, spec, sub: str, k: int) -> bld.Group:
  return bld.Group(sub, spec, tuple(cands.Candidate(i, sub, spec) for i in range(k)), tuple(range(k)))


def _setup(arch, spec, sub, k, B, L, dtype):
  g = _group(arch, spec, sub, k)
  keys = jax.random.split(jax.random.PRNGKey(0), k)
  init = model.attn_init if sub == "attn" else model.ffn_init
  p_C = jax.vmap(lambda key: init(key, spec, arch, jnp.float32))(keys)
  opt = bld.make_optimizer(bld.BLDConfig(steps=100))
  o_C = jax.vmap(opt.init)(p_C)
  x = jax.random.normal(jax.random.PRNGKey(1), (k, B, L, arch.hidden_size), dtype)
  y = jax.random.normal(jax.random.PRNGKey(2), (k, B, L, arch.hidden_size), dtype)
  return g, opt, p_C, o_C, x, y


def vmap_vs_sequential(sz) -> list[dict]:
  arch = uniform_arch(vocab_size=1000, hidden_size=576, num_layers=1, num_heads=9, num_kv_heads=3,
                      intermediate_size=1536)
  spec = FFNSpec("swiglu", 768)
  rows = []
  for k in sz["ks"]:
    g, opt, p_C, o_C, x, y = _setup(arch, spec, "ffn", k, sz["B"], sz["L"], jnp.bfloat16)
    vstep = jax.jit(functools.partial(bld.group_update, arch=arch, group=g, optimizer=opt))
    sstep = jax.jit(functools.partial(bld.candidate_update, arch=arch, sub="ffn", spec=spec, optimizer=opt))
    t_v = timeit(vstep, p_C, o_C, x, y)
    singles = [(jax.tree_util.tree_map(lambda a: a[i], p_C), jax.tree_util.tree_map(lambda a: a[i], o_C))
               for i in range(k)]
    seq = lambda: [sstep(p, o, x[i], y[i]) for i, (p, o) in enumerate(singles)]
    t_s = timeit(lambda: seq())
    rows.append({"K": k, "vmapped_s": t_v, "sequential_s": t_s, "speedup": t_s / t_v, "goal": 0.8 * k})
  return rows


def mfu_8b(sz, peak: float) -> list[dict]:
  d, f, h, kv = sz["d"], sz["f"], sz["heads"], sz["kv"]
  arch = uniform_arch(vocab_size=1000, hidden_size=d, num_layers=1, num_heads=h, num_kv_heads=kv,
                      intermediate_size=f)
  B, L, k = sz["B"], sz["L"], sz["k8b"]
  rows = []
  for sub, spec in (("ffn", FFNSpec("swiglu", f // 2)), ("attn", AttnSpec("gqa", num_kv_heads=kv // 2))):
    g, opt, p_C, o_C, x, y = _setup(arch, spec, sub, k, B, L, jnp.bfloat16)
    step = jax.jit(functools.partial(bld.group_update, arch=arch, group=g, optimizer=opt), donate_argnums=(0, 1))
    p_C, o_C, _ = step(p_C, o_C, x, y)
    jax.block_until_ready(p_C)
    times = []
    for _ in range(10):
      t0 = time.perf_counter()
      p_C, o_C, loss = step(p_C, o_C, x, y)
      jax.block_until_ready(loss)
      times.append(time.perf_counter() - t0)
    t = float(np.median(times))
    mm = (arch.attn_params(spec) if sub == "attn" else arch.ffn_params(spec)) - d  # minus the norm
    flops = 6 * B * L * mm * k
    if sub == "attn":
      flops += 3 * 2 * 2 * B * h * L * L * arch.head_dim // 2 * k  # causal QK^T and AV, fwd+bwd
    rows.append({"candidate": variant_key(spec), "K": k, "tokens": B * L, "step_s": t, "tflops": flops / t / 1e12,
                 "mfu_vs_measured_peak": flops / t / peak})
  return rows


def smollm2_tokens_per_s(sz, gguf: str | None) -> dict:
  from puzzle_jax import io
  if gguf:
    arch, params = io.load_pretrained(gguf, dtype=jnp.bfloat16)
    weights = "real (GGUF)"
  else:
    arch = uniform_arch(vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3,
                        intermediate_size=1536, tie_embeddings=True)
    params = model.init_params(jax.random.PRNGKey(0), arch, jnp.bfloat16)
    weights = "random"
  if jax.default_backend() == "cpu":
    arch, params = arch.__class__(**{**arch.__dict__, "blocks": arch.blocks[:2]}), {
        **params, "model": {**params["model"], "layers": params["model"]["layers"][:2]}}
  lib = cands.build_library(arch, cands.LibraryConfig())
  groups = bld.make_groups(arch, lib)
  cfg = bld.BLDConfig(steps=1000)
  opt = bld.make_optimizer(cfg)
  state = bld.init_state(bld.init_groups(arch, params, groups, bld.BLDConfig(init="random"), None,
                                         jax.random.PRNGKey(0)), opt)
  mesh = bld.make_mesh((("candidate", 1), ("data", 1)), jax.devices()[:1])
  step = bld.compile_step(arch, groups, opt, mesh, state)
  B, L = sz["smol_bl"]
  tokens = np.random.default_rng(0).integers(0, arch.vocab_size, (B, L)).astype(np.int32)
  t0 = time.perf_counter()
  state, losses = step(state, params, tokens)
  jax.block_until_ready(losses)
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(sz["smol_steps"]):
    state, losses = step(state, params, tokens)
  jax.block_until_ready(losses)
  dt = (time.perf_counter() - t0) / sz["smol_steps"]
  return {"weights": weights, "layers": arch.num_layers, "candidates": len(lib),
          "trained": sum(len(g.members) for g in groups), "batch": [B, L], "step_s": dt,
          "tokens_per_s": B * L / dt, "compile_s": compile_s}


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser()
  ap.add_argument("--size", choices=sorted(SIZES), default="cpu")
  ap.add_argument("--gguf", default=None, help="SmolLM2 GGUF for real weights in part 3")
  ap.add_argument("--out", default=None)
  args = ap.parse_args(argv)
  sz = SIZES[args.size]
  peak = matmul_peak()
  res = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
         "bf16_matmul_peak_tflops": peak / 1e12, "vmap": vmap_vs_sequential(sz), "mfu_8b": mfu_8b(sz, peak),
         "smollm2": smollm2_tokens_per_s(sz, args.gguf)}
  print(f"device {res['device']}  measured bf16 matmul peak {peak / 1e12:.1f} TFLOP/s")
  print(f"{'K':>3} {'vmapped ms':>11} {'sequential ms':>14} {'speedup':>8} {'goal':>5}")
  for r in res["vmap"]:
    print(f"{r['K']:>3} {r['vmapped_s'] * 1e3:>11.2f} {r['sequential_s'] * 1e3:>14.2f} {r['speedup']:>8.2f} {r['goal']:>5.1f}")
  for r in res["mfu_8b"]:
    print(f"8B-shape {r['candidate']}: K={r['K']} step {r['step_s'] * 1e3:.1f} ms, {r['tflops']:.0f} TFLOP/s, "
          f"MFU {100 * r['mfu_vs_measured_peak']:.1f}% of measured peak")
  s = res["smollm2"]
  print(f"SmolLM2 BLD ({s['weights']} weights, {s['trained']} trained candidates, batch {s['batch']}): "
        f"{s['tokens_per_s']:,.0f} tokens/s, step {s['step_s'] * 1e3:.1f} ms, compile {s['compile_s']:.1f}s")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(res, f, indent=1)
  return res


if __name__ == "__main__":
  main()
