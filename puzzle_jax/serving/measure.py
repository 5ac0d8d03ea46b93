"""Serving measurements of an exported model in PyTorch: prefill and decode throughput on the
static runner, a request workload (requests/s, tokens per request: a child that writes longer
answers is not credited with per-token speed alone, the gpt-oss-puzzle paper's request-level
metric), and a greedy check of the runner against HF `generate`.
"""

from __future__ import annotations

import dataclasses
import gc
import pathlib
import time
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from puzzle_jax.serving.load import eos_ids_of, load_model
from puzzle_jax.serving.runner import BUCKET, StaticRunner, hf_generate

DEFAULT_PROMPTS = [f"{ask} {topic}" for ask in ("Explain in a few sentences:", "Give three facts about")
                   for topic in (
    "photosynthesis", "the French Revolution", "black holes", "how vaccines work", "the water cycle",
    "binary search", "plate tectonics", "the Roman Empire", "inflation in economics", "DNA replication",
    "the theory of relativity", "climate change", "how a CPU works", "the Great Wall of China",
    "volcanoes", "the human heart", "machine learning", "the Moon landing", "honey bees",
    "the printing press", "electric cars", "the Amazon rainforest", "prime numbers", "Shakespeare",
    "the immune system", "solar panels", "the Internet", "earthquakes", "the Renaissance",
    "coffee", "the periodic table", "ocean tides")]


# ----------------------------------------------------------------------------- timing helpers
def sync(device: torch.device) -> None:
  if device.type == "cuda":
    torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
  """Seconds of one call: CUDA events on the GPU, wall clock (after a sync) elsewhere."""
  if device.type == "cuda":
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def summary(times: Sequence[float]) -> dict[str, float]:
  t = np.asarray(times, np.float64)
  q25, q75 = np.percentile(t, [25, 75])
  return {"s": float(np.median(t)), "min": float(t.min()), "iqr": float(q75 - q25)}


def reset_peak(device: torch.device) -> None:
  gc.collect()  # runners of earlier measurements (a compiled step holds a cycle) release their memory
  if device.type == "cuda":
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)


def peak(device: torch.device) -> int | None:
  return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def resolve_mode(mode: str, device: torch.device) -> str:
  if mode not in ("graphs", "compile", "eager"):
    raise ValueError(f"mode must be 'graphs', 'compile' or 'eager', got {mode!r}")
  return mode if device.type == "cuda" else "eager"


IMPL = {
    "graphs": "static KV cache; one decode step (embed, layers, LM head, greedy argmax, feedback) captured "
              "as a torch.cuda.CUDAGraph per key bucket and replayed; prefill: one CUDA graph per shape",
    "compile": "static KV cache; the same decode step under torch.compile(mode='reduce-overhead') "
               "(cudagraph trees); prefill: one CUDA graph per shape",
    "eager": "static KV cache; the same step run eagerly (no graphs); prefill eager",
}


# ----------------------------------------------------------------------------- measure_model
def _model_info(model: torch.nn.Module, path: str | None) -> dict[str, Any]:
  base = model.model
  kv_tok = sum(2 * base.layers[i].self_attn.num_kv_heads * model.config.head_dim for i in base.attention_layers)
  return {"path": path, "params": sum(p.numel() for p in model.parameters()), "layers": len(base.layers),
          "attention_layers": len(base.attention_layers),
          "kv_bytes_per_token": kv_tok * next(model.parameters()).element_size()}


def _as_model(model_or_dir, dtype: torch.dtype, device: torch.device | None) -> tuple[torch.nn.Module, str | None]:
  if isinstance(model_or_dir, torch.nn.Module):
    return model_or_dir.eval(), None
  return load_model(model_or_dir, dtype=dtype, device=device), str(model_or_dir)


def _random_tokens(vocab: int, shape: tuple[int, int], seed: int, device: torch.device) -> torch.Tensor:
  g = torch.Generator().manual_seed(seed)
  return torch.randint(0, vocab, shape, generator=g).to(device)


def measure_prefill(model: torch.nn.Module, batch: int, prompt_len: int, *, mode: str, repeats: int = 5,
                    warmup: int = 2, seed: int = 0) -> dict[str, Any]:
  """Prefill tokens/s of random prompts [batch, prompt_len] (KV written, last-position logits)."""
  dev = next(model.parameters()).device
  reset_peak(dev)
  runner = StaticRunner(model, batch, prompt_len, mode=mode, capture=False)  # no decode graphs needed
  tokens = _random_tokens(model.config.vocab_size, (batch, prompt_len), seed, dev)
  fn = lambda: runner.prefill(tokens, graphed=mode != "eager")
  for _ in range(warmup):
    fn()
  sync(dev)
  stats = summary([timed(fn, dev) for _ in range(repeats)])
  out = {"batch": batch, "prompt_len": prompt_len, **stats, "repeats": repeats,
         "tokens_per_s": batch * prompt_len / stats["s"], "peak_memory_bytes": peak(dev)}
  del runner
  return out


