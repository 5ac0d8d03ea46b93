"""Per-sub-block cost tables measured in PyTorch, in the `puzzle_jax.cost_table` format the MIP
reads (`--config.costs.table=PATH`): each variant is one `DeciLMDecoderLayer` of the package's
modeling code, timed as `search.costs` times its JAX sub-blocks (copies cycled past the L2, CUDA
graphs of many applications), plus the fixed part (embedding, final norm, LM head).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Callable, Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from puzzle_jax import cost_table
from puzzle_jax.core import hf_config
from puzzle_jax.core.arch import DTYPE_BYTES, Arch, AttnSpec, BlockSpec, FFNSpec
from puzzle_jax.serving.load import TORCH_DTYPES, device_default
from puzzle_jax.serving.measure import device_name, summary, timed
from puzzle_jax.serving.runner import BUCKET, _Ctx, _bias, _capture, _rope, _round_up, _sdpa_backends, layer_deltas


def _one_layer(arch: Arch, spec: AttnSpec | FFNSpec, dtype: torch.dtype, device: torch.device,
               seed: int) -> tuple[torch.nn.Module, Any]:
  """A `DeciLMDecoderLayer` holding only `spec` (the other sub-block no-op), weights N(0, 1/fan_in)
  as costs.py draws them, norms 1. Built from the shipped modeling code itself."""
  from puzzle_jax.export.hf_export import configuration_decilm, modeling_decilm
  block = BlockSpec(spec, FFNSpec("noop")) if isinstance(spec, AttnSpec) else BlockSpec(AttnSpec("noop"), spec)
  one = dataclasses.replace(arch, blocks=(block,))
  with warnings.catch_warnings():  # widths off the 256 grid warn about vLLM's ffn_mult (irrelevant here)
    warnings.simplefilter("ignore")
    cfg = configuration_decilm.DeciLMConfig(**hf_config.arch_to_hf(one))
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
  copy_bytes = cost_table.weight_bytes(arch, spec, sc.dtype)
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
  one = timed(call, device)
  inner = max(1, min(10_000, math.ceil(sc.min_call_s / max(one, 1e-9))))

  def many() -> None:
    for _ in range(inner):
      call()
  times = [timed(many, device) for _ in range(sc.warmup + sc.repeats)][sc.warmup:]
  stats = summary(np.asarray(times) / (inner * apps))
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
  fixed part, in the `puzzle_jax.cost_table` format; memory from its accounting (as `search.costs`).

  prefill: [batch, prompt_len] through the sub-block (K/V written into a cache of prompt_len slots).
  decode:  [batch, 1] at the scenario's mean context c: the cache holds c valid slots (rounded up to
           the runner's bucket, the rest masked, as the runner reads it), the token written at c - 1.
  fixed:   embedding + final norm + LM head at the last position + argmax (as the runner; costs.py's
           JAX table computes logits at every prompt position instead). Weights/activations in
           `scenario.dtype`; the cache is timed in that dtype too, `kv_bytes` count `kv_dtype`.
  """
  dev = torch.device(device) if device is not None else device_default()
  dtype = TORCH_DTYPES[scenario.dtype]
  arch = _arch_dims(hidden_size, num_heads, head_dim, vocab_size, tie_embeddings=tie_embeddings, rms_eps=rms_eps)
  keys = list(dict.fromkeys(variant_keys))
  specs = {k: cost_table.as_spec(k) for k in keys}  # a bad key fails before any timing
  table = cost_table.header(arch, scenario, f"torch-{dev.type}", device_name(dev))
  table["harness"] = {"timing": "CUDA graph replay" if dev.type == "cuda" else "eager", "bucket": BUCKET,
                      "torch": torch.__version__}
  fixed = [_bench(_fixed_fn(arch, scenario, m, dtype, dev, seed), 1, scenario, dev) for m in ("prefill", "decode")]
  table["fixed"] = {**cost_table.stats(*fixed), "weight_bytes": arch.fixed_params() * DTYPE_BYTES[scenario.dtype],
                    "params": arch.fixed_params()}
  for k in tqdm(keys, desc="costs (torch)", disable=not progress):
    table["variants"][k] = _measure_variant(arch, specs[k], scenario, dtype, dev, seed)
  cost_table.validate_cost_table(table, arch, keys)
  return table


def _measure_variant(arch: Arch, spec, sc, dtype: torch.dtype, dev: torch.device, seed: int) -> dict[str, Any]:
  from puzzle_jax.search import costs
  mem = cost_table.memory(arch, spec, sc)
  if spec.kind == "noop":
    return {**cost_table.stats(*[{"s": 0.0, "min": 0.0, "iqr": 0.0, "reps": 0}] * 2), **mem}
  timed = []
  for mode in ("prefill", "decode"):
    fn, apps = _subblock_fn(arch, spec, sc, mode, dtype, dev, seed)
    timed.append(_bench(fn, apps, sc, dev))
    del fn
  return {**cost_table.stats(*timed), **mem}


def predicted_vs_measured(table: dict[str, Any], arch: Arch, measured: dict[str, Any] | float) -> dict[str, Any]:
  """Sum of parts (fixed + every layer's sub-blocks, costs.predicted_totals) against the whole model.

  `measured`: a `measure_model` result (its decode entry at the table's batch gives the mean step
  time, its prefill entry at (batch, prompt_len) the prefill time), or a decode step time in seconds.
  Measure with decode_context = prompt_len and new_tokens = gen_len, so the mean context matches."""
  from puzzle_jax.search import costs
  pred = cost_table.predicted_totals(arch, table)
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
