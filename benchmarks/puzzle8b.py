r"""Issue #5: a Llama-3.1-8B-shaped parent (random weights) and the child the MIP picks from sub-block
costs the PyTorch harness measured on an H100: measured decode speedup at batch 64 vs predicted.

  # here (CPU, seconds): the parent's config-only export and proxy quality scores, both committed
  python benchmarks/puzzle8b.py parent --out benchmarks/data/llama8b_parent
  python benchmarks/puzzle8b.py proxy-scores --src workdirs/torchcost/scores/scores.json \
      --out benchmarks/data/llama8b_proxy_scores.json
  # H100: cost table of every candidate variant, the MIP's child, both timed on random weights
  python -m puzzle_jax.serving costs --arch-from benchmarks/data/llama8b_parent \
      --keys $(python benchmarks/puzzle8b.py keys --parent benchmarks/data/llama8b_parent) \
      --batch 64 --prompt-len 512 --gen-len 128 --out OUT/costs.json
  python benchmarks/puzzle8b.py select --parent benchmarks/data/llama8b_parent \
      --scores benchmarks/data/llama8b_proxy_scores.json --costs OUT/costs.json --target 1.5 --out OUT
  python -m puzzle_jax.serving measure --parent benchmarks/data/llama8b_parent --child OUT/child \
      --random-weights --decode-batches 1,64 --prefill-grid 4x1024 --out OUT/measure.json  # gpu_suite.sh k

Quality scores. Random weights have none, so the 8B candidates get SmolLM2-135M's measured
replace-1-block scores, transferred: 8B layer i takes SmolLM2 layer round(i * 29 / 31); linear and
no-op variants copy SmolLM2's; a variant keeping a fraction of the parent's KV heads or FFN width
(kv / 8, width / 14336) interpolates linearly in that fraction between the SmolLM2 variants around
it (the full variant at fraction 1 scores 0 if SmolLM2's is missing; below SmolLM2's smallest
fraction, the linear replacement stands at fraction 0). A proxy, so the child is plausible, not
good: what is measured here is speed, predicted against real.
"""

from __future__ import annotations

import os
import pathlib
import sys

if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")  # nothing here needs an accelerator: leave the GPU to torch
  if not __package__:  # run as a file: make the repo root (and so `benchmarks`) importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import argparse
import dataclasses
import json
import re
from typing import Any, Mapping, Sequence

import numpy as np

from puzzle_jax.search import candidates as cands
from puzzle_jax import export
from puzzle_jax.search import costs
from puzzle_jax.search import mip
from puzzle_jax.search import realize
from puzzle_jax.search import scoring
from puzzle_jax.search import select as search
from puzzle_jax.core import hf_config
from puzzle_jax.core.arch import Arch, AttnSpec, FFNSpec, RopeSpec, spec_from_key
from puzzle_jax.artifacts import write_json

REPO = pathlib.Path(__file__).resolve().parents[1]
SMOLLM2_ARCH = REPO / "benchmarks" / "data" / "smollm2_parent"
# KV heads 8/4/2/1 (every divisor), FFN widths 14336/10752/7168/3584, linear and no-op of each.
LIBRARY = cands.LibraryConfig(ffn_fractions=(0.75, 0.5, 0.25))
LLAMA31_ROPE = RopeSpec(theta=500000.0, rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                        high_freq_factor=4.0, original_max_position=8192)
ZERO_LOSS = {"kl": 0.0, "lm_loss_delta": 0.0, "one_minus_top1": 0.0, "top1": 1.0}  # a missing full variant
_ID = re.compile(r"L(\d+)/(.+)")


# ----------------------------------------------------------------------------- architectures
def llama31_8b() -> Arch:
  """Llama-3.1-8B's shapes (benchmarks/inference.py's 8B) with its llama3 RoPE scaling and context."""
  from benchmarks.inference import llama8b
  return dataclasses.replace(llama8b(tiny=False), rope=LLAMA31_ROPE, max_position=131072)


def load_arch(export_dir: str | os.PathLike) -> Arch:
  return hf_config.arch_from_hf(_config(export_dir))


def _config(export_dir: str | os.PathLike) -> dict[str, Any]:
  return json.loads((pathlib.Path(export_dir) / export.CONFIG_FILE).read_text())


def candidate_set(arch: Arch) -> cands.CandidateSet:
  """The project's candidate library of `arch` under LIBRARY, without params (the MIP needs none)."""
  return cands.CandidateSet(arch, cands.build_library(arch, LIBRARY))


def write_parent(out: str | os.PathLike) -> pathlib.Path:
  return export.export_config(llama31_8b(), out, dtype="bfloat16", code=False)  # harness brings the code