def measure_decode(model: torch.nn.Module, batch: int, context: int, new_tokens: int, *, mode: str,
                   repeats: int = 3, warmup: int = 1, seed: int = 0) -> dict[str, Any]:
  """Greedy decode tokens/s: `new_tokens` steps after a random prompt of `context` tokens (the
  prefill is not timed). step_s is the mean step; the mean context is context + new_tokens / 2."""
  dev = next(model.parameters()).device
  reset_peak(dev)
  runner = StaticRunner(model, batch, context + new_tokens, mode=mode)  # the last step writes slot c + n - 1
  tokens = _random_tokens(model.config.vocab_size, (batch, context), seed, dev)
  times = []
  for r in range(warmup + repeats):
    runner.prefill(tokens)
    sync(dev)
    t = timed(lambda: runner.decode(new_tokens), dev)
    if r >= warmup:
      times.append(t)
  stats = summary(times)
  out = {"batch": batch, "context": context, "new_tokens": new_tokens, **stats, "repeats": repeats,
         "step_s": stats["s"] / new_tokens, "tokens_per_s": batch * new_tokens / stats["s"],
         "kv_cache_bytes": runner.kv_cache_bytes, "cache_slots": runner.slots, "peak_memory_bytes": peak(dev)}
  del runner
  return out


