r"""Multi-device scaling of BLD, GKD and the tensor-parallel fused FFN: n devices vs 1, one table.

  python benchmarks/multi_gpu.py                         # GPUs: Llama-3.1-8B layer shapes, all devices
  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
    python benchmarks/multi_gpu.py --small               # CPU smoke run on 8 fake devices

Every row is checked before it is timed: the n-device result (BLD per-candidate losses of three steps,
GKD losses of three steps, the fused FFN's output) against the same computation on one device, as
max relative error (float32 on CPU: tight; bfloat16 / TF32 on GPUs: looser). Rows:
  bld    the BLD step with the candidate axis over n devices (`bld.compile_step`, mesh candidate x 1)
  gkd    the data-parallel + FSDP GKD step (`gkd.compile_step` on `gkd.data_mesh`)
  ffn    a fused run of k SwiGLU FFNs with F split over n devices (`tp.ffn_apply_tp`), one decode
         step; `seq n` is the k members run one after another on the same n devices
Prints the table; writes JSON to --out or $OUT/multi_gpu.json.

Axis legend: B batch, L sequence, D hidden, F FFN width, C candidate.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from puzzle_jax.core import model
from puzzle_jax.core.arch import AttnSpec, fuse_ffn_run, uniform_arch
from puzzle_jax.distill import gkd
from puzzle_jax.fusion import tp
from puzzle_jax.search import bld
from puzzle_jax.search import candidates as cands


@dataclasses.dataclass(frozen=True)
class Sizes:
  hidden: int
  heads: int
  kv_heads: int
  width: int  # the parent's FFN width
  layers: int
  vocab: int
  batch: int  # BLD / GKD batch (a multiple of the device count)
  seq: int
  ffn_shapes: tuple[tuple[int, int], ...]  # (hidden, member FFN width) for the fused-FFN rows
  ffn_batches: tuple[int, ...]
  fuse_k: int
  repeats: int


# SmolLM2-like proportions at a tiny width; Llama-3.1-8B layers (a few of them) on GPUs.
SMALL = Sizes(hidden=64, heads=4, kv_heads=2, width=192, layers=2, vocab=256, batch=8, seq=32,
              ffn_shapes=((64, 256),), ffn_batches=(1, 4), fuse_k=2, repeats=3)
FULL = Sizes(hidden=4096, heads=32, kv_heads=8, width=14336, layers=2, vocab=32768, batch=8, seq=512,
             ffn_shapes=((4096, 14336), (8192, 28672)), ffn_batches=(1, 64), fuse_k=4, repeats=5)


def median_ms(fn, repeats: int, inner: int = 1) -> float:
  """Median wall time of `inner` back-to-back calls (after one warm-up), per call, in ms."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(inner):
      out = fn()
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / inner)
  return 1e3 * float(np.median(times))


def rel_err(got, want) -> float:
  """Max relative error over a pytree, each leaf against its own largest magnitude."""
  errs = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max()
                                         / max(float(np.abs(np.asarray(b, np.float32)).max()), 1e-30)),
                      got, want)
  return max(jax.tree.leaves(errs))


def stepper(step_fn, state, *args):
  """A zero-argument call of a state-donating step that keeps the newest state (for timing)."""
  box = [state]

  def call():
    box[0], metrics = step_fn(box[0], *args)
    return metrics
  return call


# ----------------------------------------------------------------------------- BLD
def bld_arch(s: Sizes):
  return uniform_arch(vocab_size=s.vocab, hidden_size=s.hidden, num_layers=s.layers, num_heads=s.heads,
                      num_kv_heads=s.kv_heads, intermediate_size=s.width)


def bld_step(s: Sizes, n: int, devices, pad_to: int):
  """(call, losses of three steps) of the BLD step on a (candidate n, data 1) mesh; candidates
  padded to `pad_to` so the 1- and n-device runs do the same work."""
  arch = bld_arch(s)
  parent = model.init_params(jax.random.PRNGKey(0), arch)
  lib = cands.build_library(arch, cands.LibraryConfig(kv_heads=(1,), ffn_fractions=(0.5,), ffn_multiple=16))
  groups = bld.make_groups(arch, lib, pad_to=pad_to)
  cfg = bld.BLDConfig(steps=100, batch_size=s.batch, seq_len=s.seq, lr=1e-3, warmup_steps=1, init="random")
  opt = bld.make_optimizer(cfg)
  mesh = bld.make_mesh((("candidate", n), ("data", 1)), devices[:n])
  state = bld.init_state(bld.init_groups(arch, parent, groups, cfg, None, jax.random.PRNGKey(1)), opt)
  state = jax.device_put(state, bld.state_shardings(state, mesh))
  parent = jax.device_put(parent, NamedSharding(mesh, P()))
  tokens_BxL = jax.random.randint(jax.random.PRNGKey(2), (s.batch, s.seq), 0, s.vocab)
  call = stepper(bld.compile_step(arch, groups, opt, mesh, state), state, parent, tokens_BxL)
  losses = [jax.device_get(call()) for _ in range(3)]  # step 1 has lr 0 (warm-up)
  return call, losses


