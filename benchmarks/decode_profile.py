r"""Batch-1 decode: where the time goes, per implementation and XLA flag set.

  python benchmarks/decode_profile.py --model smollm2 --impls xla,pallas --flags default,graphs \
      --out results/decode_profile.json

One worker process per flag set (XLA reads XLA_FLAGS once, at start-up). Per implementation
(`infer.prepare(decode_impl=...)`, unrolled layers (stacked runs for "persistent"), bf16, random
weights: speed needs shapes, not values) it checks the fused path against XLA's (one decode step's
logits, greedy tokens), then
times `infer.generate` as benchmarks/inference.py does (prompt 128, 128 new tokens, whole loop in
one jit; tok/s = new tokens / wall) plus the marginal cost of a token ((t[129] - t[1]) / 128), and
profiles one run: GPU kernels per token and the busy fraction of the step.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from typing import Any

FLAG_SETS = {
    "default": "",
    # The decode loop as one CUDA graph (while/conditional nodes): no host round trip per token.
    "graphs": "--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL --xla_gpu_graph_min_graph_size=1",
    "graphs_unrolled": ("--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL --xla_gpu_graph_min_graph_size=1 "
                        "--xla_gpu_command_buffer_unroll_loops=true"),
}
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # `benchmarks` as a package
PROMPT, NEW = 128, 128


def _arch(name: str):
  from benchmarks import inference as I
  from puzzle_jax.core.arch import uniform_arch
  if name == "tiny":  # CPU smoke test: the smallest shapes the kernels tile (head_dim 32)
    return uniform_arch(vocab_size=256, hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
                        intermediate_size=128, head_dim=32)
  if name == "child":  # the heterogeneous 30-layer child of benchmarks/inference.py (SmolLM2 dims)
    return I.random_child(I.random_parent(False, I.CHILD_LAYERS[False]), I.CHILD_LAYERS[False])
  return I.random_parent(False) if name == "smollm2" else I.llama8b(False)


def _kernel_stats(trace_dir: str) -> dict[str, Any]:
  """GPU kernel events of a perfetto trace: count, busy seconds, top kernels by time."""
  files = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
  if not files:
    return {"error": "no trace file"}
  trace = json.load(gzip.open(files[0]))
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  gpu_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
              and "GPU" in str(e.get("args", {}).get("name", "")).upper()}
  ks = [e for e in events if e.get("ph") == "X" and e.get("pid") in gpu_pids and e.get("dur") is not None]
  if not ks:
    return {"error": "no GPU events", "processes": sorted({str(e.get("args", {}).get("name"))
                                                          for e in events if e.get("ph") == "M"})[:20]}
  by = collections.defaultdict(lambda: [0, 0.0])
  for e in ks:
    by[e["name"][:60]][0] += 1
    by[e["name"][:60]][1] += e["dur"] * 1e-6
  start, end = min(e["ts"] for e in ks), max(e["ts"] + e["dur"] for e in ks)
  top = sorted(by.items(), key=lambda kv: -kv[1][1])[:12]
  return {"kernels": len(ks), "busy_s": sum(e["dur"] for e in ks) * 1e-6, "span_s": (end - start) * 1e-6,
          "top": [{"name": k, "count": c, "s": s} for k, (c, s) in top], "step": _one_step(ks)}


def _one_step(ks: list) -> list:
  """The kernels of one decode step in the middle of the run, in order (from one call of the
  longest kernel to the next): name, start (us after that call's start), duration (us)."""
  ks = sorted(ks, key=lambda e: e["ts"])
  longest = max(ks, key=lambda e: e["dur"])["name"]
  calls = [i for i, e in enumerate(ks) if e["name"] == longest]
  if len(calls) < 3:
    return []
  a, b = calls[len(calls) // 2], calls[len(calls) // 2 + 1]
  t0 = ks[a]["ts"]
  return [{"name": e["name"][:60], "at_us": round(e["ts"] - t0, 2), "us": round(e["dur"], 2)} for e in ks[a:b + 1]]


def _config(spec: str):
  """"pallas/matmul_warps=4/max_programs=64" -> ("pallas", a KernelConfig with those fields set)."""
  import dataclasses
  from puzzle_jax import kernels
  impl, *knobs = spec.split("/")
  fields = {f.name: f for f in dataclasses.fields(kernels.KernelConfig)}
  values = {}
  for kv in knobs:
    name, value = kv.split("=")
    if name not in fields:
      raise ValueError(f"no KernelConfig field {name!r} (fields: {', '.join(fields)})")
    if fields[name].type == "bool":
      values[name] = value.lower() not in ("0", "false")
    else:
      values[name] = int(value) if value.lstrip("-").isdigit() else value
  return impl, kernels.KernelConfig(**values)


def _prepare(arch, params, dtype, impl: str, cfg=None):
  """Persistent kernels ("persistent", and "auto" for long runs) take a run of layers stacked (scan
  layout); the others unrolled layers."""
  from puzzle_jax import infer, kernels
  return infer.prepare(arch, params, dtype, scan=impl in ("persistent", "auto"), decode_impl=impl,
                       kernel_config=cfg or kernels.DEFAULT)


def _timeouts(cache) -> int:
  """Barrier waits that gave up (persistent kernels): non-zero means wrong results."""
  from puzzle_jax import kernels
  return int(sum(int(kernels.sync_timeouts(f)) for f in cache["sync"] if f is not None))


def _f32_check(arch, params, toks, impls: list[str], steps: int = 16) -> dict[str, Any]:
  """Each fused implementation vs XLA in float32 on this device: greedy tokens, one step's logits."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from puzzle_jax import infer
  p32 = jax.tree.map(lambda x: x.astype(jnp.float32), params)
  got, res = {}, {}
  for impl in ["xla"] + impls:
    try:
      ip = _prepare(arch, p32, jnp.float32, impl)
      tokens = np.asarray(infer.generate(ip, toks, max_new_tokens=steps))
      _, cache = infer.prefill_cache(ip, toks, max_len=toks.shape[1] + 8)
      logits, cache = infer.decode_step(ip, jnp.asarray(tokens[:, 0]), cache)
      got[impl] = tokens, np.asarray(logits)
      if impl != "xla":
        (ta, la), (tb, lb) = got["xla"], got[impl]
        res[impl] = {"greedy_equal": bool((ta == tb).all()), "steps": steps, "barrier_timeouts": _timeouts(cache),
                     "step_logits_rel_err": float(np.linalg.norm(la - lb) / np.linalg.norm(la))}
    except Exception as e:
      res[impl] = {"error": f"{type(e).__name__}: {str(e)[:1000]}"}
  return res


def _time(fn, runs: int) -> float:
  from benchmarks import inference
  return inference.time_fn(fn, runs)["median_s"]  # first call and one warm-up untimed


def worker(args) -> dict[str, Any]:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from puzzle_jax import infer
  from puzzle_jax.core import model
  arch = _arch(args.model)
  params = model.init_params(jax.random.PRNGKey(0), arch, jnp.bfloat16)
  toks = jnp.asarray(np.random.default_rng(3).integers(0, arch.vocab_size, (1, PROMPT), dtype=np.int32))
  out: dict[str, Any] = {"flags": os.environ.get("XLA_FLAGS", ""), "device": jax.devices()[0].device_kind,
                         "weight_bytes": arch.weight_bytes(), "impls": {}}
  fused = sorted({i.split("/")[0] for i in args.impls.split(",")} - {"xla"})
  if fused:
    out["f32_check"] = _f32_check(arch, params, toks, fused)
    print("F32 " + json.dumps(out["f32_check"]), flush=True)
  ref = None
  for impl_spec in args.impls.split(","):
    row: dict[str, Any] = {}
    out["impls"][impl_spec] = row
    try:
      impl, cfg = _config(impl_spec)
      t0 = time.perf_counter()
      ip = _prepare(arch, params, jnp.bfloat16, impl, cfg)
      gen = lambda T: jax.block_until_ready(infer.generate(ip, toks, max_new_tokens=T))
      tokens = np.asarray(gen(NEW))
      row["first_call_s"] = time.perf_counter() - t0
      logits, cache = infer.prefill_cache(ip, toks, max_len=PROMPT + 8)
      step, cache = infer.decode_step(ip, jnp.asarray(tokens[:, 0]), cache)
      step = np.asarray(step)
      row["barrier_timeouts"] = _timeouts(cache)
      if ref is None:
        ref = (impl, tokens, step)
      else:  # agreement with the first implementation (bf16: report, do not require equality)
        row["vs"] = ref[0]
        row["greedy_equal_prefix"] = int(np.argmin(np.append(tokens[0] == ref[1][0], False)))
        row["step_logits_rel_err"] = float(np.linalg.norm(step - ref[2]) / np.linalg.norm(ref[2]))
        row["step_top1_equal"] = bool((step.argmax(-1) == ref[2].argmax(-1)).all())
      t_new = _time(lambda: gen(NEW), args.runs)
      t_one = _time(lambda: gen(1), args.runs)
      t_plus = _time(lambda: gen(NEW + 1), args.runs)
      row.update(generate_s=t_new, tok_s=NEW / t_new, step_s=(t_plus - t_one) / NEW,
                 step_tok_s=NEW / (t_plus - t_one), prefill_s=t_one)
      row["weight_GBps_at_step"] = arch.weight_bytes() / row["step_s"] / 1e9
      if args.profile:
        with tempfile.TemporaryDirectory() as d:
          jax.profiler.start_trace(d, create_perfetto_trace=True)
          gen(NEW + 1)
          jax.profiler.stop_trace()
          prof = _kernel_stats(d)
        if "kernels" in prof:
          prof["kernels_per_token"] = prof["kernels"] / (NEW + 1)
        row["profile"] = prof
    except Exception as e:  # one failing implementation must not lose the others' numbers
      row["error"] = f"{type(e).__name__}: {str(e)[:2000]}"
    print(f"[{args.model} {args.flag_name} {impl_spec}] " + json.dumps({k: v for k, v in row.items() if k != "profile"}),
          file=sys.stderr, flush=True)
    print("ROW " + json.dumps({"impl": impl_spec, "row": row, **{k: out[k] for k in ("flags", "device", "weight_bytes")}}),
          flush=True)  # a timed-out worker still reports what it finished
  return out


def _collect(stdout: str, stderr: str) -> dict[str, Any]:
  """A worker's rows, as far as it got."""
  rows = [json.loads(l[4:]) for l in stdout.splitlines() if l.startswith("ROW ")]
  if not rows:
    return {"error": stderr[-3000:]}
  f32 = [json.loads(l[4:]) for l in stdout.splitlines() if l.startswith("F32 ")]
  return {**{k: rows[0][k] for k in ("flags", "device", "weight_bytes")}, "impls": {r["impl"]: r["row"] for r in rows},
          **({"f32_check": f32[0]} if f32 else {})}


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="smollm2", choices=("smollm2", "8b", "tiny", "child"))
  p.add_argument("--impls", default="xla,pallas")
  p.add_argument("--flags", default="default,graphs", help=f"comma list of {sorted(FLAG_SETS)}")
  p.add_argument("--runs", type=int, default=10)
  p.add_argument("--profile", action="store_true", help="count kernels per token (one traced run)")
  p.add_argument("--timeout", type=int, default=280, help="seconds per worker")
  p.add_argument("--out", default="")
  p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--flag-name", default="default", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.model == "tiny":
    global PROMPT, NEW
    PROMPT, NEW = 8, 4
  if args.worker:
    worker(args)
    return {}
  res: dict[str, Any] = {"model": args.model, "prompt": PROMPT, "new_tokens": NEW, "runs": {}}
  for name in args.flags.split(","):
    env = {**os.environ, "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " " + FLAG_SETS[name]).strip()}
    if args.profile and name != "default":  # else the profiler switches command buffers off
      env["XLA_FLAGS"] += " --xla_enable_command_buffers_during_profiling=true"
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--worker", "--model", args.model, "--impls", args.impls,
           "--runs", str(args.runs), "--flag-name", name] + (["--profile"] if args.profile else [])
    try:
      proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout,
                            cwd=pathlib.Path(__file__).resolve().parents[1])
      res["runs"][name] = _collect(proc.stdout, proc.stderr)
    except subprocess.TimeoutExpired as e:
      out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
      res["runs"][name] = {**_collect(out, f"timed out after {args.timeout}s"), "timed_out": True}
    if args.out:
      pathlib.Path(args.out).write_text(json.dumps(res, indent=2))
  report(res)
  return res


