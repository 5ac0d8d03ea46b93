"""A lean static-cache decode runner over a loaded DeciLM module (`StaticRunner`), and HF's own
greedy generation as its reference (`hf_generate`).

The decode path is not the HF forward: it reuses the loaded module's submodules (embedding,
norms, q/k/v/o and MLP Linears, rotary, LM head) and drives a static, preallocated KV cache, one
[B, K_i, S, H] pair per attention layer (K_i that layer's KV heads; heads before slots, the layout
SDPA reads without a copy). Every step has fixed shapes and keeps all of its state on the device
(next token, positions, write slot, done flags, outputs), so one step can be captured as a CUDA
graph and replayed with no host work ("graphs"), or handed to
`torch.compile(mode="reduce-overhead")` ("compile"); "eager" runs the same code directly (CPU).
Attention reads the cache up to the current length rounded up to `bucket` slots (one graph per
bucket), as a length-aware kernel would, instead of all S slots. tests/test_serving.py proves
greedy tokens equal `model.generate(do_sample=False)` of the HF module and
`puzzle_jax.core.model.generate`.

Axis legend as in `puzzle_jax.core.arch`: B batch, L prompt, S cache slots, D hidden, N query heads,
K kv heads, G = N / K, H head dim, V vocab.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

BUCKET = 64  # cache slots attention reads are rounded up to this (a multiple of 16 keeps SDPA masks aligned).
MAX_EOS = 8  # stop ids a runner can hold (a fixed-size device buffer, so graphs need no recapture).


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