# ----------------------------------------------------------------------------- proxy scores
def fraction(spec: AttnSpec | FFNSpec, parent: AttnSpec | FFNSpec) -> float | None:
  """Share of the parent's KV heads (GQA) or FFN width (SwiGLU) a variant keeps; None for other kinds."""
  if spec.kind != parent.kind:
    return None
  if spec.kind == "gqa" and spec.window == parent.window:
    return spec.num_kv_heads / parent.num_kv_heads
  if spec.kind == "swiglu":
    return spec.intermediate_size / parent.intermediate_size
  return None


def source_layer(layer: int, num_layers: int, src_layers: int) -> int:
  """The source layer at the same relative depth (first to first, last to last)."""
  return int(round(layer * (src_layers - 1) / max(num_layers - 1, 1)))


def _by_layer(scores: Mapping[str, Mapping[str, float]]) -> dict[int, dict[str, Mapping[str, float]]]:
  """{layer: {variant key: score entry}} from candidate ids "L007/attn/gqa_kv1"."""
  out: dict[int, dict[str, Mapping[str, float]]] = {}
  for cid, entry in scores.items():
    m = _ID.fullmatch(cid)
    if not m:
      raise ValueError(f"score id {cid!r} is not 'L<layer>/<variant key>'")
    out.setdefault(int(m.group(1)), {})[m.group(2)] = entry
  return out


def _anchors(src: Arch, layer: int, sub: str, entries: Mapping[str, Mapping[str, float]]) -> dict[float, Mapping]:
  """{fraction: score entry} of one source (layer, sub-block): its fractional variants, the full one
  (zero loss if unscored) and the linear replacement at fraction 0."""
  parent = cands.parent_spec(src, layer, sub)
  points = {1.0: ZERO_LOSS}
  for key, entry in entries.items():
    if key.startswith(f"{sub}/"):
      f = fraction(spec_from_key(key), parent)
      if f is not None:
        points[f] = entry
  linear = entries.get(f"{sub}/linear")
  if linear is None:
    raise KeyError(f"source layer {layer} has no {sub}/linear score: the anchor at fraction 0")
  return {0.0: linear, **points}


def interpolate(points: Mapping[float, Mapping[str, float]], frac: float) -> dict[str, float]:
  """Every field all points share, linear in the fraction (np.interp; exact at a point)."""
  xs = sorted(points)
  fields = set.intersection(*(set(points[x]) for x in xs))
  return {k: float(np.interp(frac, xs, [float(points[x][k]) for x in xs])) for k in sorted(fields)}


def proxy_scores(scores: Mapping[str, Mapping[str, float]], src: Arch, library: cands.CandidateSet) -> dict:
  """Scores (scores/v1 entries) of every candidate of `library`, transferred from `src`'s (see docstring)."""
  by_layer = _by_layer(scores)
  if sorted(by_layer) != list(range(src.num_layers)):
    raise ValueError(f"source scores cover layers {sorted(by_layer)[:3]}..., the source arch has "
                     f"{src.num_layers}; pass the arch the scores were measured on")
  out = {}
  n = library.arch.num_layers
  for c in library.candidates:
    s = source_layer(c.layer, n, src.num_layers)
    frac = fraction(c.spec, cands.parent_spec(library.arch, c.layer, c.sub))
    if frac is not None:
      out[c.id] = interpolate(_anchors(src, s, c.sub, by_layer[s]), frac)
    elif c.key in by_layer[s]:
      out[c.id] = {k: float(v) for k, v in by_layer[s][c.key].items()}
    else:
      raise KeyError(f"{c.id}: no source score for {c.key} at layer {s} and no fraction to interpolate in")
  return out


def write_proxy_scores(src_path: str | os.PathLike, out: str | os.PathLike, *, parent: Arch | None = None,
                       src_arch: str | os.PathLike = SMOLLM2_ARCH) -> pathlib.Path:
  library = candidate_set(parent or llama31_8b())
  src = load_arch(src_arch)
  src_doc = json.loads(pathlib.Path(src_path).read_text())
  scores = proxy_scores(src_doc["scores"], src, library)
  n = library.arch.num_layers
  meta = {"note": (f"PROXY: transferred from the measured replace-1-block scores of {_shown(src_path)} "
                   f"({src.num_layers}-layer SmolLM2-135M), not measured on this {n}-layer model (random "
                   "weights have no quality). Layer i takes source layer round(i * (n_src - 1) / (n - 1)); "
                   "linear/no-op copy the source's; GQA KV-head and SwiGLU width fractions interpolate "
                   "linearly between the source's variants (full = 1, linear = 0)."),
          "source": _shown(src_path), "source_arch": _shown(src_arch),
          "source_meta": {k: v for k, v in src_doc.items() if k not in ("format", "scores")},
          "layer_map": [source_layer(i, n, src.num_layers) for i in range(n)], "keys": library.keys}
  path = pathlib.Path(out)
  scoring.save_scores(path, scores, meta)
  return path