def report(res: dict) -> None:
  for name, run in res["runs"].items():
    if "f32_check" in run:
      print(f"[{name}] float32 fused vs XLA on this device: {run['f32_check']}")
  print(f"{'flags':<16}{'impl':<32}{'tok/s':>9}{'step tok/s':>12}{'step us':>9}{'kern/tok':>10}{'busy':>7}  agreement")
  for name, run in res["runs"].items():
    if "error" in run:
      print(f"{name:<16}ERROR {run['error'][-300:]}")
      continue
    for impl, r in run["impls"].items():
      if "error" in r:
        print(f"{name:<16}{impl:<32}ERROR {r['error'][:300]}")
        continue
      prof = r.get("profile", {})
      kpt = f"{prof['kernels_per_token']:.0f}" if "kernels_per_token" in prof else "-"
      busy = f"{prof['busy_s'] / prof['span_s']:.0%}" if prof.get("span_s") else "-"
      agree = (f"greedy prefix {r['greedy_equal_prefix']}, step rel {r['step_logits_rel_err']:.1e}"
               if "vs" in r else "")
      print(f"{name:<16}{impl:<32}{r['tok_s']:>9.0f}{r['step_tok_s']:>12.0f}{r['step_s'] * 1e6:>9.1f}{kpt:>10}"
            f"{busy:>7}  {agree}")


if __name__ == "__main__":
  main()
