r"""What the persistent decode kernel compiles to, without a GPU: registers, spills and the
instruction mix (SASS for an H100/H200, sm_90a) per `benchmarks/segment_profile.py` variant.

  pip install triton   # only for this script: its compiler and its ptxas
  python benchmarks/kernel_sass.py --variants "full,qkv only,attention+o_proj only,ffn only" --warps 4,8

`kernels.decode_segment` is lowered for CUDA on this machine (Pallas -> Triton IR, as on the GPU),
then compiled by the pip `triton` package (not the Triton inside jaxlib that the GPU uses, so the
numbers are indicative) and assembled by its `ptxas`. A phase skipped by a variant is gone from the
code, together with the weights it would have loaded (nothing uses them), so "X only" rows show
what phase X costs in registers and instructions. Instructions are counted per thread over the
whole kernel (the layer loop body dominates). BAR = CTA barriers (cross-warp reductions and
layout conversions through shared memory), SHFL = warp shuffles (in-warp reductions).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks import segment_profile  # noqa: E402
from puzzle_jax import kernels  # noqa: E402

OPS = {"BAR": r"\bBAR\.SYNC", "SHFL": r"\bSHFL\.", "FFMA": r"\bFFMA\b", "FADD": r"\bFADD\b", "LDG": r"\bLDG\.",
       "LDS": r"\bLDS\b", "STS": r"\bSTS\b", "RED/ATOM": r"\b(RED|REDG|ATOM|ATOMG)\."}


def triton_ir(shape: tuple, layers: int, programs: int, cfg: kernels.KernelConfig = kernels.DEFAULT) -> str:
  """The Triton IR (text) of `decode_segment` built with `cfg` for one row at these shapes, with
  `programs` programs, lowered for CUDA."""
  from jax._src.pallas.triton import pallas_call_registration as reg
  N, K, S = shape[1], shape[2], shape[5]
  p, kv, h, cos, sin, mask = jax.eval_shape(lambda: segment_profile.inputs(layers, *shape, S // 2))
  seen, lower = [], reg.lowering.lower_jaxpr_to_triton_module

  def spy(*args, **kw):
    res = lower(*args, **kw)
    seen.append(res.module.operation.get_asm(enable_debug_info=False))
    return res

  cfg = dataclasses.replace(cfg, interpret=False, programs=programs)
  reg.lowering.lower_jaxpr_to_triton_module = spy
  try:
    seg = lambda h, p, kv, fl, c, s, m, i: kernels.decode_segment(
        h, p, kv, fl, c, s, m, i, attn_kind="gqa", ffn_kind="swiglu", num_heads=N, num_kv_heads=K, cfg=cfg)
    flags, index = jax.ShapeDtypeStruct((programs + 1,), jnp.int32), jax.ShapeDtypeStruct((), jnp.int32)
    jax.jit(seg).trace(h, p, kv, flags, cos, sin, mask, index).lower(lowering_platforms=("cuda",))
  finally:
    reg.lowering.lower_jaxpr_to_triton_module = lower
  if len(seen) != 1:
    raise RuntimeError(f"expected one Triton kernel, lowered {len(seen)}")
  return seen[0]


def _tool(bin_dir: pathlib.Path, names: tuple) -> pathlib.Path:
  for n in names:
    if (bin_dir / n).exists():
      return bin_dir / n
  raise FileNotFoundError(f"none of {names} in {bin_dir}")


def sass_stats(ttir: str, warps: int, work: pathlib.Path) -> dict:
  """Compile Triton IR for sm_90a: registers, spill bytes, instruction counts."""
  try:
    import triton
    from triton.backends.compiler import GPUTarget
  except ImportError as e:
    raise SystemExit("benchmarks/kernel_sass.py needs the `triton` package: pip install triton") from e
  src = work / "kernel.ttir"
  src.write_text(ttir)
  os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
  ptx = triton.compile(str(src), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": warps, "num_stages": 2}).asm["ptx"]
  (work / "kernel.ptx").write_text(ptx)
  bin_dir = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
  ptxas = _tool(bin_dir, ("ptxas-blackwell", "ptxas"))  # the newer one reads newer PTX versions
  info = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", str(work / "kernel.ptx"), "-o", str(work / "k.cubin")],
                        capture_output=True, text=True, check=True).stderr
  sass = subprocess.run([str(_tool(bin_dir, ("cuobjdump",))), "-sass", str(work / "k.cubin")],
                        capture_output=True, text=True, check=True).stdout
  body = [ln for ln in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4,}\*/\s+\S", ln)]
  num = lambda pat: int(m.group(1)) if (m := re.search(pat, info)) else None
  return {"registers": num(r"Used (\d+) registers"), "spill_bytes": num(r"(\d+) bytes spill stores"),
          "instructions": len(body), **{k: sum(bool(re.search(p, ln)) for ln in body) for k, p in OPS.items()}}


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--shape", default="576,9,3,64,1536,256", help="D,N,K,H,F,S")
  ap.add_argument("--layers", type=int, default=30)
  ap.add_argument("--programs", type=int, default=132)
  ap.add_argument("--warps", default=str(kernels.DEFAULT.persistent_warps))
  ap.add_argument("--variants", default="full,barriers only,qkv only,attention+o_proj only,ffn only")
  ap.add_argument("--out", default="")
  args = ap.parse_args(argv)
  shape = tuple(map(int, args.shape.split(",")))
  res = {"shape": args.shape, "programs": args.programs, "target": "sm_90a", "rows": {}}
  print(f"{'variant':38s} {'regs':>5s} {'spill':>6s} {'instr':>6s} " + " ".join(f"{k:>8s}" for k in OPS))
  with tempfile.TemporaryDirectory() as tmp:
    for warps in map(int, args.warps.split(",")):
      for name in args.variants.split(","):
        cfg = segment_profile.variant(name, persistent_warps=warps)
        row = sass_stats(triton_ir(shape, args.layers, args.programs, cfg), warps, pathlib.Path(tmp))
        res["rows"][f"{name} / {warps} warps"] = row
        print(f"{name + f' / {warps} warps':38s} {row['registers']:5d} {row['spill_bytes']:6d} "
              f"{row['instructions']:6d} " + " ".join(f"{row[k]:8d}" for k in OPS), flush=True)
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps(res, indent=1))
  return res


if __name__ == "__main__":
  main()
