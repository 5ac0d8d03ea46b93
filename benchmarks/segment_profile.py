r"""Where a persistent segment kernel's time goes: `kernels.decode_segment` on one run of identical
decode blocks (SmolLM2 shapes by default, random bf16 weights, one row), timed with some phases'
work skipped (barriers kept; results then wrong: timing only), and under launch knobs.

  python benchmarks/segment_profile.py --layers 30 --out results/segment_profile.json

Rows: us per call (median of --runs jitted loops of --reps calls, divided by reps) and per layer.

`--timeline`: for each variant that skips nothing, one more call of the whole kernel that reads
each SM's clock at points of every phase (`KernelConfig(timeline=True)`): its data in, half way,
result, adds + release (arrived at the barrier), barrier (left it); printed as cycles since the
program left the previous barrier (the attention's q/k/v arrive as tagged words, with no barrier
before it: from the one before q/k/v), median over layers of the median program / the slowest. The
clocks are read behind data dependences and gate what follows, so they sit close to those points;
the reads add a little time (the arrive then waits for its atomic's reply).
"""

from __future__ import annotations

import argparse
import dataclasses
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

OLD_LAUNCH = {"persistent_warps": 4, "attn_block": 128}  # the launch before 8 warps and 256-slot steps
OLD_KERNEL = {"qkv_tags": False, "ffn_rows": 16, "kv_upto_index": False}  # before tags, spread FFN, upto-index
# name -> KernelConfig fields; profile_skip: phase positions whose work is skipped (qkv, attention+o_proj, FFN)
VARIANTS = {
    "full": {},
    "barriers only": {"profile_skip": (0, 1, 2)},
    "qkv only": {"profile_skip": (1, 2)},
    "attention+o_proj only": {"profile_skip": (0, 2)},
    "ffn only": {"profile_skip": (0, 1)},
    "ffn 8 rows": {"profile_skip": (0, 1), "ffn_rows": 8},
    "full 8 warps": {"persistent_warps": 8},
    "full 8 warps attn 256": {"persistent_warps": 8, "attn_block": 256},  # the whole cache prefetched
    "full 4 warps attn 128": OLD_LAUNCH,
    "full kv at barrier": {"early_kv": False},  # the cache block loaded at the barrier
    # The defaults, each turned back (and all: the older kernel)
    "full older kernel": OLD_KERNEL,
    "full qkv barrier": {"qkv_tags": False},  # a grid barrier after q/k/v, not tagged words
    "full ffn 16 rows": {"ffn_rows": 16},  # 96 FFN items of 16 rows, not 128 of 12
    "full kv whole cache": {"kv_upto_index": False},  # cached K/V read past the index too
    # L2 prefetch of the next phase's weights by the programs idle in a phase (default: in every
    # phase, 512 lines per step): off, during attention only, other steps; 16 warps
    "full no idle prefetch": {"idle_prefetch": ""},
    "full idle prefetch ffn": {"idle_prefetch": "ffn"},
    "full prefetch 4096 lines": {"prefetch_lines": 4096},  # a share at once (up to 4096 lines)
    "full prefetch 256 lines": {"prefetch_lines": 256},
    "full 16 warps": {"persistent_warps": 16},
    "full layer-0 weights": {"profile_layer0": True},  # weights and cache from L2: no HBM streaming
    "barriers layer-0": {"profile_skip": (0, 1, 2), "profile_layer0": True},
    # Two or three programs per SM (at 4 warps and 128-slot steps; 8 warps do not fit twice)
    "full 264 programs": {"programs": 264, **OLD_LAUNCH},
    "full 264 programs 8 warps": {"programs": 264, "persistent_warps": 8},
    "full 396 programs": {"programs": 396, **OLD_LAUNCH},
    "ffn only 264 programs": {"profile_skip": (0, 1), "programs": 264, **OLD_LAUNCH},
    "attention+o_proj only 264 programs": {"profile_skip": (0, 2), "programs": 264, **OLD_LAUNCH},
}


def variant(name: str, **more) -> kernels.KernelConfig:
  """The KernelConfig of a named variant (plus `more` fields)."""
  return kernels.KernelConfig(**{**VARIANTS[name], **more})


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


PHASES = ("qkv", "attention+o_proj", "ffn")


# Printed segment -> the timeline point (kernels.TIMELINE_POINTS) it ends at, in time order.
SEGMENTS = {"data in": "data in", "half way": "half way", "result": "result", "adds+release": "arrived",
            "barrier": "left"}


