"""Serving measurements of exported children in PyTorch (the H100 harness).

    python -m puzzle_jax.harness measure --parent DIR [--child DIR] --out OUT.json [--quick] \
        [--random-weights] [--decode-batches 1,64] [--prefill-grid 16x1024,1x1024]
    python -m puzzle_jax.harness costs --arch-from DIR --keys k1,k2,... --batch B --prompt-len L \
        --gen-len G --out costs.json [--check-whole]

What it measures, on an exported directory (`puzzle_jax.export.nemotron_nas`, loaded with
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`):
  prefill   tokens/s of one prompt batch [B, L] (KV written, last-position logits), median of repeats.
  decode    tokens/s over `new_tokens` greedy steps after a prompt of `decode_context` tokens.
  requests  a workload of prompts in static, left-padded batches, each generating until EOS or the
            cap: requests/s and tokens per request, so a child that writes longer answers is not
            credited with per-token speed alone (the gpt-oss-puzzle paper's request-level metric).
            Skipped with --random-weights (config-only exports, `export.export_config`): random
            weights make stop behaviour meaningless, so `requests` is null.
  costs     per-sub-block prefill/decode times as PyTorch modules, in the `puzzle_jax.costs/v1`
            format the MIP reads (`--config.costs.table=PATH`).

The decode path is our own lean runner (`StaticRunner`), not the HF forward: it reuses the loaded
module's submodules (embedding, norms, q/k/v/o and MLP Linears, rotary, LM head) and drives a
static, preallocated KV cache, one [B, K_i, S, H] pair per attention layer (K_i that layer's KV
heads; heads before slots, the layout SDPA reads without a copy). Every step has fixed shapes and
keeps all of its state on the device (next token, positions, write slot, done flags, outputs), so
one step can be captured as a CUDA graph and replayed with no host work ("graphs"), or handed to
`torch.compile(mode="reduce-overhead")` ("compile"); "eager" runs the same code directly (CPU).
Attention reads the cache up to the current length rounded up to `bucket` slots (one graph per
bucket), as a length-aware kernel would, instead of all S slots. The test proves greedy tokens equal
`model.generate(do_sample=False)` of the HF module and `puzzle_jax.core.model.generate`.

Axis legend as in `puzzle_jax.core.arch`: B batch, L prompt, S cache slots, D hidden, N query heads,
K kv heads, G = N / K, H head dim, V vocab.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import pathlib
import sys
import time
import warnings
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from puzzle_jax.core.arch import DTYPE_BYTES, Arch, AttnSpec, BlockSpec, FFNSpec

BUCKET = 64  # cache slots attention reads are rounded up to this (a multiple of 16 keeps SDPA masks aligned).
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MAX_EOS = 8  # stop ids a runner can hold (a fixed-size device buffer, so graphs need no recapture).
DEFAULT_PROMPTS = [f"{ask} {topic}" for ask in ("Explain in a few sentences:", "Give three facts about")
                   for topic in (
    "photosynthesis", "the French Revolution", "black holes", "how vaccines work", "the water cycle",
    "binary search", "plate tectonics", "the Roman Empire", "inflation in economics", "DNA replication",
    "the theory of relativity", "climate change", "how a CPU works", "the Great Wall of China",
    "volcanoes", "the human heart", "machine learning", "the Moon landing", "honey bees",
    "the printing press", "electric cars", "the Amazon rainforest", "prime numbers", "Shakespeare",
    "the immune system", "solar panels", "the Internet", "earthquakes", "the Renaissance",
    "coffee", "the periodic table", "ocean tides")]


# ----------------------------------------------------------------------------- loading
def device_default() -> torch.device:
  return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(path: str | os.PathLike, *, dtype: torch.dtype = torch.bfloat16,
               device: torch.device | str | None = None, random_weights: bool = False) -> torch.nn.Module:
  """An exported directory as the HF module (shipped remote code), in eval mode on `device`.

  `random_weights`: build the module from config.json alone (`export.export_config` dirs, no
  safetensors and no need for the remote code: this package's copy of it is used), weights drawn by
  the modeling code's `_init_weights` (N(0, 0.02), norms 1), directly on `device`, so an 8B model
  never sits in host memory. For speed runs: the values are meaningless."""
  import transformers
  device = torch.device(device) if device is not None else device_default()
  if random_weights:
    from puzzle_jax.export.hf_export import configuration_decilm, modeling_decilm
    cfg = configuration_decilm.DeciLMConfig.from_pretrained(str(path))
    with device:
      m = modeling_decilm.DeciLMForCausalLM._from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    return m.eval()
  m = transformers.AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True, dtype=dtype,
                                                        attn_implementation="sdpa")
  return m.to(device).eval()


def load_tokenizer(path: str | os.PathLike):
  """The directory's tokenizer, or None when the export has none."""
  p = pathlib.Path(path)
  if not any((p / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
    return None
  import transformers
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return transformers.AutoTokenizer.from_pretrained(str(p), trust_remote_code=True)  # config.json is ours


def eos_ids_of(model: torch.nn.Module, tokenizer=None) -> tuple[int, ...]:
  """Stop ids from generation_config.json (and the tokenizer's eos), deduplicated."""
  ids: list[int] = []
  for src in (getattr(getattr(model, "generation_config", None), "eos_token_id", None),
              getattr(model.config, "eos_token_id", None),
              getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None):
    if src is None:
      continue
    ids += [int(t) for t in (src if isinstance(src, (list, tuple)) else [src])]
  return tuple(dict.fromkeys(ids))


# ----------------------------------------------------------------------------- the lean forward
def _round_up(x: int, m: int) -> int:
  return max(m, -(-x // m) * m)


def _neg(dtype: torch.dtype) -> float:
  """The masked-score value of the modeling code (finite, so an all-masked row is uniform)."""
  return max(-1e30, torch.finfo(dtype).min / 2)


def _sdpa_backends(device: torch.device):
  """On CUDA, SDPA limited to flash / memory-efficient / math: all three are capturable in CUDA graphs,
  while cuDNN attention (preferred on Hopper by some versions) has failed to plan some shapes."""
  if device.type != "cuda":
    return contextlib.nullcontext()
  from torch.nn.attention import SDPBackend, sdpa_kernel
  return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def _bias(ok: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
  """Boolean [B, L, S] -> additive mask [B, 1, L, S] (the modeling code's finite masked value)."""
  return torch.zeros(ok.shape, dtype=dtype, device=ok.device).masked_fill_(~ok, _neg(dtype))[:, None]


@dataclasses.dataclass
class _Ctx:
  """What every layer of one forward shares."""
  cos: torch.Tensor  # [B, 1, L, H] in the activation dtype (`_rope`)
  sin: torch.Tensor
  bias: dict  # window -> additive mask ([B, 1, L, L] prefill, [B, 1, 1, S] decode); None = plain causal
  slot_1: torch.Tensor | None  # decode: the write slot, shape [1]; None: prefill writes slots [0, L)
  keys: int  # decode: cache slots attention reads


def _rope(rotary_emb: torch.nn.Module, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
  """cos/sin [B, 1, L, H] from the module's own rotary embedding (float32), cast once per forward to
  the activation dtype (the modeling code casts them in every layer: same values, fewer kernels)."""
  cos, sin = rotary_emb(positions)
  return cos[:, None].to(dtype), sin[:, None].to(dtype)


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
  """x [B, heads, L, H] (or [B, K, G, H] with L = 1); cos/sin from `_rope`: the modeling code's
  rotate-half RoPE, op for op (so the same bits)."""
  half = x.shape[-1] // 2
  return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
  """[B, K, S, H] -> [B, K * groups, S, H]; query head n reads kv head n // groups."""
  if groups == 1:
    return x
  b, k, s, h = x.shape
  return x[:, :, None].expand(b, k, groups, s, h).reshape(b, k * groups, s, h)


def _gqa(layer: torch.nn.Module, x: torch.Tensor, ctx: _Ctx, cache: tuple | None) -> torch.Tensor:
  """GQA attention of one layer on the static cache; `layer.self_attn` supplies the projections."""
  attn = layer.self_attn
  b, length, _ = x.shape
  n, k, h = attn.num_heads, attn.num_kv_heads, attn.head_dim
  bias = ctx.bias[layer.window]
  if ctx.slot_1 is not None:  # decode: queries grouped per kv head, [B, K, G, H], so no repeat_kv copy.
    q = _apply_rotary(attn.q_proj(x).view(b, k, n // k, h), ctx.cos, ctx.sin)
    kk = _apply_rotary(attn.k_proj(x).view(b, k, 1, h), ctx.cos, ctx.sin)
    cache[0].index_copy_(2, ctx.slot_1, kk.to(cache[0].dtype))
    cache[1].index_copy_(2, ctx.slot_1, attn.v_proj(x).view(b, k, 1, h).to(cache[1].dtype))
    out = F.scaled_dot_product_attention(q, cache[0][:, :, :ctx.keys], cache[1][:, :, :ctx.keys],
                                         attn_mask=bias, scale=attn.scaling)
    return attn.o_proj(out.reshape(b, 1, n * h))
  q = _apply_rotary(attn.q_proj(x).view(b, length, n, h).transpose(1, 2), ctx.cos, ctx.sin)
  kk = _apply_rotary(attn.k_proj(x).view(b, length, k, h).transpose(1, 2), ctx.cos, ctx.sin)
  v = attn.v_proj(x).view(b, length, k, h).transpose(1, 2)
  if cache is not None:
    cache[0][:, :, :length].copy_(kk)
    cache[1][:, :, :length].copy_(v)
  if bias is None:  # plain causal, no padding: flash attention reads the kv heads directly.
    out = F.scaled_dot_product_attention(q, kk, v, is_causal=True, scale=attn.scaling, enable_gqa=True)
  else:
    out = F.scaled_dot_product_attention(q, _repeat_kv(kk, n // k), _repeat_kv(v, n // k), attn_mask=bias,
                                         scale=attn.scaling)
  return attn.o_proj(out.transpose(1, 2).reshape(b, length, n * h))


def layer_deltas(layer: torch.nn.Module, h: torch.Tensor, ctx: _Ctx | None,
                 cache: tuple | None) -> list[torch.Tensor]:
  """[attention delta, FFN delta] of one `DeciLMDecoderLayer`, no-op parts left out (its forward's
  contract), with GQA attention on our cache; linear attention and the MLP run their own forward."""
  out = []
  if layer.has_attention:
    x = layer.input_layernorm(h)
    out.append(_gqa(layer, x, ctx, cache) if layer.is_gqa else layer.self_attn(x))
  if layer.has_ffn:
    mid = h + out[0] if out else h
    out.append(layer.mlp(layer.post_attention_layernorm(mid)))
  return out


# ----------------------------------------------------------------------------- static-cache runner
class StaticRunner:
  """Greedy generation for a fixed batch B and cache size S, all state on the device.

  `prefill(tokens, mask)` fills slots [0, L) and emits the first token; each `step()` feeds the last
  token, writes slot `length`, emits the next. After a stop id a row repeats the first stop id (as
  `puzzle_jax.core.model.generate`); `n_gen` counts tokens up to and including the first stop.
  """

  def __init__(self, model: torch.nn.Module, batch: int, max_len: int, *, mode: str = "eager",
               bucket: int = BUCKET, capture: bool = True):
    base = model.model
    if not hasattr(base, "runs") or not hasattr(base, "attention_layers"):
      raise TypeError(f"{type(model).__name__} is not the shipped DeciLM modeling code "
                      "(export the model with puzzle_jax.export.nemotron_nas)")
    if mode not in ("eager", "graphs", "compile"):
      raise ValueError(f"mode must be 'eager', 'graphs' or 'compile', got {mode!r}")
    self.model, self.base, self.batch, self.bucket, self.mode = model, base, batch, bucket, mode
    self.slots = _round_up(max_len, bucket)
    p = next(model.parameters())
    self.device, self.dtype = p.device, p.dtype
    if mode != "eager" and self.device.type != "cuda":
      raise ValueError(f"mode={mode!r} needs CUDA; use mode='eager' on {self.device}")
    cfg = model.config
    self.cache = {i: tuple(torch.zeros(batch, base.layers[i].self_attn.num_kv_heads, self.slots, cfg.head_dim,
                                       dtype=self.dtype, device=self.device) for _ in range(2))
                  for i in base.attention_layers}
    self.windows = {base.layers[i].window for i in base.attention_layers}
    self._state()
    self.length = 0  # slots filled (host copy, picks the bucket)
    self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
    self._prefill_graphs: dict[tuple, tuple] = {}
    if mode == "graphs" and capture:  # before any prefill: warm-up steps may scribble on the state
      self._capture_decode()
    elif mode == "compile":
      self._setup_compile()

  def _state(self) -> None:
    d, b = self.device, self.batch
    self.valid = torch.zeros(b, self.slots, dtype=torch.bool, device=d)
    self.ar = torch.arange(self.slots + 1, device=d)
    self.slot = torch.zeros((), dtype=torch.long, device=d)
    self.pos = torch.zeros(b, dtype=torch.long, device=d)
    self.tok = torch.zeros(b, dtype=torch.long, device=d)
    self.done = torch.zeros(b, dtype=torch.bool, device=d)
    self.n_gen = torch.zeros(b, dtype=torch.long, device=d)
    self.t = torch.zeros((), dtype=torch.long, device=d)
    self.out = torch.zeros(b, self.slots + 1, dtype=torch.long, device=d)
    self.eos = torch.full((MAX_EOS,), -1, dtype=torch.long, device=d)

  @property
  def kv_cache_bytes(self) -> int:
    return sum(2 * c[0].numel() * c[0].element_size() for c in self.cache.values())

  # --------------------------------------------------------------- the two kernels of work
  def _blocks(self, h: torch.Tensor, ctx: _Ctx) -> torch.Tensor:
    for run in self.base.runs:  # deltas summed in the reference's order: ((a_0 + f_0) + a_1) + f_1 ...
      delta = None
      for i in run:
        for d in layer_deltas(self.base.layers[i], h, ctx, self.cache.get(i)):
          delta = d if delta is None else delta + d
      if delta is not None:
        h = h + delta
    return h

  def _emit(self, hidden_last: torch.Tensor) -> None:
    """Greedy token from the last hidden state, written into the device state (no host sync)."""
    logits = self.model.lm_head(self.base.norm(hidden_last))
    nxt = torch.where(self.done, self.eos[0], logits.argmax(-1))
    self.n_gen.add_((~self.done).long())
    self.done.logical_or_((nxt[:, None] == self.eos[None, :]).any(-1))
    self.out.index_copy_(1, self.t.view(1), nxt[:, None])
    self.t.add_(1)
    self.tok.copy_(nxt)

  @torch.no_grad()
  def _prefill_impl(self, tokens: torch.Tensor, mask: torch.Tensor | None) -> None:
    b, length = tokens.shape
    self.valid.zero_()
    if mask is None:
      self.valid[:, :length] = True
      positions = self.ar[:length].expand(b, length)
      self.pos.fill_(length)
    else:
      self.valid[:, :length].copy_(mask)
      positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
      self.pos.copy_(mask.sum(-1))
    self.slot.fill_(length)
    cos, sin = _rope(self.base.rotary_emb, positions, self.dtype)
    h = self._blocks(self.base.embed_tokens(tokens), _Ctx(cos, sin, self._prefill_bias(mask, length), None, 0))
    self.done.zero_()
    self.n_gen.zero_()
    self.t.zero_()
    self._emit(h[:, -1])

  def _prefill_bias(self, mask: torch.Tensor | None, length: int) -> dict:
    out = {}
    rel = self.ar[:length, None] - self.ar[None, :length]  # q slot - k slot
    for w in self.windows:
      if mask is None and (w is None or w >= length):
        out[w] = None
        continue
      ok = (rel >= 0) & (rel < w) if w is not None else rel >= 0
      ok = ok[None] & mask[:, None, :] if mask is not None else ok[None].expand(self.batch, -1, -1)
      out[w] = _bias(ok, self.dtype)
    return out

  @torch.no_grad()
  def _step_impl(self, keys: int) -> None:
    h = self.base.embed_tokens(self.tok[:, None])
    cos, sin = _rope(self.base.rotary_emb, self.pos[:, None], self.dtype)
    slot_1 = self.slot.view(1)
    self.valid.index_fill_(1, slot_1, True)
    h = self._blocks(h, _Ctx(cos, sin, self._decode_bias(keys), slot_1, keys))
    self._emit(h[:, -1])
    self.pos.add_(1)
    self.slot.add_(1)

  def _decode_bias(self, keys: int) -> dict:
    ok = self.valid[:, :keys]  # written slots only: later slots were cleared by the prefill
    out = {}
    for w in self.windows:
      okw = ok & ((self.slot - self.ar[:keys]) < w)[None] if w is not None else ok
      out[w] = _bias(okw[:, None], self.dtype)  # [B, 1, 1, keys]
    return out

  # --------------------------------------------------------------- graphs / compile
  def _buckets(self) -> list[int]:
    return list(range(self.bucket, self.slots + 1, self.bucket))

  def _capture_decode(self) -> None:
    """One CUDA graph per key bucket, sharing one memory pool (replayed one at a time, in order)."""
    pool = torch.cuda.graph_pool_handle()
    with _sdpa_backends(self.device):
      for keys in self._buckets():
        self._graphs[keys] = _capture(lambda keys=keys: self._step_impl(keys), reset=self._reset_counters,
                                      pool=pool)
    self._reset_counters()

  def _reset_counters(self) -> None:
    """Keep warm-up steps in bounds; the prefill overwrites everything they touched."""
    self.slot.zero_()
    self.t.zero_()
    self.pos.zero_()

  def _setup_compile(self) -> None:
    import torch._dynamo
    for t in [self.valid, self.slot, self.pos, self.tok, self.done, self.n_gen, self.t, self.out, self.eos,
              *[c for pair in self.cache.values() for c in pair]]:
      torch._dynamo.mark_static_address(t)  # mutated in place: static inputs keep cudagraphs on
    cfg = torch._dynamo.config  # one specialization per (runner, key bucket), all on one code object
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                 "accumulated_cache_size_limit"):
      if hasattr(cfg, name):
        setattr(cfg, name, max(getattr(cfg, name), 1024))
    self._compiled = torch.compile(self._step_impl, mode="reduce-overhead", dynamic=False)

  # --------------------------------------------------------------- public
  def set_eos(self, eos_ids: Sequence[int]) -> None:
    if len(eos_ids) > MAX_EOS:
      raise ValueError(f"at most {MAX_EOS} stop ids, got {len(eos_ids)}")
    self.eos.fill_(-1)
    if eos_ids:
      self.eos[:len(eos_ids)] = torch.tensor(list(eos_ids), dtype=torch.long, device=self.device)

  def prefill(self, tokens: torch.Tensor, mask: torch.Tensor | None = None, *, graphed: bool = False) -> None:
    """tokens [B, L] (left-padded where mask is 0; mask None = no padding). `graphed` captures one
    CUDA graph per (L, padded) on first use (for timing repeated prefills of one shape)."""
    b, length = tokens.shape
    if b != self.batch or length > self.slots:
      raise ValueError(f"prompt batch {tuple(tokens.shape)} does not fit runner batch {self.batch}, "
                       f"{self.slots} slots")
    tokens = tokens.to(self.device)
    mask = None if mask is None else mask.to(device=self.device, dtype=torch.bool)
    with _sdpa_backends(self.device):
      self._prefill(tokens, mask, graphed)
    self.length = length

  def _prefill(self, tokens: torch.Tensor, mask: torch.Tensor | None, graphed: bool) -> None:
    length = tokens.shape[1]
    if graphed and self.mode != "eager":
      key = (length, mask is not None)
      if key not in self._prefill_graphs:
        bufs = (tokens.clone(), None if mask is None else mask.clone())
        self._prefill_graphs[key] = (bufs, _capture(lambda: self._prefill_impl(*bufs)))
      (tok_buf, mask_buf), graph = self._prefill_graphs[key]
      tok_buf.copy_(tokens)
      if mask is not None:
        mask_buf.copy_(mask)
      graph.replay()
    else:
      self._prefill_impl(tokens, mask)

  def step(self) -> None:
    keys = min(self.slots, _round_up(self.length + 1, self.bucket))
    if self.length >= self.slots:
      raise RuntimeError(f"cache full ({self.slots} slots); build the runner with a larger max_len")
    if self.mode == "graphs":
      if keys not in self._graphs:
        raise RuntimeError("decode graphs were not captured (runner built with capture=False)")
      self._graphs[keys].replay()
    elif self.mode == "compile":
      torch.compiler.cudagraph_mark_step_begin()
      with _sdpa_backends(self.device):
        self._compiled(keys)
    else:
      with _sdpa_backends(self.device):
        self._step_impl(keys)
    self.length += 1

  def decode(self, steps: int) -> None:
    for _ in range(steps):
      self.step()

  def generate(self, tokens: torch.Tensor, mask: torch.Tensor | None = None, *, max_new_tokens: int,
               eos_ids: Sequence[int] = (), check_every: int = 8,
               active: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy: (new tokens [B, max_new_tokens] on CPU, tokens generated per row incl. the stop).

    With stop ids the loop ends once every row has stopped, checked every `check_every` steps (a
    host sync each check); rows past their stop repeat the first stop id. Rows where `active` is
    False (batch filler) count as stopped after their first token."""
    self.set_eos(eos_ids)
    self.prefill(tokens, mask)
    if active is not None:
      self.done.logical_or_(~active.to(self.device))
    steps = 0
    for i in range(max_new_tokens - 1):
      if eos_ids and i % check_every == 0 and bool(self.done.all()):
        break
      self.step()
      steps += 1
    out = self.out[:, :max_new_tokens].clone()
    if steps + 1 < max_new_tokens:  # stopped early: the rest is the stop id, as if generated
      out[:, steps + 1:] = self.eos[0]
    return out.cpu(), self.n_gen.cpu()


def _capture(fn: Callable[[], None], *, reset: Callable[[], None] | None = None, pool=None) -> torch.cuda.CUDAGraph:
  """Warm up on a side stream (cuBLAS handles, lazy RoPE tables), then capture `fn` once."""
  if reset is not None:
    reset()
  s = torch.cuda.Stream()
  s.wait_stream(torch.cuda.current_stream())
  with torch.cuda.stream(s):
    for _ in range(2):
      fn()
  torch.cuda.current_stream().wait_stream(s)
  if reset is not None:
    reset()
  graph = torch.cuda.CUDAGraph()
  with torch.cuda.graph(graph, pool=pool):
    fn()
  return graph


# ----------------------------------------------------------------------------- timing helpers
def _sync(device: torch.device) -> None:
  if device.type == "cuda":
    torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
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


def _summary(times: Sequence[float]) -> dict[str, float]:
  t = np.asarray(times, np.float64)
  q25, q75 = np.percentile(t, [25, 75])
  return {"s": float(np.median(t)), "min": float(t.min()), "iqr": float(q75 - q25)}


def _reset_peak(device: torch.device) -> None:
  gc.collect()  # runners of earlier measurements (a compiled step holds a cycle) release their memory
  if device.type == "cuda":
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> int | None:
  return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def _resolve_mode(mode: str, device: torch.device) -> str:
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
  _reset_peak(dev)
  runner = StaticRunner(model, batch, prompt_len, mode=mode, capture=False)  # no decode graphs needed
  tokens = _random_tokens(model.config.vocab_size, (batch, prompt_len), seed, dev)
  fn = lambda: runner.prefill(tokens, graphed=mode != "eager")
  for _ in range(warmup):
    fn()
  _sync(dev)
  stats = _summary([_timed(fn, dev) for _ in range(repeats)])
  out = {"batch": batch, "prompt_len": prompt_len, **stats, "repeats": repeats,
         "tokens_per_s": batch * prompt_len / stats["s"], "peak_memory_bytes": _peak(dev)}
  del runner
  return out


def measure_decode(model: torch.nn.Module, batch: int, context: int, new_tokens: int, *, mode: str,
                   repeats: int = 3, warmup: int = 1, seed: int = 0) -> dict[str, Any]:
  """Greedy decode tokens/s: `new_tokens` steps after a random prompt of `context` tokens (the
  prefill is not timed). step_s is the mean step; the mean context is context + new_tokens / 2."""
  dev = next(model.parameters()).device
  _reset_peak(dev)
  runner = StaticRunner(model, batch, context + new_tokens, mode=mode)  # the last step writes slot c + n - 1
  tokens = _random_tokens(model.config.vocab_size, (batch, context), seed, dev)
  times = []
  for r in range(warmup + repeats):
    runner.prefill(tokens)
    _sync(dev)
    t = _timed(lambda: runner.decode(new_tokens), dev)
    if r >= warmup:
      times.append(t)
  stats = _summary(times)
  out = {"batch": batch, "context": context, "new_tokens": new_tokens, **stats, "repeats": repeats,
         "step_s": stats["s"] / new_tokens, "tokens_per_s": batch * new_tokens / stats["s"],
         "kv_cache_bytes": runner.kv_cache_bytes, "cache_slots": runner.slots, "peak_memory_bytes": _peak(dev)}
  del runner
  return out


def measure_model(model_or_dir, *, prefill_grid: Iterable[tuple[int, int]] = ((16, 1024), (1, 1024)),
                  decode_batches: Iterable[int] = (1, 64, 256), decode_context: int = 512,
                  new_tokens: int = 128, dtype: torch.dtype = torch.bfloat16, mode: str = "graphs",
                  device: torch.device | str | None = None, repeats: int = 5, warmup: int = 2) -> dict[str, Any]:
  """Prefill tokens/s per (batch, prompt_len), decode tokens/s per batch, peak memory."""
  model, path = _as_model(model_or_dir, dtype, None if device is None else torch.device(device))
  dev = next(model.parameters()).device
  run_mode = _resolve_mode(mode, dev)
  out = {"model": _model_info(model, path), "device": _device_name(dev), "dtype": str(next(model.parameters()).dtype),
         "mode": run_mode, "mode_requested": mode, "impl": IMPL[run_mode], "bucket": BUCKET}
  out["prefill"] = [measure_prefill(model, b, l, mode=run_mode, repeats=repeats, warmup=warmup)
                    for b, l in prefill_grid]
  out["decode"] = [measure_decode(model, b, decode_context, new_tokens, mode=run_mode,
                                  repeats=max(1, repeats // 2 + 1), warmup=1) for b in decode_batches]
  peaks = [r["peak_memory_bytes"] for r in out["prefill"] + out["decode"] if r["peak_memory_bytes"] is not None]
  out["peak_memory_bytes"] = max(peaks) if peaks else None
  return out


def _device_name(dev: torch.device) -> str:
  return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"


# ----------------------------------------------------------------------------- requests
def _encode(tokenizer, prompt: str | Sequence[int]) -> list[int]:
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


def _left_pad(seqs: Sequence[Sequence[int]], batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
  run_mode = _resolve_mode(mode, dev)
  ids = [_encode(tokenizer, p) for p in prompts]
  eos = tuple(eos_ids) if eos_ids is not None else eos_ids_of(model, tokenizer)
  runner = StaticRunner(model, batch, max(len(s) for s in ids) + max_new_tokens + 1, mode=run_mode)
  groups = [list(range(i, min(i + batch, len(ids)))) for i in range(0, len(ids), batch)]

  def run(rows: list[int], cap: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokens, mask, active = _left_pad([ids[j] for j in rows], batch)
    return runner.generate(tokens, mask, max_new_tokens=cap, eos_ids=eos, check_every=check_every,
                           active=active)

  run(groups[0], min(4, max_new_tokens))  # warm-up: first-use costs (cuBLAS, allocator) untimed
  _sync(dev)
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
  tokens, mask, _ = _left_pad(prompts, len(prompts))
  got = {}
  for m in dict.fromkeys((_resolve_mode(mode, dev), "eager")):
    runner = StaticRunner(model, len(prompts), tokens.shape[1] + new_tokens + 1, mode=m)
    got[m] = runner.generate(tokens, mask, max_new_tokens=new_tokens, eos_ids=eos_ids)[0]
    del runner
  ref = hf_generate(model, tokens, mask, new_tokens, eos_ids)
  first = got[_resolve_mode(mode, dev)]
  return {"new_tokens": new_tokens, "rows": len(prompts),
          "runner_equals_eager_runner": bool(torch.equal(first, got["eager"])),
          "match_frac_vs_hf": float((first == ref).float().mean()),
          "prefix_match_vs_hf": [int(_prefix(a, b)) for a, b in zip(first, ref)]}


def _prefix(a: torch.Tensor, b: torch.Tensor) -> int:
  diff = (a != b).nonzero()
  return int(diff[0]) if len(diff) else len(a)


@torch.no_grad()
def hf_generate(model: torch.nn.Module, tokens: torch.Tensor, mask: torch.Tensor, new_tokens: int,
                eos_ids: Sequence[int] = ()) -> torch.Tensor:
  """HF greedy generation [B, new_tokens] (finished rows padded with the first stop id, as ours)."""
  dev = next(model.parameters()).device
  pad = eos_ids[0] if eos_ids else 0
  kw = {"eos_token_id": list(eos_ids) if eos_ids else None}  # None: ignore generation_config's stops
  out = model.generate(tokens.to(dev), attention_mask=mask.to(dev).long(), max_new_tokens=new_tokens,
                       do_sample=False, pad_token_id=pad, **kw)
  out = out[:, tokens.shape[1]:].cpu()
  if out.shape[1] < new_tokens:  # every row stopped early
    out = torch.cat([out, torch.full((out.shape[0], new_tokens - out.shape[1]), pad)], 1)
  return out


# ----------------------------------------------------------------------------- cost tables
def _one_layer(arch: Arch, spec: AttnSpec | FFNSpec, dtype: torch.dtype, device: torch.device,
               seed: int) -> tuple[torch.nn.Module, Any]:
  """A `DeciLMDecoderLayer` holding only `spec` (the other sub-block no-op), weights N(0, 1/fan_in)
  as costs.py draws them, norms 1. Built from the shipped modeling code itself."""
  from puzzle_jax.export.hf_export import configuration_decilm, modeling_decilm
  block = BlockSpec(spec, FFNSpec("noop")) if isinstance(spec, AttnSpec) else BlockSpec(AttnSpec("noop"), spec)
  one = dataclasses.replace(arch, blocks=(block,))
  with warnings.catch_warnings():  # widths off the 256 grid warn about vLLM's ffn_mult (irrelevant here)
    warnings.simplefilter("ignore")
    cfg = configuration_decilm.DeciLMConfig(**one.to_hf_config())
  layer = modeling_decilm.DeciLMDecoderLayer(cfg, 0)
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for mod in layer.modules():
      if isinstance(mod, torch.nn.Linear):
        mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * mod.weight.shape[1] ** -0.5)
  return layer.to(device=device, dtype=dtype).eval(), cfg


def _copies(copy_bytes: int, sc) -> int:
  """Copies of weights (and cache) to cycle so their total exceeds the L2 (costs.py's rule)."""
  return min(sc.max_copies, max(1, math.ceil(sc.flush_bytes / max(copy_bytes, 1))))


def _bench_ctx(rot: torch.nn.Module, spec: AttnSpec | FFNSpec, sc, mode: str, dtype: torch.dtype,
               device: torch.device) -> tuple[_Ctx, int, int]:
  """(ctx, tokens per sequence, cache slots) of one application: a causal prompt (prefill), or one
  token at the mean context c (decode: c - 1 filled slots, the token written into slot c - 1)."""
  b = sc.batch
  w = spec.window if isinstance(spec, AttnSpec) and spec.kind == "gqa" else None
  if mode == "prefill":
    length = sc.prompt_len
    rel = torch.arange(length)[:, None] - torch.arange(length)[None, :]
    ok = ((rel >= 0) & (rel < w))[None].expand(b, -1, -1) if w is not None and w < length else None
    cos, sin = _rope(rot, torch.arange(length).expand(b, length).to(device), dtype)
    return _Ctx(cos, sin, {w: None if ok is None else _bias(ok.to(device), dtype)}, None, 0), length, length
  c = sc.decode_context
  slots = _round_up(c, BUCKET)  # as the runner reads the cache: a whole bucket, the rest masked
  ok = torch.arange(slots) < c
  if w is not None:
    ok &= (c - 1 - torch.arange(slots)) < w
  cos, sin = _rope(rot, torch.full((b, 1), c - 1, device=device), dtype)
  bias = _bias(ok[None, None].expand(b, 1, -1).to(device), dtype)
  return _Ctx(cos, sin, {w: bias}, torch.tensor([c - 1], device=device), slots), 1, slots


def _subblock_fn(arch: Arch, spec: AttnSpec | FFNSpec, sc, mode: str, dtype: torch.dtype,
                 device: torch.device, seed: int) -> tuple[Callable[[], None], int]:
  """(fn, applications per call): one pass over the copies, each output added to the residual
  stream that feeds the next (no work can be hoisted or dropped), as costs.py times it."""
  from puzzle_jax.search import costs
  from puzzle_jax.export.hf_export import modeling_decilm
  gqa = isinstance(spec, AttnSpec) and spec.kind == "gqa"
  layer, cfg = _one_layer(arch, spec, dtype, device, seed)
  ctx, length, slots = _bench_ctx(modeling_decilm.DeciLMRotaryEmbedding(cfg), spec, sc, mode, dtype, device)
  cache_shape = (sc.batch, spec.num_kv_heads or 0, slots, arch.head_dim) if gqa else None
  copy_bytes = costs._weight_bytes(arch, spec, sc.dtype)
  if gqa:
    copy_bytes += 2 * math.prod(cache_shape) * torch.finfo(dtype).bits // 8
  n = _copies(copy_bytes, sc)
  layers = [layer] + [_one_layer(arch, spec, dtype, device, seed + 7919 * i)[0] for i in range(1, n)]
  g = torch.Generator().manual_seed(seed + 1)
  caches = [tuple(torch.randn(cache_shape, generator=g).to(device, dtype) for _ in range(2)) if gqa else None
            for _ in range(n)]
  h = torch.randn(sc.batch, length, arch.hidden_size, generator=g).to(device, dtype)

  @torch.no_grad()
  def fn() -> None:
    x = h
    for lay, cache in zip(layers, caches):
      x = x + layer_deltas(lay, x, ctx, cache)[0]
    h.copy_(x)
  return fn, n


def _fixed_fn(arch: Arch, sc, mode: str, dtype: torch.dtype, device: torch.device,
              seed: int) -> Callable[[], None]:
  """Embedding lookup, final norm and LM head at the last position + greedy argmax (what the runner
  does per step / per prompt), the token fed back into the next call."""
  from puzzle_jax.export.hf_export import modeling_decilm
  g = torch.Generator().manual_seed(seed)
  v, d = arch.vocab_size, arch.hidden_size
  emb = torch.nn.Embedding(v, d).to(device, dtype)
  norm = modeling_decilm.DeciLMRMSNorm(d, arch.rms_eps).to(device, dtype)
  head = torch.nn.Linear(d, v, bias=False).to(device, dtype)
  tokens = torch.randint(0, v, (sc.batch, sc.prompt_len if mode == "prefill" else 1), generator=g).to(device)

  @torch.no_grad()
  def fn() -> None:
    h = emb(tokens)
    tokens[:, 0].copy_(head(norm(h[:, -1])).argmax(-1))
  return fn


def _bench(fn: Callable[[], None], apps: int, sc, device: torch.device) -> dict[str, float]:
  """Per-application seconds: `fn` captured as a CUDA graph on the GPU (no launch overhead, as the
  runner replays it), replayed enough times per timed call to reach `sc.min_call_s`."""
  call = fn
  if device.type == "cuda":
    with _sdpa_backends(device):
      call = _capture(fn).replay
  call()
  one = _timed(call, device)
  inner = max(1, min(10_000, math.ceil(sc.min_call_s / max(one, 1e-9))))

  def many() -> None:
    for _ in range(inner):
      call()
  times = [_timed(many, device) for _ in range(sc.warmup + sc.repeats)][sc.warmup:]
  stats = _summary(np.asarray(times) / (inner * apps))
  return {**stats, "reps": inner * apps}


def _arch_dims(hidden_size: int, num_heads: int, head_dim: int, vocab_size: int, *,
               tie_embeddings: bool = False, rms_eps: float = 1e-5) -> Arch:
  return Arch(vocab_size=vocab_size, hidden_size=hidden_size, num_heads=num_heads, head_dim=head_dim,
              blocks=(), tie_embeddings=tie_embeddings, rms_eps=rms_eps)


def cost_table_torch(hidden_size: int, num_heads: int, head_dim: int, vocab_size: int,
                     variant_keys: Iterable[str], scenario, *, tie_embeddings: bool = False,
                     rms_eps: float = 1e-5, device: torch.device | str | None = None, seed: int = 0,
                     progress: bool = False) -> dict[str, Any]:
  """Per-variant prefill/decode seconds timed as PyTorch modules (CUDA graphs on the GPU), plus the
  fixed part, in the `puzzle_jax.costs/v1` format; memory from costs.py's own accounting.

  prefill: [batch, prompt_len] through the sub-block (K/V written into a cache of prompt_len slots).
  decode:  [batch, 1] at the scenario's mean context c: the cache holds c valid slots (rounded up to
           the runner's bucket, the rest masked, as the runner reads it), the token written at c - 1.
  fixed:   embedding + final norm + LM head at the last position + argmax (as the runner; costs.py's
           JAX table computes logits at every prompt position instead). Weights/activations in
           `scenario.dtype`; the cache is timed in that dtype too, `kv_bytes` count `kv_dtype`.
  """
  from puzzle_jax.search import costs
  dev = torch.device(device) if device is not None else device_default()
  dtype = TORCH_DTYPES[scenario.dtype]
  arch = _arch_dims(hidden_size, num_heads, head_dim, vocab_size, tie_embeddings=tie_embeddings, rms_eps=rms_eps)
  keys = list(dict.fromkeys(variant_keys))
  specs = {k: costs._as_spec(k) for k in keys}  # a bad key fails before any timing
  table = costs._header(arch, scenario, f"torch-{dev.type}", _device_name(dev))
  table["harness"] = {"timing": "CUDA graph replay" if dev.type == "cuda" else "eager", "bucket": BUCKET,
                      "torch": torch.__version__}
  fixed = [_bench(_fixed_fn(arch, scenario, m, dtype, dev, seed), 1, scenario, dev) for m in ("prefill", "decode")]
  table["fixed"] = {**costs._stats(*fixed), "weight_bytes": arch.fixed_params() * DTYPE_BYTES[scenario.dtype],
                    "params": arch.fixed_params()}
  for i, k in enumerate(keys):
    if progress:
      print(f"  [{i + 1}/{len(keys)}] {k}", file=sys.stderr, flush=True)
    table["variants"][k] = _measure_variant(arch, specs[k], scenario, dtype, dev, seed)
  costs.validate_cost_table(table, arch, keys)
  return table


def _measure_variant(arch: Arch, spec, sc, dtype: torch.dtype, dev: torch.device, seed: int) -> dict[str, Any]:
  from puzzle_jax.search import costs
  mem = costs._memory(arch, spec, sc)
  if spec.kind == "noop":
    return {**costs._stats(*[{"s": 0.0, "min": 0.0, "iqr": 0.0, "reps": 0}] * 2), **mem}
  timed = []
  for mode in ("prefill", "decode"):
    fn, apps = _subblock_fn(arch, spec, sc, mode, dtype, dev, seed)
    timed.append(_bench(fn, apps, sc, dev))
    del fn
  return {**costs._stats(*timed), **mem}


def predicted_vs_measured(table: dict[str, Any], arch: Arch, measured: dict[str, Any] | float) -> dict[str, Any]:
  """Sum of parts (fixed + every layer's sub-blocks, costs.predicted_totals) against the whole model.

  `measured`: a `measure_model` result (its decode entry at the table's batch gives the mean step
  time, its prefill entry at (batch, prompt_len) the prefill time), or a decode step time in seconds.
  Measure with decode_context = prompt_len and new_tokens = gen_len, so the mean context matches."""
  from puzzle_jax.search import costs
  pred = costs.predicted_totals(arch, table)
  sc = table["scenario"]
  meas: dict[str, float | None] = {"decode_s": None, "prefill_s": None}
  if isinstance(measured, (int, float)):
    meas["decode_s"] = float(measured)
  else:
    meas["decode_s"] = next((r["step_s"] for r in measured.get("decode", []) if r["batch"] == sc["batch"]), None)
    meas["prefill_s"] = next((r["s"] for r in measured.get("prefill", [])
                              if (r["batch"], r["prompt_len"]) == (sc["batch"], sc["prompt_len"])), None)
  out = {}
  for k, m in meas.items():
    if m is not None:
      out[k] = {"predicted": pred[k], "measured": m, "predicted_over_measured": pred[k] / m}
  return out


# ----------------------------------------------------------------------------- CLI
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
  _reset_peak(device)
  out["requests"] = measure_requests(model, tokenizer, prompts, batch=sizes.request_batch,
                                     max_new_tokens=sizes.max_new_tokens, eos_ids=eos, mode=mode)
  out["requests"]["peak_memory_bytes"] = _peak(device)
  out["check"] = greedy_check(model, [_encode(tokenizer, p) for p in prompts[:2]], mode=mode, eos_ids=eos)


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


def _fmt_table(result: dict[str, Any]) -> str:
  roles = [r for r in ("parent", "child") if r in result]
  first = result[roles[0]]
  cols = ([f"pre {r['batch']}x{r['prompt_len']}" for r in first["prefill"]]
          + [f"dec b{r['batch']}" for r in first["decode"]] + ["req/s", "tok/req", "peak GB"])
  lines = [f"{'':<8}" + "".join(f"{c:>14}" for c in cols) + "   (tokens/s unless noted)"]
  nan = float("nan")
  for role in roles:
    m = result[role]
    vals = [r["tokens_per_s"] for r in m["prefill"]] + [r["tokens_per_s"] for r in m["decode"]]
    req = m["requests"] or {}  # None: skipped (random weights)
    vals += [req.get("requests_per_s", nan), req.get("mean_new_tokens", nan), (m["peak_memory_bytes"] or 0) / 2**30]
    lines.append(f"{role:<8}" + "".join(f"{v:>14.4g}" for v in vals))
  if "ratios" in result:
    r = result["ratios"]
    vals = list(r["prefill_speedup"].values()) + list(r["decode_speedup"].values())
    vals += [r.get("request_speedup", float("nan")), r.get("tokens_per_request_ratio", float("nan")),
             r.get("peak_memory_ratio", float("nan"))]
    lines.append(f"{'child/par':<8}" + "".join(f"{v:>14.4g}" for v in vals))
  if result["harness"].get("random_weights"):
    lines.append(f"req/s, tok/req: n/a ({RANDOM_WEIGHTS_NOTE})")
  return "\n".join(lines)


def _dtype_arg(name: str, device: torch.device) -> torch.dtype:
  if name == "auto":
    return torch.bfloat16 if device.type == "cuda" else torch.float32
  return TORCH_DTYPES[name]


def _sizes(base: Sizes, args: argparse.Namespace) -> Sizes:
  """`base` with the command line's decode batches / prefill grid, where given, in place of its own."""
  over = {k: v for k, v in (("decode_batches", args.decode_batches), ("prefill_grid", args.prefill_grid)) if v}
  return dataclasses.replace(base, **over)


def cmd_measure(args: argparse.Namespace) -> dict[str, Any]:
  dev = device_default()
  quick = args.quick or dev.type != "cuda"
  sizes = _sizes(QUICK if quick else FULL, args)
  dtype = _dtype_arg(args.dtype, dev)
  tokenizer = load_tokenizer(args.tokenizer or args.parent)
  vocab = json.loads((pathlib.Path(args.parent) / "config.json").read_text())["vocab_size"]
  prompts = [] if args.random_weights else workload(tokenizer, vocab, args.requests or sizes.requests, sizes,
                                                     prompts_file=args.prompts)
  result: dict[str, Any] = {"harness": {"device": _device_name(dev), "dtype": str(dtype), "mode": args.mode,
                                        "sizes": dataclasses.asdict(sizes), "torch": torch.__version__,
                                        "quick": quick, "tokenizer": tokenizer is not None,
                                        "random_weights": args.random_weights}}
  if args.random_weights:
    result["harness"]["note"] = RANDOM_WEIGHTS_NOTE
  t0 = time.perf_counter()
  for role, path in (("parent", args.parent), ("child", args.child)):
    if path:
      print(f"[harness] measuring {role}: {path}", file=sys.stderr, flush=True)
      result[role] = measure_one(path, prompts, tokenizer, sizes, dtype=dtype, mode=args.mode, device=dev,
                                 random_weights=args.random_weights)
  if args.child:
    result["ratios"] = compare(result["parent"], result["child"])
  result["harness"]["wall_s"] = time.perf_counter() - t0
  _write_json(result, args.out)
  print(_fmt_table(result))
  return result


def cmd_costs(args: argparse.Namespace) -> dict[str, Any]:
  from puzzle_jax.search import costs
  arch = Arch.from_hf_config(json.loads((pathlib.Path(args.arch_from) / "config.json").read_text()))
  keys = [k for k in args.keys.split(",") if k] if args.keys else costs.arch_keys(arch)
  if args.check_whole:  # the parts of this arch must be in the table to predict it
    keys += [k for k in costs.arch_keys(arch) if k not in keys]
  dev = device_default()
  dtype_name = args.dtype if args.dtype != "auto" else ("bfloat16" if dev.type == "cuda" else "float32")
  sc = costs.Scenario(batch=args.batch, prompt_len=args.prompt_len, gen_len=args.gen_len, dtype=dtype_name,
                      kv_dtype=dtype_name, repeats=args.repeats)
  table = cost_table_torch(arch.hidden_size, arch.num_heads, arch.head_dim, arch.vocab_size, keys, sc,
                           tie_embeddings=arch.tie_embeddings, rms_eps=arch.rms_eps, progress=True)
  if args.check_whole:
    whole = measure_model(args.arch_from, prefill_grid=[(args.batch, args.prompt_len)], decode_batches=[args.batch],
                          decode_context=args.prompt_len, new_tokens=args.gen_len, dtype=TORCH_DTYPES[dtype_name],
                          mode=args.mode)
    table["whole_model_check"] = predicted_vs_measured(table, arch, whole)
  costs.save_cost_table(table, args.out)
  print(f"{'variant':<24}{'prefill ms':>12}{'decode us':>12}{'weight MB':>11}{'kv MB':>9}")
  for k, v in [("fixed", table["fixed"]), *table["variants"].items()]:
    print(f"{k:<24}{v['prefill_s'] * 1e3:>12.4f}{v['decode_s'] * 1e6:>12.2f}{v['weight_bytes'] / 2**20:>11.2f}"
          f"{v.get('kv_bytes', 0) / 2**20:>9.2f}")
  for k, v in table.get("whole_model_check", {}).items():
    print(f"whole model {k}: predicted {v['predicted'] * 1e3:.4f} ms, measured {v['measured'] * 1e3:.4f} ms "
          f"(ratio {v['predicted_over_measured']:.3f})")
  return table


def _write_json(obj: Any, path: str | os.PathLike) -> None:
  """Atomic write (a crash never leaves half a result)."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(json.dumps(obj, indent=1, allow_nan=False) + "\n")
  os.replace(tmp, path)


def _int_list(text: str) -> tuple[int, ...]:
  out = tuple(int(t) for t in text.split(",") if t.strip())
  if not out or min(out) < 1:
    raise argparse.ArgumentTypeError(f"need positive integers separated by commas, got {text!r}")
  return out


def _grid(text: str) -> tuple[tuple[int, int], ...]:
  pairs = []
  for item in filter(None, (t.strip() for t in text.split(","))):
    b, sep, length = item.partition("x")
    if not (sep and b.isdigit() and length.isdigit() and int(b) > 0 and int(length) > 0):
      raise argparse.ArgumentTypeError(f"need BATCHxPROMPT_LEN pairs separated by commas, got {text!r}")
    pairs.append((int(b), int(length)))
  if not pairs:
    raise argparse.ArgumentTypeError(f"need at least one BATCHxPROMPT_LEN pair, got {text!r}")
  return tuple(pairs)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(prog="python -m puzzle_jax.harness", description=__doc__.split("\n\n")[0])
  sub = ap.add_subparsers(dest="cmd", required=True)
  m = sub.add_parser("measure", help="prefill/decode/request throughput of a parent (and child)")
  m.add_argument("--parent", required=True, help="exported HF directory of the parent")
  m.add_argument("--child", help="exported HF directory of the child (adds child/parent ratios)")
  m.add_argument("--out", required=True, help="result JSON")
  m.add_argument("--quick", action="store_true", help="tiny sizes (always on without CUDA)")
  m.add_argument("--mode", default="graphs", choices=("graphs", "compile", "eager"))
  m.add_argument("--dtype", default="auto", choices=("auto", *TORCH_DTYPES))
  m.add_argument("--tokenizer", help="directory of the tokenizer (default: the parent's, if it has one)")
  m.add_argument("--prompts", help="text file, one request prompt per line (default: built-in questions)")
  m.add_argument("--requests", type=int, default=0, help="prompts in the request workload (0 = default)")
  m.add_argument("--random-weights", action="store_true",
                 help="build both models from config.json with random weights (no safetensors needed); "
                      "skips the request workload and the greedy check")
  m.add_argument("--decode-batches", type=_int_list, default=None,
                 help="comma-separated decode batch sizes, e.g. 64 (default: the sizes' own)")
  m.add_argument("--prefill-grid", type=_grid, default=None,
                 help="comma-separated BATCHxPROMPT_LEN prefill shapes, e.g. 16x1024,1x1024 (default: the sizes' own)")
  c = sub.add_parser("costs", help="per-sub-block cost table (puzzle_jax.costs/v1) on this device")
  c.add_argument("--arch-from", required=True, help="exported HF directory whose dims (and arch) to use")
  c.add_argument("--keys", default="", help="comma-separated variant keys (default: the arch's own)")
  c.add_argument("--batch", type=int, default=8)
  c.add_argument("--prompt-len", type=int, default=256)
  c.add_argument("--gen-len", type=int, default=128)
  c.add_argument("--repeats", type=int, default=10)
  c.add_argument("--dtype", default="auto", choices=("auto", *TORCH_DTYPES))
  c.add_argument("--mode", default="graphs", choices=("graphs", "compile", "eager"),
                 help="runner mode of the --check-whole measurement")
  c.add_argument("--check-whole", action="store_true",
                 help="also time the whole --arch-from model and compare with the sum of parts")
  c.add_argument("--out", required=True, help="cost-table JSON (feed it with --config.costs.table=PATH)")
  return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  os.environ.setdefault("JAX_PLATFORMS", "cpu")  # costs.py imports JAX; it must not take the GPU
  args = parse_args(argv)
  return cmd_measure(args) if args.cmd == "measure" else cmd_costs(args)


if __name__ == "__main__":
  main()
