"""Per-variant costs on the target hardware: prefill/decode time, weight bytes, KV bytes, params.

The MIP bounds a child's decode time, prefill time and memory by sums of per-sub-block costs, so
every candidate variant (named by `arch.variant_key`) is measured once, alone, and stored in a cost
table (JSON, format `puzzle_jax.costs/v1`, defined in `puzzle_jax.cost_table`; `serving.costs` writes
the same format from PyTorch).

What is timed, on the current JAX backend, with weights and activations in `Scenario.dtype`:
  prefill  one causal prompt [batch, prompt_len, D] through the sub-block, without a cache (as
           `model.forward` runs it; the Ctx comes from `model.forward_ctx`).
  decode   one new token [batch, 1, D] at the mean context c = prompt_len + gen_len // 2: the cache
           layer holds c slots of random K/V, the token's K/V are written into the last slot and it
           attends to all c keys (the Ctx is built as `model.extend` builds it). Decode time is affine
           in the context, so the step at the mean context times gen_len is the whole generation.
  Notes on model.py: `generate` preallocates prompt+gen slots and scores all of them (masked); we
  size the cache to the context instead (what a length-aware kernel pays), and `measure_model` does
  the same, so parts and whole compare. Window variants keep and score the whole cache there (the
  mask hides keys outside the window), so they time like full attention; their `kv_bytes` count
  only the window, as `Arch.kv_cache_bytes` does (a ring-buffer cache).

Method. One call of a small sub-block is mostly dispatch overhead, so one jitted call applies it
many times (`lax.fori_loop`, each output added to the residual stream that feeds the next
application, so XLA can neither hoist nor drop the work) and the call time is divided by the count.
The count is calibrated first on a loop whose trip count is a runtime argument (one compile; the
slope of call time over count cancels the dispatch overhead), then timed on a loop with a static
count, so that one call takes >= `min_call_s` (on GPU a static trip count also avoids a host sync per
pass). The loop body cycles through several copies of the weights (and of the KV cache) whose total
exceeds `flush_bytes` (at most `max_copies`), so they don't sit in the on-chip cache (H100 L2 is
50 MB; a CPU's L3) as one layer's weights would in a repeated loop, while a real model streams 30
different layers; on a CPU, one hot copy made a decode FFN look ~3.5x faster. An optimization
barrier ties each copy's weights to the loop-carried activations, so weight-only work (dtype
converts, layout changes) is redone per application as in a real step, not hoisted out of the
loop. The KV caches are loop state, donated and updated in place. Reported per application: the
median over `repeats` calls (after `warmup` calls), plus min and IQR, and `*_reps`, the
applications per timed call.
No-op variants cost exactly 0 and are not timed.

Axis legend as in `puzzle_jax.core.arch`: B batch, L prompt, S cache slots, D hidden, K kv heads, H head dim.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import time
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from puzzle_jax.core import model
from puzzle_jax.core.arch import DTYPE_BYTES, Arch, AttnSpec, FFNSpec, attn_flops, ffn_flops, kv_bytes_per_token
# The table format lives in `puzzle_jax.cost_table` (shared with the PyTorch side); re-exported here.
from puzzle_jax.cost_table import (FIXED_FIELDS, FORMAT, MODEL_DIMS, VARIANT_FIELDS, WORKLOAD_FIELDS,  # noqa: F401
                                   CostTableError, Scenario, arch_keys, as_spec, header, load_cost_table, memory,
                                   predicted_totals, save_cost_table, stats, validate_cost_table, weight_bytes)

_MAX_APPS = 1 << 16  # applications per timed call, at most.
_MAX_ROUNDS = 4  # timing rounds, if the calibrated count gave calls shorter than min_call_s / 2.
_JNP_DTYPES = {"fp8": "float8_e4m3fn"}



def _jnp_dtype(name: str) -> jnp.dtype:
  return jnp.dtype(_JNP_DTYPES.get(name, name))


# ----------------------------------------------------------------------------- timing
@dataclasses.dataclass(frozen=True)
class _Bench:
  """What to time: `step(shared, params, h, state) -> (h, state)` applied to one copy at a time.

  `prepare()` runs once per call inside the jit (RoPE tables, masks: shared by all layers in a real
  forward). `make_copy(i) -> (params, state)` builds the i-th copy; `copy_bytes` None = no copies.
  """
  prepare: Callable[[], Any]
  step: Callable[..., tuple[Any, Any]]
  make_copy: Callable[[int], tuple[Any, Any]]
  h: Any
  copy_bytes: int | None


def _loop(bench: _Bench, n_copies: int, n_inner: int | None) -> Callable:
  """jit of `fn(params_C, h, states_C, n) -> (h, states_C)`: n_inner passes over the copies.

  n_inner=None takes the pass count from `n` at run time (a while loop, for calibration only: on
  GPU a loop of unknown trip count syncs with the host every pass); a static count is what we time.
  """
  def run(params_C, h, states_C, n):
    shared = bench.prepare()

    def body(_, carry):
      h, states = carry
      out = []
      for p, s in zip(params_C, states):
        # Ties the weights to the loop-carried h, so weight-only work (dtype converts, layout
        # changes) can't be hoisted out of the loop and amortized: a real step redoes it per layer.
        h, p = jax.lax.optimization_barrier((h, p))
        h, s = bench.step(shared, p, h, s)
        out.append(s)
      return h, out

    return jax.lax.fori_loop(0, n if n_inner is None else n_inner, body, (h, list(states_C)))

  return jax.jit(run, donate_argnums=2)  # caches are updated in place, call after call.


def _calls(fn: Callable, params_C: list, h: Any, states_C: list, n: int, count: int) -> tuple[np.ndarray, list]:
  """Seconds of each of `count` calls, and the states to pass on (the old ones were donated)."""
  n_arr, times = jnp.int32(n), []  # on device once, not a transfer inside every timed call.
  for _ in range(count):
    t0 = time.perf_counter()
    _, states_C = jax.block_until_ready(fn(params_C, h, states_C, n_arr))
    times.append(time.perf_counter() - t0)
  return np.asarray(times), states_C


def _estimate_app_s(fn: Callable, params: Any, h: Any, states: list, sc: Scenario) -> tuple[float, list]:
  """Seconds per application from the slope of call time over pass count (dispatch cancels out)."""
  points = []
  n = 1
  while True:
    times, states = _calls(fn, [params], h, states, n, 3)
    points.append((n, float(np.median(times))))
    if points[-1][1] >= sc.min_call_s / 4 or n >= _MAX_APPS:
      break
    n *= 8
  (n0, t0), (n1, t1) = points[-2:] if len(points) > 1 else ((0, 0.0), points[0])
  slope = (t1 - t0) / (n1 - n0)
  return (slope if slope > 0 else t1 / n1), states


def _time(bench: _Bench, sc: Scenario) -> dict[str, float]:
  """Per-application time of calls of >= min_call_s (see the module docstring for the method)."""
  params, state = bench.make_copy(0)
  dynamic = _loop(bench, 1, None)
  _, states = _calls(dynamic, [params], bench.h, [state], 1, 1)  # compile
  apps = 1
  if sc.min_call_s > 0:
    app_s, states = _estimate_app_s(dynamic, params, bench.h, states, sc)
    apps = min(_MAX_APPS, math.ceil(sc.min_call_s / app_s))
  n_copies = 1
  if bench.copy_bytes is not None:  # even if fewer applications would do: a hot cache is too fast.
    n_copies = min(sc.max_copies, max(1, math.ceil(sc.flush_bytes / max(bench.copy_bytes, 1))))
  for _ in range(_MAX_ROUNDS):
    n_inner = math.ceil(apps / n_copies)
    reps = n_copies * n_inner
    if reps == 1:  # one pass of the calibration loop: no second compile (and no per-pass sync).
      times, states = _calls(dynamic, [params], bench.h, states, 1, sc.warmup + sc.repeats)
    else:
      copies = [bench.make_copy(c) for c in range(n_copies)]
      times, _ = _calls(_loop(bench, n_copies, n_inner), [p for p, _ in copies], bench.h,
                        [s for _, s in copies], n_inner, sc.warmup + sc.repeats)
    per_app = times[sc.warmup:] / reps
    call_s = float(np.median(per_app)) * reps
    if call_s >= sc.min_call_s / 2 or reps >= _MAX_APPS:
      break
    apps = min(_MAX_APPS, max(2 * reps, math.ceil(sc.min_call_s / (call_s / reps))))  # estimate was off.
  q25, q75 = np.percentile(per_app, [25, 75])
  return {"s": float(np.median(per_app)), "min": float(per_app.min()), "iqr": float(q75 - q25),
          "reps": reps}



def _normal(rng: np.random.Generator, shape: tuple[int, ...], dtype: jnp.dtype) -> jax.Array:
  # numpy, not jax.random: eager jax ops compile once per shape, which dominated small runs.
  return jnp.asarray(rng.standard_normal(shape, np.float32).astype(dtype))


def _random_params(init: Callable[[jax.Array], model.Params], seed: int) -> model.Params:
  """Params with the tree and shapes `init(key)` gives, filled like model.py's init (weights
  N(0, 1/fan_in), norms 1) by numpy: jax.random under XLA:CPU compiled slower than we time. On an
  accelerator `init` itself runs jitted on the device: numpy took minutes for 8192-wide FFNs."""
  if jax.default_backend() != "cpu":
    return jax.jit(init)(jax.random.PRNGKey(seed))
  rng = np.random.default_rng(seed)

  def fill(x: jax.ShapeDtypeStruct) -> jax.Array:
    if len(x.shape) < 2:
      return jnp.asarray(np.ones(x.shape, x.dtype))
    return jnp.asarray((rng.standard_normal(x.shape, np.float32) * x.shape[-1] ** -0.5).astype(x.dtype))

  return jax.tree.map(fill, jax.eval_shape(init, jax.random.PRNGKey(0)))


# ----------------------------------------------------------------------------- sub-blocks
def _ctx(arch: Arch, sc: Scenario, mode: str, window: int | None) -> model.Ctx:
  """The attention context of a full causal prompt (prefill) or of one token at the mean context."""
  B = sc.batch
  if mode == "prefill":
    ctx = model.forward_ctx(arch, jnp.zeros((B, sc.prompt_len), jnp.int32))
  else:  # as model.extend builds it: the new token sits in the last of S slots, all valid.
    S = sc.decode_context
    ctx = model.Ctx(arch, jnp.full((B, 1), S - 1, jnp.int32), jnp.ones((B, S), bool),
                    (S - 1) + jnp.arange(1), jnp.int32(S - 1))
  ctx.mask(window)  # built here, outside the loop body, so the body closes over one mask.
  return ctx


def _subblock_bench(arch: Arch, spec: AttnSpec | FFNSpec, sc: Scenario, mode: str, seed: int) -> _Bench:
  is_attn = isinstance(spec, AttnSpec)
  kv_name = (is_attn and spec.kv_dtype) or sc.kv_dtype  # an FP8-KV candidate keeps its own cache dtype
  dt, kv_dt = _jnp_dtype(sc.dtype), _jnp_dtype(kv_name)
  B, D = sc.batch, arch.hidden_size
  L = sc.prompt_len if mode == "prefill" else 1
  with_cache = is_attn and spec.has_cache and mode == "decode"
  cache_shape = (B, sc.decode_context, spec.num_kv_heads or 0, arch.head_dim) if is_attn else ()

  def make_copy(c: int):
    params = _random_params(lambda k: (model.attn_init if is_attn else model.ffn_init)(k, spec, arch, dt),
                            seed + 7919 * c)
    rng = np.random.default_rng([seed, c])
    cache = None
    if with_cache:
      cache = {"k": _normal(rng, cache_shape, kv_dt), "v": _normal(rng, cache_shape, kv_dt)}
    return params, cache

  def step(ctx, p, h, cache):
    if is_attn:
      delta, cache = model.attn_apply(p, h, spec, arch, ctx, cache)
    else:
      delta = model.ffn_apply(p, h, spec, arch)
    return (h + delta).astype(h.dtype), cache  # the residual add feeds the next application.

  copy_bytes = weight_bytes(arch, spec, sc.dtype)
  if with_cache:
    copy_bytes += 2 * math.prod(cache_shape) * DTYPE_BYTES[kv_name]
  prepare = (lambda: _ctx(arch, sc, mode, spec.window)) if is_attn else (lambda: None)
  h = _normal(np.random.default_rng([seed, 1 << 20]), (B, L, D), dt)
  return _Bench(prepare, step, make_copy, h, copy_bytes)



def measure_variant(arch: Arch, spec: AttnSpec | FFNSpec | str, scenario: Scenario, *,
                    seed: int = 0) -> dict[str, float]:
  """Time one sub-block variant alone (prefill and decode) and account its memory exactly."""
  spec = as_spec(spec)
  mem = memory(arch, spec, scenario)
  if spec.kind == "noop":
    return {**stats(*[{"s": 0.0, "min": 0.0, "iqr": 0.0, "reps": 0}] * 2), **mem}
  timed = [_time(_subblock_bench(arch, spec, scenario, mode, seed), scenario) for mode in ("prefill", "decode")]
  return {**stats(*timed), **mem}


# ----------------------------------------------------------------------------- fixed part, whole model
def _token_feedback(tokens_BxL: jax.Array, logits_BxLxV: jax.Array) -> jax.Array:
  """Greedy next token (as generate samples it) written over position 0: the loop dependency."""
  nxt_B = jnp.argmax(logits_BxLxV[:, -1], axis=-1).astype(jnp.int32)
  return tokens_BxL.at[:, 0].set(nxt_B)


def _tokens(arch: Arch, sc: Scenario, mode: str, seed: int) -> jax.Array:
  L = sc.prompt_len if mode == "prefill" else 1
  return jnp.asarray(np.random.default_rng(seed).integers(0, arch.vocab_size, (sc.batch, L), np.int32))


def measure_fixed(arch: Arch, scenario: Scenario, *, seed: int = 0) -> dict[str, float]:
  """Embedding lookup, final norm and LM head (logits at every position, as model.py computes
  them), timed like the sub-blocks; the greedy next token feeds the next application."""
  dt = _jnp_dtype(scenario.dtype)
  params = _random_params(lambda k: model.init_params(k, dataclasses.replace(arch, blocks=()), dt), seed)

  def step(_, p, tokens, state):
    logits = model.lm_head(arch, p, model.embed(p, tokens, dt))
    return _token_feedback(tokens, logits), state

  timed = [_time(_Bench(lambda: None, step, lambda c: (params, None), _tokens(arch, scenario, mode, seed), None),
                 scenario) for mode in ("prefill", "decode")]
  return {**stats(*timed), "weight_bytes": arch.fixed_params() * DTYPE_BYTES[scenario.dtype],
          "params": arch.fixed_params()}


def _decode_cache(arch: Arch, sc: Scenario, seed: int) -> model.Cache:
  """A cache of decode_context slots, all but the last holding random K/V, as after a prefill."""
  S = sc.decode_context
  cache = model.init_cache(arch, sc.batch, S, _jnp_dtype(sc.kv_dtype))
  rng = np.random.default_rng([seed, 1 << 21])
  cache["layers"] = [None if c is None else {k: _normal(rng, v.shape, v.dtype) for k, v in c.items()}
                     for c in cache["layers"]]
  return {**cache, "index": jnp.int32(S - 1), "valid": jnp.ones((sc.batch, S), bool),
          "next_pos": jnp.full((sc.batch,), S - 1, jnp.int32)}


def measure_model(arch: Arch, params: model.Params | None, scenario: Scenario, *,
                  seed: int = 0) -> dict[str, float]:
  """Time the whole model: one prefill (`model.forward`) and one decode step (`model.extend` on a
  cache at the mean context), to check the cost model (fixed + sum of parts) against the whole."""
  dt = _jnp_dtype(scenario.dtype)
  if params is None:
    params = _random_params(lambda k: model.init_params(k, arch, dt), seed)
  else:
    params = jax.tree.map(lambda x: x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)

  def prefill(_, p, tokens, state):
    return _token_feedback(tokens, model.forward(arch, p, tokens, dtype=dt)), state

  def decode(_, p, tokens, cache):
    logits, new = model.extend(arch, p, tokens, cache, dtype=dt)
    # Same slot every step: the context (and so the cost) stays the mean one.
    return _token_feedback(tokens, logits), {**new, "index": cache["index"], "next_pos": cache["next_pos"]}

  timed = []
  for mode, step in (("prefill", prefill), ("decode", decode)):
    make_copy = lambda c, mode=mode: (params, _decode_cache(arch, scenario, seed) if mode == "decode" else None)
    bench = _Bench(lambda: None, step, make_copy, _tokens(arch, scenario, mode, seed), None)
    timed.append(_time(bench, scenario))
  return {**stats(*timed), "weight_bytes": arch.weight_bytes(scenario.dtype),
          "kv_bytes": arch.kv_cache_bytes(scenario.batch, scenario.max_context, scenario.kv_dtype),
          "params": arch.num_params()}


# ----------------------------------------------------------------------------- tables

def cost_table(arch: Arch, variant_keys: Iterable[str], scenario: Scenario, *, progress: bool = True,
               seed: int = 0) -> dict[str, Any]:
  """Measure the fixed part and each distinct variant key once on the current JAX backend."""
  keys = list(dict.fromkeys(variant_keys))
  specs = {k: as_spec(k) for k in keys}  # fail on a bad key before any timing.
  table = header(arch, scenario, jax.default_backend(), jax.devices()[0].device_kind)
  table["fixed"] = measure_fixed(arch, scenario, seed=seed)
  for k in tqdm(keys, desc="costs", disable=not progress):
    table["variants"][k] = measure_variant(arch, specs[k], scenario, seed=seed)
  return table



# ----------------------------------------------------------------------------- analytic
def _roofline(flops: float, io_bytes: float, peak_flops: float, bandwidth: float) -> float:
  return max(flops / peak_flops, io_bytes / bandwidth)


def _analytic_variant(arch: Arch, spec: AttnSpec | FFNSpec, sc: Scenario, peak_flops: float,
                      bandwidth: float) -> dict[str, float]:
  """Ideal FLOPs (causal prefill counts half the scores) and bytes moved: weights, activations in
  and out, K/V written (prefill) or read (decode)."""
  mem = memory(arch, spec, sc)
  B, L, act = sc.batch, sc.prompt_len, DTYPE_BYTES[sc.dtype]
  D, N, H = arch.hidden_size, arch.num_heads, arch.head_dim
  out = dict(mem)
  for mode, tokens, ctx in (("prefill", B * L, L), ("decode", B, sc.decode_context)):
    if spec.kind == "noop":
      flops = io = 0.0
    elif isinstance(spec, AttnSpec):
      flops = tokens * attn_flops(spec, D, N, H, ctx, mode)
      kv_tokens = tokens if mode == "prefill" else B * min(ctx, spec.window or ctx)
      io = mem["weight_bytes"] + 2 * tokens * D * act + kv_tokens * kv_bytes_per_token(spec, H, sc.kv_dtype)
    else:
      flops = tokens * ffn_flops(spec, D)
      io = _ffn_weight_bytes_read(spec, mem["weight_bytes"], tokens) + 2 * tokens * D * act
    out.update({f"{mode}_s": _roofline(flops, io, peak_flops, bandwidth), f"{mode}_flops": float(flops),
                f"{mode}_io_bytes": float(io)})
  return out


def _ffn_weight_bytes_read(spec: FFNSpec, weight_bytes: float, tokens: int) -> float:
  """A MoE reads at most the experts its tokens route to: all E at large batch, k*tokens when few
  tokens decode (why expert pruning saves memory more than decode time at small batch)."""
  if spec.kind != "moe":
    return weight_bytes
  return weight_bytes * min(1.0, tokens * spec.top_k / spec.num_experts)


def _analytic_fixed(arch: Arch, sc: Scenario, peak_flops: float, bandwidth: float) -> dict[str, float]:
  """Embedding rows read, LM head at every position (as model.py computes it), f32 logits written."""
  B, L, D, V, act = sc.batch, sc.prompt_len, arch.hidden_size, arch.vocab_size, DTYPE_BYTES[sc.dtype]
  out = {"weight_bytes": arch.fixed_params() * act, "params": arch.fixed_params()}
  for mode, tokens in (("prefill", B * L), ("decode", B)):
    flops = tokens * 2 * V * D
    io = V * D * act + tokens * D * act + tokens * V * 4
    out.update({f"{mode}_s": _roofline(flops, io, peak_flops, bandwidth), f"{mode}_flops": float(flops),
                f"{mode}_io_bytes": float(io)})
  return out


def analytic_table(arch: Arch, keys: Iterable[str], scenario: Scenario, *, peak_flops: float,
                   bandwidth: float) -> dict[str, Any]:
  """Roofline cost table, max(FLOPs / peak_flops, bytes / bandwidth), in the measured format.

  For planning without the target hardware and for tests; `peak_flops` in FLOP/s, `bandwidth` in B/s.
  """
  table = header(arch, scenario, "analytic", f"roofline {peak_flops:.3g} FLOP/s, {bandwidth:.3g} B/s")
  table["fixed"] = _analytic_fixed(arch, scenario, peak_flops, bandwidth)
  for k in dict.fromkeys(keys):
    table["variants"][k] = _analytic_variant(arch, as_spec(k), scenario, peak_flops, bandwidth)
  return table