def timeline(p, kv, h, cos, sin, mask, idx: int, N: int, K: int, cfg: kernels.KernelConfig, calls: int = 3) -> dict:
  """Per phase, cycles from leaving the previous barrier to each timeline point of `decode_segment`
  built with `cfg` plus timeline=True, of the last of `calls` calls (the first ones compile and
  warm up): median over layers of the median program and of the slowest."""
  cfg = dataclasses.replace(cfg, timeline=True)
  flags = kernels.sync_flags(kernels.persistent_programs(cfg))
  seg = jax.jit(functools.partial(kernels.decode_segment, attn_kind="gqa", ffn_kind="swiglu", num_heads=N,
                                  num_kv_heads=K, cfg=cfg), donate_argnums=(2,))
  kv = jax.tree.map(jnp.copy, kv)
  for i in range(calls):
    t = time.perf_counter()
    _, kv, flags, clk = jax.block_until_ready(seg(h, p, kv, flags, cos, sin, mask, jnp.int32(idx + i)))
    wall_us = (time.perf_counter() - t) * 1e6
  clk = np.asarray(clk).astype(np.int64)  # [P, 1 + layers * phases, points]
  left = kernels.TIMELINE_POINTS.index("left")
  start = clk[:, :-1, left]  # left the previous barrier (row 0: the program's start)
  for c in range(1, start.shape[1]):  # a phase with no barrier before it counts from the one before
    start[:, c] = np.where(start[:, c] == 0, start[:, c - 1], start[:, c])
  rows = clk[:, 1:]
  total = float(np.median((clk[:, -1, left] - clk[:, 0, left]) % 2**32))
  out = {"cycles_per_call": total, "wall_us_last_call": wall_us, "phases": {}}
  print(f"timeline: {total:.0f} SM cycles per call (the last call: {wall_us:.0f} us wall); per phase, "
        "cycles since leaving the previous barrier, median program / slowest:")
  for j, name in enumerate(PHASES):
    r, s0 = rows[:, j::len(PHASES)], start[:, j::len(PHASES)]  # [P, layers, points], [P, layers]
    cols = {seg: kernels.TIMELINE_POINTS.index(point) for seg, point in SEGMENTS.items()}
    pts = {seg: (r[..., k] - s0) % 2**32 for seg, k in cols.items() if r[..., k].any()}
    row = {seg: [float(np.median(np.median(v, 0))), float(np.median(v.max(0)))] for seg, v in pts.items()}
    out["phases"][name] = row
    print(f"  {name:18s} " + "  ".join(f"{seg} {m:6.0f}/{x:6.0f}" for seg, (m, x) in row.items()))
  return out


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--layers", type=int, default=30)
  ap.add_argument("--shape", default="576,9,3,64,1536,256", help="D,N,K,H,F,S")
  ap.add_argument("--idx", type=int, default=0, help="cache slots in use (0: S / 2)")
  ap.add_argument("--reps", type=int, default=20)
  ap.add_argument("--runs", type=int, default=5)
  ap.add_argument("--variants", default=",".join(VARIANTS))
  ap.add_argument("--timeline", action="store_true", help="also the timeline of each variant that skips nothing")
  ap.add_argument("--out", default="")
  args = ap.parse_args(argv)
  D, N, K, H, F, S = map(int, args.shape.split(","))
  idx = args.idx or S // 2
  p, kv, h, cos, sin, mask = inputs(args.layers, D, N, K, H, F, S, idx)
  res = {"device": jax.devices()[0].device_kind, "layers": args.layers, "shape": args.shape, "rows": {}}
  for name in args.variants.split(","):
    cfg = variant(name)
    flags = kernels.sync_flags(kernels.persistent_programs(cfg))

    @functools.partial(jax.jit, donate_argnums=(1, 2))
    def loop(h, kv, flags, start):
      def body(i, c):  # index grows by one per call, as in decoding (barrier epochs derive from it)
        h, kv, flags = c
        return kernels.decode_segment(h, p, kv, flags, cos, sin, mask, start + i, attn_kind="gqa",
                                      ffn_kind="swiglu", num_heads=N, num_kv_heads=K, cfg=cfg)
      return jax.lax.fori_loop(0, args.reps, body, (h, kv, flags))

    try:  # each run: fresh barrier flags (epochs restart with them), the same cache slots
      t0 = time.perf_counter()
      state = jax.block_until_ready(loop(h, jax.tree.map(jnp.copy, kv), flags, jnp.int32(idx)))
      first = time.perf_counter() - t0
      ts = []
      for _ in range(args.runs):
        fresh = kernels.sync_flags(kernels.persistent_programs(cfg))
        t = time.perf_counter()
        state = jax.block_until_ready(loop(h, state[1], fresh, jnp.int32(idx)))
        ts.append(time.perf_counter() - t)
      us = float(np.median(ts)) / args.reps * 1e6
      row = {"us_per_call": us, "us_per_layer": us / args.layers, "compile_s": first,
             "barrier_timeouts": int(kernels.sync_timeouts(state[2]))}
      if args.timeline and not cfg.profile_skip:
        print(f"{name}:")
        row["timeline"] = timeline(p, kv, h, cos, sin, mask, idx, N, K, cfg)
    except Exception as e:
      row = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
    res["rows"][name] = row
    print(f"{name:22s}" + (f"{row['us_per_call']:9.1f} us/call {row['us_per_layer']:7.2f} us/layer  timeouts "
                           f"{row['barrier_timeouts']}" if "error" not in row else row["error"]), flush=True)
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps(res, indent=1))
  return res


if __name__ == "__main__":
  main()
