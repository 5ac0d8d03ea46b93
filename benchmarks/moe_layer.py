r"""MoE layer tokens/s at gpt-oss-20b layer shapes: our JAX grouped MoE vs transformers' GptOssMLP.

  python benchmarks/moe_layer.py                 # H200: hidden 2880, 32 experts, top-4, width 2880, bf16
  python benchmarks/moe_layer.py --small         # this CPU: a tiny layer, same code path

Same random weights on both sides (transformers' `GptOssMLP` built from a `GptOssConfig`, its tensors
copied into our params). Correctness first: outputs compared (relative L2 error and the fraction of
tokens whose top-k expert set agrees) on the first token count, then timings (median of repeats
after a warm-up) for each token count, for every experts implementation transformers offers
(eager loop over hit experts, batched_mm, grouped_mm). Writes $OUT/moe_layer.json when $OUT is set.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import write_out
from benchmarks.forward import median_time
from puzzle_jax.moe import layer as moe_layer

SHAPES = dict(hidden_size=2880, intermediate_size=2880, num_local_experts=32, num_experts_per_tok=4)
SMALL = dict(hidden_size=64, intermediate_size=64, num_local_experts=8, num_experts_per_tok=2)


def hf_mlp(shape: dict, dtype, device):
  import torch
  from transformers import GptOssConfig
  from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP
  cfg = GptOssConfig(num_hidden_layers=1, vocab_size=32, **shape)
  cfg._experts_implementation = "eager"
  torch.manual_seed(0)
  m = GptOssMLP(cfg)
  with torch.no_grad():
    for name, p in m.named_parameters():
      fan_in = p.shape[-2] if ("experts" in name and p.ndim == 3) else p.shape[-1]
      p.copy_(torch.randn_like(p) / np.sqrt(fan_in) if p.ndim > 1 else 0.1 * torch.randn_like(p))
  return m.to(device=device, dtype=dtype).eval()


def set_impl(m, impl: str):
  """The experts module reads `config._experts_implementation` at each call."""
  m.experts.config._experts_implementation = impl
  return m


def params_from_hf(m, dtype) -> dict:
  t = lambda x: jnp.asarray(x.detach().float().cpu().numpy(), dtype)
  e = m.experts
  return {"router": {"weight": t(m.router.weight), "bias": t(m.router.bias)},
          "experts": {"gate_up_proj": t(e.gate_up_proj), "gate_up_proj_bias": t(e.gate_up_proj_bias),
                      "down_proj": t(e.down_proj), "down_proj_bias": t(e.down_proj_bias)}}


def main(argv=None) -> dict:
  import torch
  ap = argparse.ArgumentParser()
  ap.add_argument("--small", action="store_true", help="tiny layer for a CPU smoke run")
  ap.add_argument("--tokens", type=int, nargs="*", default=None, help="token counts (batch x seq)")
  ap.add_argument("--repeats", type=int, default=10)
  args = ap.parse_args(argv)
  shape = SMALL if args.small else SHAPES
  tokens = args.tokens or ([64, 256] if args.small else [256, 2048, 8192, 32768])
  device = "cuda" if torch.cuda.is_available() else "cpu"
  tdt = torch.float32 if args.small else torch.bfloat16
  jdt = jnp.float32 if args.small else jnp.bfloat16
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  hf = hf_mlp(shape, tdt, device)
  params = params_from_hf(hf, jdt)
  k = shape["num_experts_per_tok"]
  fwd = jax.jit(moe_layer.moe_apply, static_argnums=2)
  rows = []
  result = {"device": jax.devices()[0].device_kind, "shape": shape, "dtype": str(jnp.dtype(jdt)), "rows": rows}
  for i, T in enumerate(tokens):
    x_np = np.random.default_rng(T).standard_normal((1, T, shape["hidden_size"])).astype(np.float32)
    x_j = jnp.asarray(x_np, jdt)
    x_t = torch.from_numpy(x_np).to(device=device, dtype=tdt)
    row = {"tokens": T}
    with torch.inference_mode():
      if i == 0:
        ref = set_impl(hf, "eager")(x_t)[0].float().cpu().numpy()
        ours = np.asarray(fwd(params, x_j, k), np.float32)
        result["rel_l2_err_vs_transformers"] = rel = float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))
        print(f"correctness vs transformers eager ({T} tokens): relative L2 error {rel:.2e}")
        # bf16: a token whose k-th and (k+1)-th router logits nearly tie may pick another expert.
        assert rel < (1e-4 if args.small else 3e-2), "JAX MoE disagrees with transformers"
      for name in ("eager", "batched_mm", "grouped_mm"):
        # batched_mm gathers one weight matrix per (token, expert): T*k*D*3F elements.
        if name == "batched_mm" and T * k * 3 * shape["hidden_size"] * shape["intermediate_size"] * 2 > 20e9:
          row[f"hf_{name}_tok_s"] = None
          continue
        try:
          m = set_impl(hf, name)
          m(x_t)  # warm-up
          row[f"hf_{name}_tok_s"] = T / median_time(lambda: (m(x_t), sync()), args.repeats)
        except Exception as e:  # an implementation this torch build lacks
          row[f"hf_{name}_tok_s"] = None
          print(f"transformers {name}: {type(e).__name__}: {e}"[:200])
    fwd(params, x_j, k).block_until_ready()  # compile
    row["jax_tok_s"] = T / median_time(lambda: fwd(params, x_j, k).block_until_ready(), args.repeats)
    rows.append(row)
  cols = ["jax", "hf_eager", "hf_batched_mm", "hf_grouped_mm"]
  print(f"{'tokens':>7} " + " ".join(f"{c + ' tok/s':>18}" for c in cols))
  for r in rows:
    print(f"{r['tokens']:>7} " + " ".join(f"{r[c + '_tok_s'] or float('nan'):>18,.0f}" for c in cols))
  write_out("moe_layer.json", result)
  return result


if __name__ == "__main__":
  main()