def _shown(path: str | os.PathLike) -> str:
  """A path as recorded in committed files: relative to the repo when inside it."""
  p = pathlib.Path(path).resolve()
  return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(path)


# ----------------------------------------------------------------------------- selection
def select(parent_dir: str | os.PathLike, scores_path: str | os.PathLike, costs_path: str | os.PathLike,
           target: float, out: str | os.PathLike, *, solver: str = "HIGHS") -> dict[str, Any]:
  """Solve for `target` decode speedup (layer 0's attention kept); write out/child (config-only),
  out/solution.json and out/choices.png; return the solution document."""
  out = pathlib.Path(out)
  arch = load_arch(parent_dir)
  library = candidate_set(arch)
  table = costs.load_cost_table(costs_path, arch, library.keys)
  problem = search.build_problem(library, scoring.load_scores(pathlib.Path(scores_path)), table, "kl",
                                 search.Targets(decode_speedup=target, keep_first_attn=True))
  sol = problem.solve(solver=solver)
  doc = {**search.solution_doc(sol, problem), "target_decode_speedup": target, "scenario": table["scenario"],
         "cost_table": {k: table.get(k) for k in ("backend", "device", "harness")},
         "inputs": {"parent": str(parent_dir), "scores": str(scores_path), "costs": str(costs_path)}}
  child = realize.child_arch(arch, sol.choices)
  export.export_config(child, out / "child", dtype=_config(parent_dir).get("torch_dtype") or "bfloat16",
                       code=False)
  write_json(out / "solution.json", doc)
  mip.plot_choices(sol, problem.layers, out / "choices.png",
                   title=f"{arch.num_layers}-layer child: {doc['predicted_decode_speedup']:.2f}x predicted decode "
                         f"speedup (target {target}x)")
  return doc


def summary(doc: Mapping[str, Any], out: str | os.PathLike) -> str:
  sc = doc["scenario"]
  return (f"select: {doc['status']}, proxy KL {doc['objective']:.4f}, predicted decode "
          f"{doc['predicted_decode_speedup']:.3f}x (target {doc['target_decode_speedup']}x), prefill "
          f"{doc['predicted_prefill_speedup']:.3f}x at batch {sc['batch']}, prompt {sc['prompt_len']}, "
          f"gen {sc['gen_len']} ({doc['cost_table']['device']}) -> {pathlib.Path(out) / 'child'}")


# ----------------------------------------------------------------------------- CLI
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(prog="benchmarks/puzzle8b.py", description=__doc__.split("\n\n")[0])
  sub = ap.add_subparsers(dest="cmd", required=True)
  p = sub.add_parser("parent", help="config-only export of the Llama-3.1-8B-shaped parent")
  p.add_argument("--out", required=True)
  k = sub.add_parser("keys", help="print the candidate variant keys, comma-separated (for harness costs --keys)")
  k.add_argument("--parent", required=True, help="exported parent directory")
  s = sub.add_parser("proxy-scores", help="8B candidate scores transferred from SmolLM2-135M's")
  s.add_argument("--src", required=True, help="SmolLM2 scores.json (puzzle_jax.scores/v1)")
  s.add_argument("--src-arch", default=str(SMOLLM2_ARCH), help="export dir of the arch the scores are of")
  s.add_argument("--parent", default=None, help="exported parent directory (default: the 8B shapes)")
  s.add_argument("--out", required=True)
  m = sub.add_parser("select", help="MIP child for a decode-speedup target")
  m.add_argument("--parent", required=True, help="exported parent directory")
  m.add_argument("--scores", required=True, help="scores/v1 JSON covering every candidate")
  m.add_argument("--costs", required=True, help="costs/v1 JSON covering every candidate variant")
  m.add_argument("--target", type=float, required=True, help="decode speedup over the parent")
  m.add_argument("--solver", default="HIGHS")
  m.add_argument("--out", required=True, help="directory for child/, solution.json, choices.png")
  return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> Any:
  args = parse_args(argv)
  if args.cmd == "parent":
    path = write_parent(args.out)
    print(f"parent: {load_arch(path).num_params() / 1e9:.2f}B params -> {path}")
    return path
  if args.cmd == "keys":
    keys = candidate_set(load_arch(args.parent)).keys
    print(",".join(keys))
    return keys
  if args.cmd == "proxy-scores":
    parent = load_arch(args.parent) if args.parent else None
    path = write_proxy_scores(args.src, args.out, parent=parent, src_arch=args.src_arch)
    print(f"proxy-scores: {len(scoring.load_scores(path))} candidates -> {path}")
    return path
  doc = select(args.parent, args.scores, args.costs, args.target, args.out, solver=args.solver)
  print(summary(doc, args.out))
  return doc


if __name__ == "__main__":
  main()
