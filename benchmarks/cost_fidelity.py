r"""Cost-model fidelity: predicted (fixed + sum of measured sub-block costs) vs the measured whole model.

  python benchmarks/cost_fidelity.py --out fidelity.json            # on the H100
  python benchmarks/cost_fidelity.py --quick                        # tiny, any machine

Children: the SmolLM2 child the CPU search chose (benchmarks/data/smollm2_cpu_child_arch.json) and a
Llama-3.1-8B-shaped heterogeneous child (mixed KV heads, no-op attention, narrower FFNs); random
weights (timing does not depend on the values). Scenario: batch 64, prompt 512, 256 generated, bf16.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib

from puzzle_jax.search import costs
from puzzle_jax.core import hf_config
from puzzle_jax.core.arch import Arch, AttnSpec, FFNSpec, uniform_arch

HERE = pathlib.Path(__file__).parent


def llama8b_child(num_layers: int = 32) -> tuple[Arch, Arch]:
  parent = uniform_arch(vocab_size=128256, hidden_size=4096, num_layers=num_layers, num_heads=32,
                        num_kv_heads=8, intermediate_size=14336, rms_eps=1e-5)
  child = parent
  for i in range(num_layers):
    attn = [AttnSpec("gqa", num_kv_heads=8), AttnSpec("gqa", num_kv_heads=4), AttnSpec("gqa", num_kv_heads=2),
            AttnSpec("noop")][i % 4 if i else 0]
    ffn = [FFNSpec("swiglu", 14336), FFNSpec("swiglu", 10752), FFNSpec("swiglu", 7168)][i % 3]
    child = child.replace_block(i, attn=attn, ffn=ffn)
  return parent, child


def fidelity(arch: Arch, scenario: costs.Scenario) -> dict:
  table = costs.cost_table(arch, costs.arch_keys(arch), scenario, progress=False)
  pred = costs.predicted_totals(arch, table)
  meas = costs.measure_model(arch, None, scenario)
  return {"predicted": pred, "measured": meas,
          "decode_ratio": pred["decode_s"] / meas["decode_s"], "prefill_ratio": pred["prefill_s"] / meas["prefill_s"]}


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--out", default=None)
  ap.add_argument("--families", default="smollm2,llama8b", help="which parent/child pairs to measure")
  args = ap.parse_args(argv)
  smol_child = hf_config.arch_from_hf(json.loads((HERE / "data" / "smollm2_cpu_child_arch.json").read_text()))
  smol_parent = dataclasses.replace(smol_child, blocks=(smol_child.blocks[0],) * smol_child.num_layers)
  p8, c8 = llama8b_child(2 if args.quick else 32)
  if args.quick:
    sc = costs.Scenario(batch=2, prompt_len=32, gen_len=16, repeats=2)
    smol_child = dataclasses.replace(smol_child, blocks=smol_child.blocks[:3])
    smol_parent = dataclasses.replace(smol_parent, blocks=smol_parent.blocks[:3])
  else:
    # few weight copies per timed loop: each copy is unrolled in the loop body (compile time)
    sc = costs.Scenario(batch=64, prompt_len=512, gen_len=256, repeats=5, warmup=1, max_copies=4)
  res = {"scenario": dataclasses.asdict(sc)}
  fams = args.families.split(",")
  archs = {"smollm2_parent": smol_parent, "smollm2_child": smol_child, "llama8b_parent": p8, "llama8b_child": c8}
  for name, arch in archs.items():
    if name.split("_")[0] in fams:
      res[name] = fidelity(arch, sc)
      print(name, {k: round(v, 4) for k, v in res[name].items() if k.endswith("ratio")}, flush=True)
  print(f"{'model':<16} {'pred decode ms':>15} {'meas decode ms':>15} {'ratio':>6} {'pred prefill ms':>16} "
        f"{'meas prefill ms':>16} {'ratio':>6}")
  for name in [n for n in archs if n in res]:
    r = res[name]
    print(f"{name:<16} {r['predicted']['decode_s'] * 1e3:>15.3f} {r['measured']['decode_s'] * 1e3:>15.3f} "
          f"{r['decode_ratio']:>6.3f} {r['predicted']['prefill_s'] * 1e3:>16.2f} "
          f"{r['measured']['prefill_s'] * 1e3:>16.2f} {r['prefill_ratio']:>6.3f}")
  for fam in fams:
    pr = res[f"{fam}_parent"]["predicted"]["decode_s"] / res[f"{fam}_child"]["predicted"]["decode_s"]
    ms = res[f"{fam}_parent"]["measured"]["decode_s"] / res[f"{fam}_child"]["measured"]["decode_s"]
    print(f"{fam}: decode speedup child vs parent predicted {pr:.3f}x, measured {ms:.3f}x")
    res[f"{fam}_speedup"] = {"predicted": pr, "measured": ms}
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps(res, indent=1))
  return res


if __name__ == "__main__":
  main()