def bld_row(s: Sizes, n: int, devices, tol: float) -> dict:
  call_1, want = bld_step(s, 1, devices, pad_to=n)
  call_n, got = bld_step(s, n, devices, pad_to=n)
  row = {"what": "bld", "shape": f"D{s.hidden} F{s.width} x{s.layers} B{s.batch} L{s.seq}",
         "err": rel_err(got, want), "tol": tol}
  return check_then_time(row, call_1, call_n, s.repeats)


# ----------------------------------------------------------------------------- GKD
def gkd_step(s: Sizes, n: int, devices, dtype: str):
  """(call, losses of three steps) of the GKD step (random student of the teacher's arch) on n devices."""
  arch = bld_arch(s)
  teacher = model.init_params(jax.random.PRNGKey(0), arch, jnp.dtype(dtype))
  student = model.init_params(jax.random.PRNGKey(3), arch)
  cfg = gkd.GKDConfig(steps=100, batch_size=s.batch, seq_len=s.seq, lr=1e-3, warmup_steps=1,
                      compute_dtype=dtype)
  opt = gkd.make_optimizer(cfg)
  mesh = gkd.data_mesh(s.batch, n, devices[:n])
  state = gkd.init_state(student, opt)
  state = jax.device_put(state, gkd.fsdp_sharding(state, mesh))
  teacher = jax.device_put(teacher, gkd.fsdp_sharding(teacher, mesh))
  tokens_BxL = jax.random.randint(jax.random.PRNGKey(2), (s.batch, s.seq), 0, s.vocab)
  call = stepper(gkd.compile_step(arch, arch, cfg, opt, mesh, state, teacher), state, teacher, tokens_BxL)
  losses = [float(call()["loss"]) for _ in range(3)]  # step 1 has lr 0 (warm-up)
  return call, losses


def gkd_row(s: Sizes, n: int, devices, dtype: str, tol: float) -> dict:
  call_1, want = gkd_step(s, 1, devices, dtype)
  call_n, got = gkd_step(s, n, devices, dtype)
  row = {"what": "gkd", "shape": f"D{s.hidden} F{s.width} x{s.layers} V{s.vocab} B{s.batch} L{s.seq}",
         "err": rel_err(got, want), "tol": tol}
  return check_then_time(row, call_1, call_n, s.repeats)


