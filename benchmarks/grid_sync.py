r"""What a grid barrier costs against a kernel boundary: a chain of n dependent matrix-vector
products (x <- W_k x, bf16 [D, D] weights, batch 1), run three ways on one GPU:

  persistent  one Pallas kernel, one program per SM, `triton_ops.arrive/wait` between products
              (with and without prefetching the next product's weights before the wait)
  kernels     n launches of `kernels.matmul`
  xla         n XLA dots

  python benchmarks/grid_sync.py --n 120 --d 1024 --out results/grid_sync.json

Checks every variant against a float32 NumPy chain (same bf16 rounding per step) before timing;
reports us per product (median of --runs calls) and the barrier state (no abort).
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
from jax.experimental import pallas as pl

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from puzzle_jax import kernels  # noqa: E402
from puzzle_jax.kernels import triton_ops as tops  # noqa: E402

F32 = jnp.float32
INTERPRET = kernels.DEFAULT.interpreted  # Pallas' interpreter off the GPU


def _chain_kernel(meta_ref, w_ref, buf_in, flags_in, buf_ref, flags_ref, *, n: int, d: int, bn: int,
                  programs: int, prefetch: bool, mode: str):
  del buf_in, flags_in  # aliased to buf_ref / flags_ref
  p = pl.program_id(0)
  items = d // bn
  rows = pl.ds(jnp.minimum(p, items - 1) * bn, bn)
  base = meta_ref[0]

  def fetch(k):
    return w_ref[k, rows, :].astype(F32)

  def body(k, w):
    w = w if prefetch else fetch(k)
    src = jnp.bitwise_and(k, 1)
    x = (buf_ref[src, :] if mode == "plain" else tops.load(buf_ref, (src, slice(None)), l2=not INTERPRET)).astype(F32)
    y = jnp.sum(w * x[None, :], axis=1)

    @pl.when(p < items)
    def _():
      buf_ref[1 - src, rows] = y.astype(buf_ref.dtype)

    sync = programs > 1 and mode not in ("none", "plain")
    epoch = (k + 1) if counter is not None else base + k + 1
    if sync:
      tops.arrive(flags_ref, p, epoch, counter)
    w = fetch(jnp.minimum(k + 1, n - 1)) if prefetch else w
    if sync and mode in ("flags", "counter"):
      tops.wait(flags_ref, programs, epoch, counter, max_spin=kernels.DEFAULT.max_spin)
    return w

  # Mode "counter": the call's number is base / n (as in kernels.decode_segment, by its parity).
  counter = tops.call_counter(flags_ref, p, jax.lax.div(base, n)) if mode == "counter" and programs > 1 else None
  jax.lax.fori_loop(0, n, body, fetch(0) if prefetch else jnp.zeros((bn, d), F32))


@functools.partial(jax.jit, static_argnames=("programs", "prefetch", "mode"), donate_argnums=(1, 2))
def persistent(w_nxDxD, buf_2xD, flags, base, *, programs: int, prefetch: bool, mode: str = "flags"):
  """mode: "flags" / "counter" (kernels' barriers of that kind), "arrive" (no wait:
  wrong results, timing only), "none" (no barrier: timing only), "plain" (as "none", x read
  through L1)."""
  n, d, _ = w_nxDxD.shape
  bn = max(8, pl.next_power_of_2(-(-d // programs)))
  kern = functools.partial(_chain_kernel, n=n, d=d, bn=bn, programs=programs, prefetch=prefetch, mode=mode)
  out = (jax.ShapeDtypeStruct(buf_2xD.shape, buf_2xD.dtype), jax.ShapeDtypeStruct(flags.shape, flags.dtype))
  return pl.pallas_call(kern, out_shape=out, grid=(programs,), input_output_aliases={2: 0, 3: 1},
                        interpret=INTERPRET, compiler_params=tops.compiler_params(8, INTERPRET))(
      jnp.reshape(base, (1,)).astype(jnp.int32), w_nxDxD, buf_2xD, flags)


@jax.jit
def chain_kernels(w_nxDxD, x_D):
  x = x_D[None]
  for k in range(w_nxDxD.shape[0]):
    x = kernels.matmul(x, w_nxDxD[k])
  return x[0]


@jax.jit
def chain_xla(w_nxDxD, x_D):
  def body(x, w):
    return jnp.einsum("d,od->o", x, w, preferred_element_type=F32).astype(x.dtype), None
  return jax.lax.scan(body, x_D, w_nxDxD, unroll=True)[0]


def reference(w, x) -> np.ndarray:
  w, x = np.asarray(w, np.float32), np.asarray(x, np.float32)
  for k in range(w.shape[0]):
    x = np.asarray(jnp.asarray(w[k] @ x).astype(jnp.bfloat16).astype(F32))
  return x


def _median_s(fn, runs: int) -> float:
  ts = []
  for _ in range(runs):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    ts.append(time.perf_counter() - t)
  return float(np.median(ts))


def _profile(fn, calls: int = 3) -> dict:
  """GPU kernels of `calls` calls (benchmarks/decode_profile's trace reader): us per kernel."""
  import tempfile
  from benchmarks.decode_profile import _kernel_stats
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d):
      for _ in range(calls):
        jax.block_until_ready(fn())
    return _kernel_stats(d)


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--n", type=int, default=120)
  ap.add_argument("--d", type=int, default=1024)
  ap.add_argument("--runs", type=int, default=20)
  ap.add_argument("--programs", type=int, default=0, help="0: one per SM (device core_count); 1 off-GPU")
  ap.add_argument("--modes", default="flags,counter,arrive,none")
  ap.add_argument("--profile", action="store_true", help="kernel times from a profiler trace")
  ap.add_argument("--out", default="")
  args = ap.parse_args(argv)
  dev = jax.devices()[0]
  programs = args.programs or (getattr(dev, "core_count", 1) if jax.default_backend() == "gpu" else 1)
  kw, kx = jax.random.split(jax.random.PRNGKey(0))
  w = (jax.random.normal(kw, (args.n, args.d, args.d), F32) / np.sqrt(args.d)).astype(jnp.bfloat16)
  x = jax.random.normal(kx, (args.d,), F32).astype(jnp.bfloat16)
  ref = reference(w, x)
  res = {"device": str(dev.device_kind), "n": args.n, "d": args.d, "programs": programs, "variants": {}}
  state = {m: {"flags": kernels.sync_flags(programs), "calls": 0} for m in args.modes.split(",")}

  def run_persistent(prefetch, mode):  # barrier state per mode: epochs (counter parity) follow its calls
    buf = jnp.stack([x, jnp.zeros_like(x)])
    st = state[mode]
    buf, st["flags"] = persistent(w, buf, st["flags"], jnp.int32(st["calls"] * args.n), programs=programs,
                                  prefetch=prefetch, mode=mode)
    st["calls"] += 1
    return buf[args.n % 2]

  variants = {f"persistent_{m}" + ("_prefetch" if pf else ""): functools.partial(run_persistent, pf, m)
              for m in args.modes.split(",") for pf in (True, False)}
  variants.update({"kernels": lambda: chain_kernels(w, x), "xla": lambda: chain_xla(w, x)})
  for name, fn in variants.items():
    t0 = time.perf_counter()
    y = np.asarray(jax.block_until_ready(fn()), np.float32)
    first = time.perf_counter() - t0
    err = float(np.abs(y - ref).max() / (np.abs(ref).max() + 1e-9))
    r = {"first_call_s": first, "rel_err": err, "ok": bool(err < 5e-2)}
    if r["ok"] or name.startswith(("persistent_none", "persistent_arrive", "persistent_plain")):
      s = _median_s(fn, args.runs)
      r.update(call_s=s, us_per_product=s / args.n * 1e6)
      if args.profile:
        r["kernels"] = _profile(fn)
        print("   ", [(k["name"][:40], k["count"], round(k["s"] / k["count"] * 1e6, 1)) for k in r["kernels"].get("top", [])[:3]])
    res["variants"][name] = r
    print(f"{name:22s} err {err:.1e}  " + (f"{r['us_per_product']:.2f} us/product" if "call_s" in r else "MISMATCH"),
          flush=True)
  res["timeouts"] = {m: int(st["flags"][-1]) for m, st in state.items()}
  print(f"barrier timeouts {res['timeouts']}")
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps(res, indent=1))
  return res


if __name__ == "__main__":
  main()
