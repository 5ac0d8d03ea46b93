r"""Decode latency of k sequential SwiGLU FFNs vs one fused FFN of the same total width (FFN Fusion).

  python benchmarks/fusion_ffn.py                  # H200: hidden 576 / 4096 / 8192, batch 1 and 64, k 2 and 4
  python benchmarks/fusion_ffn.py --small          # CPU smoke run (tiny widths)

Each model is k FFN-only blocks (attention removed) on a tiny vocabulary, so the decode step is
almost all FFN; the fused model is `fuse_ffn_run` of it (one wide FFN + no-op placeholders). First
the fused model's logits are checked against the members run in parallel (`parallel_arch`), then
both whole models are timed with `costs.measure_model` (one decode step of `model.extend`), next to
the cost model's predictions: the measured per-variant table (fixed part + sum of per-FFN decode
times, `costs.measure_variant`) and the roofline (`--peak-tflops`, `--bandwidth-gbps`, H200 defaults).
Prints a table; writes JSON to --out or $OUT/fusion_ffn.json.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from puzzle_jax.core import model
from puzzle_jax.core.arch import Arch, AttnSpec, BlockSpec, FFNSpec, fuse_ffn_run, parallel_arch
from puzzle_jax.search import costs

# hidden -> one member's FFN width (SmolLM2-135M, Llama-3.1-8B, Llama-3.1-70B).
SHAPES = {576: 1536, 4096: 14336, 8192: 28672}
SMALL = {64: 256, 128: 512}
VOCAB = 256  # the fixed part (embedding + LM head) stays negligible next to the FFNs


def ffn_arch(hidden: int, width: int, k: int) -> Arch:
  heads = max(1, hidden // 64)
  block = BlockSpec(AttnSpec("noop"), FFNSpec("swiglu", width))
  return Arch(vocab_size=VOCAB, hidden_size=hidden, num_heads=heads, head_dim=hidden // heads, blocks=(block,) * k)


def check(seq: Arch, dtype) -> float:
  """Relative error of the fused model's logits vs the members in parallel (same weights)."""
  params = model.init_params(jax.random.PRNGKey(0), seq, dtype)
  run = list(range(seq.num_layers))
  fused_arch, fused = fuse_ffn_run(seq, run), model.fuse_ffn_params(seq, params, run)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 8), 0, VOCAB)
  want = model.forward(parallel_arch(seq, run), params, tokens, dtype=dtype)
  got = model.forward(fused_arch, fused, tokens, dtype=dtype)
  return float(jnp.abs(got - want).max() / jnp.abs(want).max())


def one(hidden: int, width: int, k: int, batch: int, sc: costs.Scenario, variants: dict,
        peak: float, bw: float) -> dict:
  seq = ffn_arch(hidden, width, k)
  fused = fuse_ffn_run(seq, list(range(k)))
  for w in (width, k * width, "fixed"):  # the per-variant cost table, measured once per (hidden, batch, w)
    key = (hidden, batch, w)
    if key not in variants:
      variants[key] = (costs.measure_fixed(seq, sc) if w == "fixed" else
                       costs.measure_variant(seq, FFNSpec("swiglu", w), sc))["decode_s"]
  fixed = variants[(hidden, batch, "fixed")]
  keys = costs.arch_keys(seq) + costs.arch_keys(fused)
  roof = costs.analytic_table(seq, keys, sc, peak_flops=peak, bandwidth=bw)
  r = {"hidden": hidden, "member_width": width, "k": k, "batch": batch,
       "seq_s": costs.measure_model(seq, None, sc)["decode_s"],
       "fused_s": costs.measure_model(fused, None, sc)["decode_s"],
       "pred_seq_s": fixed + k * variants[(hidden, batch, width)],
       "pred_fused_s": fixed + variants[(hidden, batch, k * width)],
       "roof_seq_s": costs.predicted_totals(seq, roof)["decode_s"],
       "roof_fused_s": costs.predicted_totals(fused, roof)["decode_s"]}
  r["speedup"], r["pred_speedup"] = r["seq_s"] / r["fused_s"], r["pred_seq_s"] / r["pred_fused_s"]
  return r


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--small", action="store_true", help="tiny widths for a CPU smoke run")
  ap.add_argument("--ks", default="2,4", help="fused-run lengths")
  ap.add_argument("--batches", default="1,64", help="decode batch sizes")
  ap.add_argument("--peak-tflops", type=float, default=989.0, help="roofline peak (H200 dense bf16)")
  ap.add_argument("--bandwidth-gbps", type=float, default=4800.0, help="roofline bandwidth (H200 HBM3e)")
  ap.add_argument("--out", default="", help="JSON path (default $OUT/fusion_ffn.json when $OUT is set)")
  a = ap.parse_args()
  shapes = SMALL if a.small else SHAPES
  ks = [int(x) for x in a.ks.split(",")]
  batches = (1, 4) if a.small else tuple(int(x) for x in a.batches.split(","))
  dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
  print(f"device {jax.devices()[0].device_kind}, dtype {dtype}")
  for hidden, width in shapes.items():  # correctness before any timing
    err = check(ffn_arch(hidden, width, max(ks)), jnp.float32)
    print(f"check hidden {hidden}: fused vs parallel members, max rel err {err:.2e}")
    assert err < 1e-4, f"fused FFN disagrees with its members (rel err {err})"
  rows, variants = [], {}
  for hidden, width in shapes.items():
    for batch in batches:
      sc = costs.Scenario(batch=batch, prompt_len=8, gen_len=2, dtype=dtype, kv_dtype=dtype,
                          repeats=3 if a.small else 5, min_call_s=1e-3 if a.small else 5e-3)
      for k in ks:
        rows.append(one(hidden, width, k, batch, sc, variants, a.peak_tflops * 1e12, a.bandwidth_gbps * 1e9))
        r = rows[-1]
        print(f"H {hidden:>5} F {width:>6} k {k} B {batch:>3}: seq {r['seq_s'] * 1e6:8.1f} us  fused "
              f"{r['fused_s'] * 1e6:8.1f} us  x{r['speedup']:.2f} | cost model seq {r['pred_seq_s'] * 1e6:8.1f} "
              f"fused {r['pred_fused_s'] * 1e6:8.1f} x{r['pred_speedup']:.2f} | roofline x"
              f"{r['roof_seq_s'] / r['roof_fused_s']:.2f}", flush=True)
  out = a.out or (os.path.join(os.environ["OUT"], "fusion_ffn.json") if os.environ.get("OUT") else "")
  if out:
    pathlib.Path(out).write_text(json.dumps({"device": jax.devices()[0].device_kind, "dtype": dtype,
                                             "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
  main()