# ----------------------------------------------------------------------------- fused FFN, TP
def ffn_members(hidden: int, width: int, k: int, dtype):
  """k FFN-only blocks (attention removed, so they can fuse), their fused block and its params."""
  arch = uniform_arch(vocab_size=16, hidden_size=hidden, num_layers=k, num_heads=max(1, hidden // 128),
                      num_kv_heads=1, intermediate_size=width)
  for i in range(k):
    arch = arch.replace_block(i, attn=AttnSpec("noop"))
  params = model.init_params(jax.random.PRNGKey(0), arch, dtype)
  run = list(range(k))
  fa, fp = fuse_ffn_run(arch, run), model.fuse_ffn_params(arch, params, run)
  return arch, params["model"]["layers"], fa, fp["model"]["layers"][0]


def ffn_rows(s: Sizes, n: int, devices, dtype, tol: float) -> list[dict]:
  rows = []
  for hidden, width in s.ffn_shapes:
    arch, layers, fa, fused_p = ffn_members(hidden, width, s.fuse_k, dtype)
    spec = fa.blocks[0].ffn
    mesh_1 = jax.make_mesh((1,), ("model",), devices=devices[:1])
    mesh_n = jax.make_mesh((n,), ("model",), devices=devices[:n])
    fused_1 = jax.jit(lambda p, x: tp.ffn_apply_tp(p, x, spec, fa, mesh_1))
    fused_n = jax.jit(lambda p, x: tp.ffn_apply_tp(p, x, spec, fa, mesh_n))
    # The members one after another: one all-reduce each, where the fused FFN issues one in all.
    seq_n = jax.jit(lambda ps, x: sum(tp.ffn_apply_tp(p, x, b.ffn, arch, mesh_n)
                                      for p, b in zip(ps, arch.blocks)))
    for batch in s.ffn_batches:
      x_Bx1xD = jax.random.normal(jax.random.PRNGKey(batch), (batch, 1, hidden), dtype)
      want = fused_1(fused_p, x_Bx1xD)
      row = {"what": "ffn tp", "shape": f"D{hidden} F{s.fuse_k}x{width} B{batch}",
             "err": max(rel_err(fused_n(fused_p, x_Bx1xD), want), rel_err(seq_n(layers, x_Bx1xD), want)),
             "tol": tol}
      row = check_then_time(row, lambda: fused_1(fused_p, x_Bx1xD), lambda: fused_n(fused_p, x_Bx1xD),
                            s.repeats, inner=20)
      row["seq_n_ms"] = median_ms(lambda: seq_n(layers, x_Bx1xD), s.repeats, inner=20)
      row["fused_gain"] = row["seq_n_ms"] / row["n_ms"]
      rows.append(row)
  return rows


# ----------------------------------------------------------------------------- table
def check_then_time(row: dict, call_1, call_n, repeats: int, inner: int = 1) -> dict:
  """Time only a row whose n-device result matched the 1-device one."""
  row["ok"] = bool(row["err"] <= row["tol"])
  if not row["ok"]:
    print(f"CHECK FAILED {row['what']} {row['shape']}: rel err {row['err']:.2e} > {row['tol']:.0e}; not timed")
    return row
  row["1_ms"], row["n_ms"] = median_ms(call_1, repeats, inner), median_ms(call_n, repeats, inner)
  row["speedup"] = row["1_ms"] / row["n_ms"]
  return row


def format_table(rows: list[dict], n: int) -> str:
  head = f"{'what':<7} {'shape':<34} {'dev':>3} {'check':>8} {'1 dev ms':>9} {f'{n} dev ms':>9} " \
         f"{'speedup':>7} {'seq n ms':>9} {'fused gain':>10}"
  lines = [head, "-" * len(head)]
  num = lambda r, k, f: format(r[k], f) if k in r else "-"
  for r in rows:
    lines.append(f"{r['what']:<7} {r['shape']:<34} {n:>3} {r['err']:>8.1e} {num(r, '1_ms', '9.3f')} "
                 f"{num(r, 'n_ms', '9.3f')} {num(r, 'speedup', '7.2f')} {num(r, 'seq_n_ms', '9.3f'):>9} "
                 f"{num(r, 'fused_gain', '10.2f'):>10}")
  return "\n".join(lines)


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--small", action="store_true", help="tiny shapes for a CPU smoke run")
  ap.add_argument("--devices", type=int, default=0, help="devices to scale to (default all)")
  ap.add_argument("--out", default="", help="JSON path (default $OUT/multi_gpu.json when $OUT is set)")
  a = ap.parse_args(argv)
  devices = jax.devices()
  n = a.devices or len(devices)
  s = SMALL if a.small else FULL
  cpu = jax.default_backend() == "cpu"
  # GPUs compute in bfloat16 (GKD, FFN) and TF32 (BLD's float32 matmuls): looser than CPU float32.
  dtype, tol = ("float32", 1e-4) if cpu else ("bfloat16", 3e-2)
  print(f"device {devices[0].device_kind} x{n}, dtype {dtype}")
  rows = [bld_row(s, n, devices, 1e-4 if cpu else 1e-2), gkd_row(s, n, devices, dtype, tol)]
  rows += ffn_rows(s, n, devices, jnp.dtype(dtype), tol)
  table = format_table(rows, n)
  print(table)
  result = {"devices": n, "device_kind": devices[0].device_kind, "dtype": dtype, "rows": rows, "table": table}
  out = a.out or (os.path.join(os.environ["OUT"], "multi_gpu.json") if os.environ.get("OUT") else "")
  if out:
    pathlib.Path(out).write_text(json.dumps(result, indent=1))
  return result


if __name__ == "__main__":
  main()