def measure_model(model_or_dir, *, prefill_grid: Iterable[tuple[int, int]] = ((16, 1024), (1, 1024)),
                  decode_batches: Iterable[int] = (1, 64, 256), decode_context: int = 512,
                  new_tokens: int = 128, dtype: torch.dtype = torch.bfloat16, mode: str = "graphs",
                  device: torch.device | str | None = None, repeats: int = 5, warmup: int = 2) -> dict[str, Any]:
  """Prefill tokens/s per (batch, prompt_len), decode tokens/s per batch, peak memory."""
  model, path = _as_model(model_or_dir, dtype, None if device is None else torch.device(device))
  dev = next(model.parameters()).device
  run_mode = resolve_mode(mode, dev)
  out = {"model": _model_info(model, path), "device": device_name(dev), "dtype": str(next(model.parameters()).dtype),
         "mode": run_mode, "mode_requested": mode, "impl": IMPL[run_mode], "bucket": BUCKET}
  out["prefill"] = [measure_prefill(model, b, l, mode=run_mode, repeats=repeats, warmup=warmup)
                    for b, l in prefill_grid]
  out["decode"] = [measure_decode(model, b, decode_context, new_tokens, mode=run_mode,
                                  repeats=max(1, repeats // 2 + 1), warmup=1) for b in decode_batches]
  peaks = [r["peak_memory_bytes"] for r in out["prefill"] + out["decode"] if r["peak_memory_bytes"] is not None]
  out["peak_memory_bytes"] = max(peaks) if peaks else None
  return out


def device_name(dev: torch.device) -> str:
  return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"


# ----------------------------------------------------------------------------- requests
def encode(tokenizer, prompt: str | Sequence[int]) -> list[int]:
  """A prompt as token ids; text goes through the chat template when the tokenizer has one."""
  if not isinstance(prompt, str):
    return [int(t) for t in prompt]
  if tokenizer is None:
    raise ValueError("text prompts need a tokenizer; pass token ids or a tokenizer")
  if getattr(tokenizer, "chat_template", None):
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
  return list(tokenizer(prompt)["input_ids"])


def left_pad(seqs: Sequence[Sequence[int]], batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
  """(tokens [batch, L], mask, active): left-padded; rows past len(seqs) repeat the last prompt and
  are inactive (stopped from the start, so they never hold the batch)."""
  length = max(len(s) for s in seqs)
  tokens = torch.zeros(batch, length, dtype=torch.long)
  mask = torch.zeros(batch, length, dtype=torch.bool)
  for r in range(batch):
    s = seqs[min(r, len(seqs) - 1)]
    tokens[r, length - len(s):] = torch.tensor(list(s), dtype=torch.long)
    mask[r, length - len(s):] = True
  return tokens, mask, torch.arange(batch) < len(seqs)


def measure_requests(model_or_dir, tokenizer, prompts: Sequence[str | Sequence[int]], *, batch: int,
                     max_new_tokens: int, eos_ids: Sequence[int] | None = None, mode: str = "graphs",
                     check_every: int = 8, dtype: torch.dtype = torch.bfloat16,
                     samples: int = 2) -> dict[str, Any]:
  """Request-level efficiency: the prompts in static batches of `batch` (left-padded, in order), each
  request generating greedily until a stop id or `max_new_tokens`; a batch runs until its last
  request stops. Reports requests/s, tokens/s and generated tokens per request (incl. the stop)."""
  model, _ = _as_model(model_or_dir, dtype, None)
  dev = next(model.parameters()).device
  run_mode = resolve_mode(mode, dev)
  ids = [encode(tokenizer, p) for p in prompts]
  eos = tuple(eos_ids) if eos_ids is not None else eos_ids_of(model, tokenizer)
  runner = StaticRunner(model, batch, max(len(s) for s in ids) + max_new_tokens + 1, mode=run_mode)
  groups = [list(range(i, min(i + batch, len(ids)))) for i in range(0, len(ids), batch)]

  def run(rows: list[int], cap: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokens, mask, active = left_pad([ids[j] for j in rows], batch)
    return runner.generate(tokens, mask, max_new_tokens=cap, eos_ids=eos, check_every=check_every,
                           active=active)

  run(groups[0], min(4, max_new_tokens))  # warm-up: first-use costs (cuBLAS, allocator) untimed
  sync(dev)
  new, outs = [0] * len(ids), [None] * len(ids)
  t0 = time.perf_counter()
  for rows in groups:
    out, n_gen = run(rows, max_new_tokens)  # returns on the host: synchronized
    for r, j in enumerate(rows):
      new[j], outs[j] = int(n_gen[r]), out[r, :int(n_gen[r])].tolist()
  elapsed = time.perf_counter() - t0
  total = sum(new)
  result = {"requests": len(ids), "batch": batch, "max_new_tokens": max_new_tokens, "eos_ids": list(eos),
            "mode": run_mode, "batching": "static: left-padded batches in prompt order; a batch runs until "
            "all its requests stop or hit the cap", "s": elapsed, "requests_per_s": len(ids) / elapsed,
            "tokens_per_s": total / elapsed, "mean_new_tokens": total / len(ids),
            "mean_prompt_tokens": sum(map(len, ids)) / len(ids),
            "stopped_frac": sum(any(t in eos for t in o) for o in outs) / len(ids), "new_tokens": new}
  if tokenizer is not None and samples:
    result["samples"] = [tokenizer.decode(o, skip_special_tokens=True) for o in outs[:samples]]
  return result


def greedy_check(model: torch.nn.Module, prompts: Sequence[Sequence[int]], *, new_tokens: int = 16,
                 mode: str = "graphs", eos_ids: Sequence[int] = ()) -> dict[str, Any]:
  """The runner (in `mode`, and eager) against HF `generate(do_sample=False)` on a left-padded batch.
  Graphs replay the eager kernels, so runner tokens should be equal; vs HF in bf16, a near-tie may flip
  a token, hence a matching fraction rather than a pass/fail."""
  dev = next(model.parameters()).device
  tokens, mask, _ = left_pad(prompts, len(prompts))
  got = {}
  for m in dict.fromkeys((resolve_mode(mode, dev), "eager")):
    runner = StaticRunner(model, len(prompts), tokens.shape[1] + new_tokens + 1, mode=m)
    got[m] = runner.generate(tokens, mask, max_new_tokens=new_tokens, eos_ids=eos_ids)[0]
    del runner
  ref = hf_generate(model, tokens, mask, new_tokens, eos_ids)
  first = got[resolve_mode(mode, dev)]
  return {"new_tokens": new_tokens, "rows": len(prompts),
          "runner_equals_eager_runner": bool(torch.equal(first, got["eager"])),
          "match_frac_vs_hf": float((first == ref).float().mean()),
          "prefix_match_vs_hf": [int(_prefix(a, b)) for a, b in zip(first, ref)]}


def _prefix(a: torch.Tensor, b: torch.Tensor) -> int:
  diff = (a != b).nonzero()
  return int(diff[0]) if len(diff) else len(a)


@dataclasses.dataclass(frozen=True)
class Sizes:
  """What `measure` runs; FULL is the H100 setting (< 6 min for a SmolLM2-135M parent + child)."""
  prefill_grid: tuple[tuple[int, int], ...] = ((16, 1024), (1, 1024))
  decode_batches: tuple[int, ...] = (1, 64, 256)
  decode_context: int = 512
  new_tokens: int = 128
  requests: int = 64  # prompts in the request workload
  request_batch: int = 16  # static batch size of the workload
  max_new_tokens: int = 256  # per-request cap
  random_prompt_len: tuple[int, int] = (16, 128)  # prompt lengths when the export has no tokenizer
  repeats: int = 5
  warmup: int = 2


FULL = Sizes()
QUICK = Sizes(prefill_grid=((2, 32), (1, 32)), decode_batches=(1, 4), decode_context=32, new_tokens=8,
              requests=8, request_batch=4, max_new_tokens=16, random_prompt_len=(4, 16), repeats=2, warmup=1)


def workload(tokenizer, vocab_size: int, n: int, sizes: Sizes, *, prompts_file: str | None = None,
             seed: int = 0) -> list:
  """n prompts: lines of `prompts_file`, else the built-in questions (with a tokenizer), else
  random token ids (then few requests stop early and request-level speed tracks decode speed)."""
  if prompts_file:
    lines = [l.strip() for l in pathlib.Path(prompts_file).read_text().splitlines() if l.strip()]
    return [lines[i % len(lines)] for i in range(n)]
  if tokenizer is not None:
    return [DEFAULT_PROMPTS[i % len(DEFAULT_PROMPTS)] for i in range(n)]
  rng = np.random.default_rng(seed)
  lo, hi = sizes.random_prompt_len
  return [rng.integers(0, vocab_size, int(rng.integers(lo, hi + 1))).tolist() for _ in range(n)]


RANDOM_WEIGHTS_NOTE = ("random weights: request workload and greedy check skipped (stop behaviour and "
                       "tokens mean nothing); prefill/decode speeds are valid")


def measure_one(path: str, prompts: list, tokenizer, sizes: Sizes, *, dtype: torch.dtype, mode: str,
                device: torch.device, random_weights: bool = False) -> dict[str, Any]:
  model = load_model(path, dtype=dtype, device=device, random_weights=random_weights)
  out = measure_model(model, prefill_grid=sizes.prefill_grid, decode_batches=sizes.decode_batches,
                      decode_context=sizes.decode_context, new_tokens=sizes.new_tokens, mode=mode,
                      repeats=sizes.repeats, warmup=sizes.warmup)
  out["model"]["path"] = str(path)
  out["model"]["random_weights"] = random_weights
  if random_weights:
    out["requests"] = out["check"] = None
  else:
    _measure_quality_side(out, model, prompts, tokenizer, sizes, mode, device)
  del model
  if device.type == "cuda":
    torch.cuda.empty_cache()
  return out


def _measure_quality_side(out: dict[str, Any], model: torch.nn.Module, prompts: list, tokenizer, sizes: Sizes,
                          mode: str, device: torch.device) -> None:
  """The request workload and the greedy check: both depend on what the weights generate."""
  eos = eos_ids_of(model, tokenizer)
  reset_peak(device)
  out["requests"] = measure_requests(model, tokenizer, prompts, batch=sizes.request_batch,
                                     max_new_tokens=sizes.max_new_tokens, eos_ids=eos, mode=mode)
  out["requests"]["peak_memory_bytes"] = peak(device)
  out["check"] = greedy_check(model, [encode(tokenizer, p) for p in prompts[:2]], mode=mode, eos_ids=eos)


def compare(parent: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
  """child / parent: throughput speedups (> 1 = child faster) and memory / length ratios."""
  def by(rows, key):
    return {key(r): r for r in rows}
  pd, cd = by(parent["decode"], lambda r: r["batch"]), by(child["decode"], lambda r: r["batch"])
  pp, cp = (by(m["prefill"], lambda r: f"{r['batch']}x{r['prompt_len']}") for m in (parent, child))
  out = {"decode_speedup": {str(b): cd[b]["tokens_per_s"] / pd[b]["tokens_per_s"] for b in pd if b in cd},
         "prefill_speedup": {k: cp[k]["tokens_per_s"] / pp[k]["tokens_per_s"] for k in pp if k in cp}}
  pr, cr = parent.get("requests"), child.get("requests")
  if pr and cr:
    out["request_speedup"] = cr["requests_per_s"] / pr["requests_per_s"]
    out["request_token_throughput_ratio"] = cr["tokens_per_s"] / pr["tokens_per_s"]
    out["tokens_per_request_ratio"] = cr["mean_new_tokens"] / pr["mean_new_tokens"]
  if parent.get("peak_memory_bytes") and child.get("peak_memory_bytes"):
    out["peak_memory_ratio"] = child["peak_memory_bytes"] / parent["peak_memory_bytes"]
  out["params_ratio"] = child["model"]["params"] / parent["model"]["params"]
  return out
