r"""GKD step speed and MFU, and teacher-corpus generation speed.

  python benchmarks/distill.py --gguf PATH --out distill.json       # on the GPU (about 3-4 min)
  python benchmarks/distill.py --small                             # tiny, any machine

0. Correctness first: the KL / top-k KL / LM terms against numpy on random logits, and batched
   left-padded greedy generation equal to one-prompt-at-a-time generation.
1. GKD step on a SmolLM2 child (the parent with a third of its FFNs removed; real weights with
   --gguf, else random at SmolLM2 shapes), bf16 compute on float32 master weights, teacher logits on
   the fly: tokens/s, and the loss falls over the timed steps (same batch, so it must).
2. MFU of the GKD step at Llama-3.2-1B shapes (random weights, child = teacher shape, own init): model FLOPs
   = 6 x tokens x student matmul params + 2 x tokens x teacher matmul params + causal attention
   (fwd+bwd student, fwd teacher), over the H200's dense bf16 peak and over the measured matmul peak.
3. Teacher corpus (`distill.corpus.generate`, shards on local disk) until --corpus-tokens generated
   tokens in this one call: tokens/s over the whole call, compile included.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.bld import matmul_peak
from puzzle_jax import training
from puzzle_jax.core import model
from puzzle_jax.core.arch import BlockSpec, spec_from_key, uniform_arch
from puzzle_jax.distill import corpus, gkd

H200_BF16_DENSE_TFLOPS = 989.0  # NVIDIA spec sheet, dense (no sparsity)
SMOLLM2 = dict(vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3,
               intermediate_size=1536, tie_embeddings=True)
LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8,
                intermediate_size=8192, tie_embeddings=True)
SIZES = {
    "gpu": dict(smol_bl=(16, 1024), big_bl=(8, 1024), steps=10, corpus_tokens=10_000_000,
                corpus=dict(batch_size=1024, prompt_len=64, max_new_tokens=256)),
    "small": dict(smol_bl=(2, 64), big_bl=(2, 64), steps=3, corpus_tokens=2_000, layers=2,
                  big=dict(vocab_size=4096, hidden_size=256, num_heads=8, num_kv_heads=2, intermediate_size=512),
                  corpus=dict(batch_size=8, prompt_len=16, max_new_tokens=32)),
}


# ----------------------------------------------------------------------------- correctness
def check_losses() -> float:
  """Largest relative error of the GKD terms against numpy."""
  rng = np.random.default_rng(0)
  t, s = rng.normal(size=(2, 3, 50)) * 3, rng.normal(size=(2, 3, 50)) * 3
  lsm = lambda x: (x - x.max(-1, keepdims=True)) - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))
  tl, sl = lsm(t / 2), lsm(s / 2)
  want_kl = (np.exp(tl) * (tl - sl)).sum(-1) * 4
  idx = np.argsort(-t, -1)[..., :5]
  coarse = lambda lp: np.log(np.concatenate([np.exp(np.take_along_axis(lp, idx, -1)),
                                             1 - np.exp(np.take_along_axis(lp, idx, -1)).sum(-1, keepdims=True)], -1))
  want_topk = (np.exp(coarse(lsm(t))) * (coarse(lsm(t)) - coarse(lsm(s)))).sum(-1)
  tokens = rng.integers(0, 50, (2, 3))
  want_lm = -np.take_along_axis(lsm(s[:, :-1]), tokens[:, 1:, None], -1)[..., 0]
  errs = [np.max(np.abs(np.asarray(got) - want) / np.abs(want)) for got, want in (
      (gkd.kl_per_token(t, s, 2.0), want_kl), (gkd.kl_per_token(t, s, 1.0, 5), want_topk),
      (gkd.lm_per_token(s, tokens), want_lm))]
  assert max(errs) < 1e-4, f"GKD loss terms disagree with numpy: {errs}"
  return float(max(errs))


def check_generation(arch, params) -> bool:
  """Left-padded batched greedy decoding == each prompt alone (what the corpus relies on)."""
  rows = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
  tokens, mask = corpus.left_pad(rows)
  with jax.default_matmul_precision("highest"):  # no TF32: batch shapes must not flip near-ties
    batched = np.asarray(model.generate(arch, params, tokens, mask, max_new_tokens=8, dtype=jnp.float32))
    for r, got in zip(rows, batched):
      alone = np.asarray(model.generate(arch, params, np.asarray([r], np.int32), max_new_tokens=8,
                                        dtype=jnp.float32))[0]
      assert np.array_equal(got, alone), f"batched {got} != alone {alone}"
  return True


# ----------------------------------------------------------------------------- GKD speed
def smollm2(gguf: str | None, layers: int | None):
  from puzzle_jax import io
  if gguf:
    arch, params = io.load_pretrained(gguf, dtype=jnp.float32)
    weights = "real (GGUF)"
  else:
    arch = uniform_arch(**SMOLLM2)
    params = model.init_params(jax.random.PRNGKey(0), arch)
    weights = "random"
  if layers:
    arch = dataclasses.replace(arch, blocks=arch.blocks[:layers])
    params = {**params, "model": {**params["model"], "layers": params["model"]["layers"][:layers]}}
  return arch, params, weights


def child_without_ffns(arch, params, every: int = 3):
  """The parent with every `every`-th FFN removed (a stand-in for a realized Puzzle child)."""
  noop = spec_from_key("ffn/noop")
  blocks = tuple(BlockSpec(b.attn, noop) if i % every == every - 1 else b for i, b in enumerate(arch.blocks))
  layers = [{k: v for k, v in l.items() if k not in model.FFN_KEYS} if i % every == every - 1 else l
            for i, l in enumerate(params["model"]["layers"])]
  return dataclasses.replace(arch, blocks=blocks), {**params, "model": {**params["model"], "layers": layers}}


def time_gkd(child_arch, child, arch, teacher, B: int, L: int, steps: int) -> dict:
  cfg = gkd.GKDConfig(steps=1000, batch_size=B, seq_len=L, lr=1e-4, warmup_steps=1, compute_dtype="bfloat16")
  mesh = training.make_mesh((("data", 1),), jax.devices()[:1])
  opt = gkd.make_optimizer(cfg)
  state = jax.jit(lambda p: gkd.init_state(p, opt))(child)
  teacher = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.bfloat16), teacher)
  step = gkd.compile_step(child_arch, arch, cfg, opt, mesh, state, teacher)
  tokens = np.random.default_rng(0).integers(0, arch.vocab_size, (B, L)).astype(np.int32)
  t0 = time.perf_counter()
  state, m = step(state, teacher, tokens)
  first = float(m["loss"])
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(steps):
    state, m = step(state, teacher, tokens)
  last = float(m["loss"])  # blocks
  dt = (time.perf_counter() - t0) / steps
  assert np.isfinite(last) and last < first, f"GKD loss did not fall on a repeated batch: {first} -> {last}"
  return {"batch": [B, L], "step_s": dt, "tokens_per_s": B * L / dt, "compile_s": compile_s,
          "loss_first": first, "loss_last": last}


def gkd_flops(child_arch, arch, B: int, L: int) -> float:
  """Matmul FLOPs of one step: student fwd+bwd (6x), teacher fwd (2x), causal attention both."""
  def matmul_params(a):
    emb = a.vocab_size * a.hidden_size  # the LM head matmul (the embedding lookup is free)
    return sum(a.attn_params(b.attn) + a.ffn_params(b.ffn) for b in a.blocks) + emb

  def attn(a):  # QK^T and AV, causal half: 2 matmuls x 2 FLOPs x L^2/2 x heads x head_dim
    n_attn = sum(b.attn.kind == "gqa" for b in a.blocks)
    return 2 * 2 * B * L * L // 2 * a.num_heads * a.head_dim * n_attn

  return 6 * B * L * matmul_params(child_arch) + 3 * attn(child_arch) + 2 * B * L * matmul_params(arch) + attn(arch)


# ----------------------------------------------------------------------------- corpus speed
def time_corpus(arch, params, tok, stream, num_tokens: int, sizes: dict) -> dict:
  cfg = corpus.CorpusConfig(num_tokens=num_tokens, temperature=1.0, top_p=0.95, dtype="bfloat16",
                            chat_fraction=0.5 if tok is not None else 0.0, **sizes)
  params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
  with tempfile.TemporaryDirectory() as d:
    t0 = time.perf_counter()
    doc = corpus.generate(arch, params, stream, cfg, pathlib.Path(d), tok)
    wall = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in pathlib.Path(d).glob("*.array_record"))
  return {"config": dataclasses.asdict(cfg), "generated_tokens": doc["generated_tokens"], "shards": doc["shards"],
          "wall_s": wall, "tokens_per_s": doc["generated_tokens"] / wall, "bytes_on_disk": size}


def prompt_stream(gguf: str | None, vocab: int):
  """Real WikiText-2 tokens and the tokenizer with --gguf; random tokens otherwise."""
  if gguf:
    from puzzle_jax.io.tokenizer import load_tokenizer
    tok = load_tokenizer(gguf)
    text = (pathlib.Path(__file__).resolve().parents[1] / "data" / "wikitext2" / "valid.txt").read_text()
    return tok, np.asarray(tok.encode(text[:2_000_000]), np.int32)
  return None, np.random.default_rng(0).integers(0, vocab, 100_000).astype(np.int32)


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser()
  ap.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke run)")
  ap.add_argument("--gguf", default=None, help="SmolLM2 GGUF: real weights, tokenizer and prompts")
  ap.add_argument("--corpus-tokens", type=int, default=None, help="tokens to generate (default 10M on GPU)")
  ap.add_argument("--out", default=None, help="JSON path (default $OUT/distill.json when $OUT is set)")
  args = ap.parse_args(argv)
  sz = SIZES["small" if args.small else "gpu"]
  arch, params, weights = smollm2(args.gguf, sz.get("layers"))
  res = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(), "weights": weights,
         "loss_terms_max_rel_err": check_losses(), "generation_batched_equals_alone": check_generation(arch, params)}
  child_arch, child = child_without_ffns(arch, params, every=min(3, arch.num_layers))
  res["gkd_smollm2"] = {**time_gkd(child_arch, child, arch, params, *sz["smol_bl"], sz["steps"]),
                        "child_params": child_arch.num_params(), "parent_params": arch.num_params()}
  big = uniform_arch(**{**LLAMA_1B, **sz.get("big", {}), **({"num_layers": sz["layers"]} if "layers" in sz else {})})
  teacher = model.init_params(jax.random.PRNGKey(1), big, jnp.bfloat16)
  r = time_gkd(big, model.init_params(jax.random.PRNGKey(2), big), big, teacher, *sz["big_bl"], sz["steps"])
  del teacher
  peak = matmul_peak()
  flops = gkd_flops(big, big, *sz["big_bl"])
  res["gkd_1b"] = {**r, "params": big.num_params(), "model_tflops_per_step": flops / 1e12,
                   "tflops": flops / r["step_s"] / 1e12, "measured_matmul_peak_tflops": peak / 1e12,
                   "mfu_vs_spec": flops / r["step_s"] / 1e12 / H200_BF16_DENSE_TFLOPS,
                   "mfu_vs_measured_peak": flops / r["step_s"] / peak}
  tok, stream = prompt_stream(args.gguf, arch.vocab_size)
  res["corpus"] = time_corpus(arch, params, tok, stream, args.corpus_tokens or sz["corpus_tokens"], sz["corpus"])
  _print(res)
  out = args.out or (os.path.join(os.environ["OUT"], "distill.json") if os.environ.get("OUT") else None)
  if out:
    with open(out, "w") as f:
      json.dump(res, f, indent=1)
  return res


def _print(res: dict) -> None:
  s, b, c = res["gkd_smollm2"], res["gkd_1b"], res["corpus"]
  print(f"\ndevice {res['device']} ({res['weights']} SmolLM2 weights); loss terms vs numpy max rel err "
        f"{res['loss_terms_max_rel_err']:.1e}; batched generation == alone: {res['generation_batched_equals_alone']}")
  print(f"{'GKD step':<26} {'batch':>10} {'step ms':>9} {'tokens/s':>11} {'TFLOP/s':>8} {'MFU spec':>9} {'MFU meas.':>9}")
  print(f"{'SmolLM2 child bf16':<26} {str(s['batch']):>10} {s['step_s'] * 1e3:>9.1f} {s['tokens_per_s']:>11,.0f}")
  print(f"{'Llama-3.2-1B shape bf16':<26} {str(b['batch']):>10} {b['step_s'] * 1e3:>9.1f} {b['tokens_per_s']:>11,.0f} "
        f"{b['tflops']:>8.1f} {100 * b['mfu_vs_spec']:>8.1f}% {100 * b['mfu_vs_measured_peak']:>8.1f}%")
  print(f"teacher corpus: {c['generated_tokens']:,} tokens in {c['shards']} shards, {c['wall_s']:.1f}s "
        f"(compile included): {c['tokens_per_s']:,.0f} tokens/s, {c['bytes_on_disk'] / 1e6:.1f} MB")


if __name__ == "__main__":
  main()
