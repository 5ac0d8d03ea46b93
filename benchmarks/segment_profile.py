r"""Where a persistent segment kernel's time goes: `kernels.decode_segment` on one run of identical
decode blocks (SmolLM2 shapes by default, random bf16 weights, one row), timed with some phases'
work skipped (barriers kept; results then wrong: timing only), and under launch knobs.

  python benchmarks/segment_profile.py --layers 30 --out results/segment_profile.json

Rows: us per call (median of --runs jitted loops of --reps calls, divided by reps) and per layer.
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from puzzle_jax import kernels  # noqa: E402

VARIANTS = {  # name -> (skipped phase positions, knob settings); phases: qkv, attention+o_proj, FFN
    "full": ((), {}),
    "barriers only": ((0, 1, 2), {}),
    "qkv only": ((1, 2), {}),
    "attention+o_proj only": ((0, 2), {}),
    "ffn only": ((0, 1), {}),
    "ffn 8 rows": ((0, 1), {"PERSISTENT_FFN_ROWS": 8}),
    "full 8 warps": ((), {"PERSISTENT_WARPS": 8}),
    "full 264 programs": ((), {"PERSISTENT_PROGRAMS": 264}),
    "full 264 programs 8 warps": ((), {"PERSISTENT_PROGRAMS": 264, "PERSISTENT_WARPS": 8}),
    "full 396 programs": ((), {"PERSISTENT_PROGRAMS": 396}),
    "ffn only 264 programs": ((0, 1), {"PERSISTENT_PROGRAMS": 264}),
    "attention+o_proj only 264 programs": ((0, 2), {"PERSISTENT_PROGRAMS": 264}),
}


def inputs(layers: int, D: int, N: int, K: int, H: int, F: int, S: int, idx: int):
  ks = iter(jax.random.split(jax.random.PRNGKey(0), 16))
  bf = jnp.bfloat16
  w = lambda *s: (jax.random.normal(next(ks), s, jnp.float32) * s[-1] ** -0.5).astype(bf)
  p = {"attn_norm_D": jnp.ones((layers, D), bf), "wqkv_ExD": w(layers, (N + 2 * K) * H, D),
       "wo_DxA": w(layers, D, N * H), "ffn_norm_D": jnp.ones((layers, D), bf), "wgu_2xFxD": w(layers, 2, F, D),
       "wd_DxF": w(layers, D, F)}
  kv = {"k": w(layers, 1, K, S, H), "v": w(layers, 1, K, S, H)}
  ang = jnp.arange(H // 2, dtype=jnp.float32)[None] * 0.01
  return p, kv, w(1, D), jnp.cos(ang).repeat(2, 1), jnp.sin(ang).repeat(2, 1), (jnp.arange(S) < idx)[None]


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--layers", type=int, default=30)
  ap.add_argument("--shape", default="576,9,3,64,1536,256", help="D,N,K,H,F,S")
  ap.add_argument("--idx", type=int, default=0, help="cache slots in use (0: S / 2)")
  ap.add_argument("--reps", type=int, default=20)
  ap.add_argument("--runs", type=int, default=5)
  ap.add_argument("--variants", default=",".join(VARIANTS))
  ap.add_argument("--out", default="")
  args = ap.parse_args(argv)
  D, N, K, H, F, S = map(int, args.shape.split(","))
  idx = args.idx or S // 2
  p, kv, h, cos, sin, mask = inputs(args.layers, D, N, K, H, F, S, idx)
  res = {"device": jax.devices()[0].device_kind, "layers": args.layers, "shape": args.shape, "rows": {}}
  for name in args.variants.split(","):
    skip, knobs = VARIANTS[name]
    saved = {k: getattr(kernels, k) for k in knobs}
    for k, v in {**knobs, "PROFILE_SKIP": frozenset(skip)}.items():
      setattr(kernels, k, v)
    flags = kernels.sync_flags(kernels.persistent_programs())

    @functools.partial(jax.jit, donate_argnums=(1, 2))
    def loop(h, kv, flags, start):
      def body(i, c):  # index grows by one per call, as in decoding (barrier epochs derive from it)
        h, kv, flags = c
        return kernels.decode_segment(h, p, kv, flags, cos, sin, mask, start + i, attn_kind="gqa",
                                      ffn_kind="swiglu", num_heads=N, num_kv_heads=K)
      return jax.lax.fori_loop(0, args.reps, body, (h, kv, flags))

    try:  # each run: fresh barrier flags (epochs restart with them), the same cache slots
      t0 = time.perf_counter()
      state = jax.block_until_ready(loop(h, jax.tree.map(jnp.copy, kv), flags, jnp.int32(idx)))
      first = time.perf_counter() - t0
      ts = []
      for _ in range(args.runs):
        fresh = kernels.sync_flags(kernels.persistent_programs())
        t = time.perf_counter()
        state = jax.block_until_ready(loop(h, state[1], fresh, jnp.int32(idx)))
        ts.append(time.perf_counter() - t)
      us = float(np.median(ts)) / args.reps * 1e6
      row = {"us_per_call": us, "us_per_layer": us / args.layers, "compile_s": first,
             "barrier_timeouts": int(kernels.sync_timeouts(state[2]))}
    except Exception as e:
      row = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
    finally:
      for k, v in {**saved, "PROFILE_SKIP": frozenset()}.items():
        setattr(kernels, k, v)
    res["rows"][name] = row
    print(f"{name:22s}" + (f"{row['us_per_call']:9.1f} us/call {row['us_per_layer']:7.2f} us/layer  timeouts "
                           f"{row['barrier_timeouts']}" if "error" not in row else row["error"]), flush=True)
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps(res, indent=1))
  return res


if __name__ == "__main__":
  main()
