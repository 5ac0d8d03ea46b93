"""Per-variant costs on the target hardware: prefill/decode time, weight bytes, KV bytes, params.

The MIP bounds a child's decode time, prefill time and memory by sums of per-sub-block costs, so
every candidate variant (named by `arch.variant_key`) is measured once, alone, and stored in a cost
table (JSON, format `puzzle_jax.costs/v1`; other harnesses write the same format).

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
import json
import math
import os
import pathlib
import time
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from puzzle_jax.artifacts import ArtifactError
from puzzle_jax.core import model
from puzzle_jax.core.arch import (DTYPE_BYTES, Arch, ArchError, AttnSpec, FFNSpec, attn_flops, ffn_flops,
                             kv_bytes_per_token, spec_from_key, variant_key)

FORMAT = "puzzle_jax.costs/v1"
MODEL_DIMS = ("hidden_size", "num_heads", "head_dim")  # must match; vocab_size is checked if present.
FIXED_FIELDS = ("prefill_s", "decode_s", "weight_bytes", "params")
VARIANT_FIELDS = ("prefill_s", "decode_s", "weight_bytes", "kv_bytes", "params")
WORKLOAD_FIELDS = ("batch", "prompt_len", "gen_len", "dtype", "kv_dtype")  # what, not how, is timed.
_MAX_APPS = 1 << 16  # applications per timed call, at most.
_MAX_ROUNDS = 4  # timing rounds, if the calibrated count gave calls shorter than min_call_s / 2.
_JNP_DTYPES = {"fp8": "float8_e4m3fn"}


class CostTableError(ArtifactError):
  """A cost table unusable for this model or these candidates; the message says how to fix it."""

  def __init__(self, message: str, path: str | os.PathLike | None = None):
    super().__init__(None, message)
    self.path = pathlib.Path(path) if path is not None else None


@dataclasses.dataclass(frozen=True)
class Scenario:
  """The serving workload the costs describe, plus how to time it."""
  batch: int = 8  # concurrent sequences.
  prompt_len: int = 256  # prompt tokens per sequence.
  gen_len: int = 128  # generated tokens per sequence.
  dtype: str = "bfloat16"  # weights and activations when timing; weight bytes.
  kv_dtype: str = "bfloat16"  # KV cache when timing; KV bytes.
  repeats: int = 10  # timed calls; the median is reported.
  warmup: int = 2  # untimed calls first (the first one compiles).
  min_call_s: float = 5e-3  # grow the in-jit repeat count until one call takes this long.
  flush_bytes: int = 128 * 2**20  # cycle weight/cache copies until their total exceeds this.
  max_copies: int = 32  # at most this many copies (each one is unrolled in the loop body).

  def __post_init__(self):
    for name in ("batch", "prompt_len", "gen_len", "repeats", "warmup", "max_copies"):
      if getattr(self, name) < 1:
        raise ValueError(f"Scenario.{name} must be >= 1, got {getattr(self, name)}")
    for name in ("dtype", "kv_dtype"):
      if getattr(self, name) not in DTYPE_BYTES:
        raise ValueError(f"Scenario.{name}={getattr(self, name)!r} unknown; use one of {list(DTYPE_BYTES)}")

  @property
  def decode_context(self) -> int:
    """Keys the timed decode token attends to: the mean over the generation."""
    return self.prompt_len + self.gen_len // 2

  @property
  def max_context(self) -> int:
    """Tokens per sequence at the end of generation: what the KV cache must hold."""
    return self.prompt_len + self.gen_len

  def workload(self) -> dict[str, Any]:
    return {k: getattr(self, k) for k in WORKLOAD_FIELDS}


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


def _stats(prefill: dict[str, float], decode: dict[str, float]) -> dict[str, float]:
  out = {}
  for mode, r in (("prefill", prefill), ("decode", decode)):
    out.update({f"{mode}_s": r["s"], f"{mode}_s_min": r["min"], f"{mode}_s_iqr": r["iqr"],
                f"{mode}_reps": r["reps"]})
  return out


def _normal(rng: np.random.Generator, shape: tuple[int, ...], dtype: jnp.dtype) -> jax.Array:
  # numpy, not jax.random: eager jax ops compile once per shape, which dominated small runs.
  return jnp.asarray(rng.standard_normal(shape, np.float32).astype(dtype))


def _random_params(init: Callable[[jax.Array], model.Params], seed: int) -> model.Params:
  """Params with the tree and shapes `init(key)` gives, filled like model.py's init (weights
  N(0, 1/fan_in), norms 1) by numpy: jax.random under XLA:CPU compiled slower than we time."""
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

  copy_bytes = _weight_bytes(arch, spec, sc.dtype)
  if with_cache:
    copy_bytes += 2 * math.prod(cache_shape) * DTYPE_BYTES[kv_name]
  prepare = (lambda: _ctx(arch, sc, mode, spec.window)) if is_attn else (lambda: None)
  h = _normal(np.random.default_rng([seed, 1 << 20]), (B, L, D), dt)
  return _Bench(prepare, step, make_copy, h, copy_bytes)


def _params(arch: Arch, spec: AttnSpec | FFNSpec) -> int:
  return arch.attn_params(spec) if isinstance(spec, AttnSpec) else arch.ffn_params(spec)


def _weight_bytes(arch: Arch, spec: AttnSpec | FFNSpec, dtype: str) -> int:
  return _params(arch, spec) * DTYPE_BYTES[dtype]


def _kv_bytes(arch: Arch, spec: AttnSpec | FFNSpec, sc: Scenario) -> int:
  """Cache bytes at the end of generation (window variants: only the window), from head_dim."""
  if not isinstance(spec, AttnSpec):
    return 0
  slots = min(sc.max_context, spec.window or sc.max_context)
  return sc.batch * slots * kv_bytes_per_token(spec, arch.head_dim, sc.kv_dtype)


def _memory(arch: Arch, spec: AttnSpec | FFNSpec, sc: Scenario) -> dict[str, int]:
  return {"weight_bytes": _weight_bytes(arch, spec, sc.dtype), "kv_bytes": _kv_bytes(arch, spec, sc),
          "params": _params(arch, spec)}


def _as_spec(spec: AttnSpec | FFNSpec | str) -> AttnSpec | FFNSpec:
  if not isinstance(spec, str):
    return spec
  try:
    parsed = spec_from_key(spec)
  except (ValueError, IndexError) as e:
    raise ArchError(f"bad variant key {spec!r} ({e}); keys look like 'attn/gqa_kv3', 'ffn/swiglu_768'")
  if variant_key(parsed) != spec:
    raise ArchError(f"variant key {spec!r} is not canonical; did you mean {variant_key(parsed)!r}?")
  return parsed


def measure_variant(arch: Arch, spec: AttnSpec | FFNSpec | str, scenario: Scenario, *,
                    seed: int = 0) -> dict[str, float]:
  """Time one sub-block variant alone (prefill and decode) and account its memory exactly."""
  spec = _as_spec(spec)
  mem = _memory(arch, spec, scenario)
  if spec.kind == "noop":
    return {**_stats(*[{"s": 0.0, "min": 0.0, "iqr": 0.0, "reps": 0}] * 2), **mem}
  timed = [_time(_subblock_bench(arch, spec, scenario, mode, seed), scenario) for mode in ("prefill", "decode")]
  return {**_stats(*timed), **mem}


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
  return {**_stats(*timed), "weight_bytes": arch.fixed_params() * DTYPE_BYTES[scenario.dtype],
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
  return {**_stats(*timed), "weight_bytes": arch.weight_bytes(scenario.dtype),
          "kv_bytes": arch.kv_cache_bytes(scenario.batch, scenario.max_context, scenario.kv_dtype),
          "params": arch.num_params()}


# ----------------------------------------------------------------------------- tables
def arch_keys(arch: Arch) -> list[str]:
  """Distinct variant keys an architecture uses, in layer order."""
  return list(dict.fromkeys(variant_key(s) for b in arch.blocks for s in (b.attn, b.ffn)))


def _header(arch: Arch, scenario: Scenario, backend: str, device: str) -> dict[str, Any]:
  return {"format": FORMAT, "backend": backend, "device": device,
          "scenario": dataclasses.asdict(scenario) | {"decode_context": scenario.decode_context},
          "model": {"hidden_size": arch.hidden_size, "num_heads": arch.num_heads, "head_dim": arch.head_dim,
                    "vocab_size": arch.vocab_size},
          "fixed": {}, "variants": {}}


def cost_table(arch: Arch, variant_keys: Iterable[str], scenario: Scenario, *, progress: bool = True,
               seed: int = 0) -> dict[str, Any]:
  """Measure the fixed part and each distinct variant key once on the current JAX backend."""
  keys = list(dict.fromkeys(variant_keys))
  specs = {k: _as_spec(k) for k in keys}  # fail on a bad key before any timing.
  table = _header(arch, scenario, jax.default_backend(), jax.devices()[0].device_kind)
  table["fixed"] = measure_fixed(arch, scenario, seed=seed)
  for k in tqdm(keys, desc="costs", disable=not progress):
    table["variants"][k] = measure_variant(arch, specs[k], scenario, seed=seed)
  return table


def save_cost_table(table: dict[str, Any], path: str | os.PathLike) -> None:
  """Write atomically (a crash never leaves half a table for the MIP to read)."""
  validate_cost_table(table, source=str(path))
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(json.dumps(table, indent=1, allow_nan=False) + "\n")
  os.replace(tmp, path)


def load_cost_table(path: str | os.PathLike, arch: Arch | None = None, keys: Iterable[str] | None = None, *,
                    scenario: Scenario | None = None) -> dict[str, Any]:
  """Read a cost table and check it fits: format, model dims (if arch), keys, workload (if scenario)."""
  try:
    table = json.loads(pathlib.Path(path).read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CostTableError(f"{path}: not valid JSON ({e}); re-run the costs stage", path) from e
  try:
    validate_cost_table(table, arch, keys, scenario=scenario, source=str(path))
  except CostTableError as e:
    raise CostTableError(str(e), path) from None
  return table


def validate_cost_table(table: Any, arch: Arch | None = None, keys: Iterable[str] | None = None, *,
                        scenario: Scenario | None = None, source: str = "cost table") -> None:
  """Raise CostTableError with a fix-it message if `table` can't serve `arch`/`keys`/`scenario`."""
  fmt = table.get("format") if isinstance(table, dict) else None
  if fmt != FORMAT:
    if isinstance(fmt, str) and fmt.startswith("puzzle_jax.costs/"):
      raise CostTableError(f"{source}: cost-table version {fmt!r} is not supported (this code reads "
                           f"{FORMAT!r}); re-run the costs stage to regenerate it")
    raise CostTableError(f"{source}: not a puzzle_jax cost table (format={fmt!r}, expected {FORMAT!r})")
  for part in ("model", "fixed", "variants"):
    if not isinstance(table.get(part), dict):
      raise CostTableError(f"{source}: cost table has no {part!r} section")
  _check_entry(table["fixed"], FIXED_FIELDS, f"{source}: fixed part")
  for k, v in table["variants"].items():
    _check_entry(v, VARIANT_FIELDS, f"{source}: variant {k!r}")
  if arch is not None:
    _check_model(table["model"], arch, source)
  if keys is not None:
    missing = sorted(set(keys) - set(table["variants"]))
    if missing:
      raise CostTableError(f"{source}: cost table lacks {len(missing)} needed variant(s): {missing}; re-run "
                           f"the costs stage with these candidates or pass a table that covers them")
  if scenario is not None:
    _check_workload(table.get("scenario", {}), scenario, source)


def _check_entry(entry: Any, fields: tuple[str, ...], what: str) -> None:
  if not isinstance(entry, dict):
    raise CostTableError(f"{what} is not an object")
  missing = [f for f in fields if f not in entry]
  if missing:
    raise CostTableError(f"{what} lacks field(s) {missing}")
  bad = [f for f in fields
         if not (isinstance(entry[f], (int, float)) and math.isfinite(entry[f]) and entry[f] >= 0)]
  if bad:
    raise CostTableError(f"{what}: field(s) {bad} are not finite non-negative numbers")


def _check_model(dims: dict[str, Any], arch: Arch, source: str) -> None:
  want = {"hidden_size": arch.hidden_size, "num_heads": arch.num_heads, "head_dim": arch.head_dim,
          "vocab_size": arch.vocab_size}
  names = MODEL_DIMS + (("vocab_size",) if "vocab_size" in dims else ())
  diff = {k: (dims.get(k), want[k]) for k in names if dims.get(k) != want[k]}
  if diff:
    detail = ", ".join(f"{k}: table {t} vs model {m}" for k, (t, m) in diff.items())
    raise CostTableError(f"{source}: the cost table was measured for another model ({detail}); re-run the "
                         f"costs stage for this model or pass a table measured for it")


def _check_workload(got: dict[str, Any], scenario: Scenario, source: str) -> None:
  diff = {k: (got.get(k), v) for k, v in scenario.workload().items() if got.get(k) != v}
  if diff:
    detail = ", ".join(f"{k}: table {t} vs wanted {w}" for k, (t, w) in diff.items())
    raise CostTableError(f"{source}: the cost table was measured for another scenario ({detail}); re-run "
                         f"the costs stage with this scenario")


def predicted_totals(arch: Arch, table: dict[str, Any]) -> dict[str, float]:
  """Fixed part + every layer's attention and FFN costs: the cost model of a whole arch."""
  validate_cost_table(table, arch, arch_keys(arch))
  totals = {k: table["fixed"][k] for k in FIXED_FIELDS} | {"kv_bytes": 0}
  for b in arch.blocks:
    for spec in (b.attn, b.ffn):
      entry = table["variants"][variant_key(spec)]
      for k in VARIANT_FIELDS:
        totals[k] += entry[k]
  return totals


# ----------------------------------------------------------------------------- analytic
def _roofline(flops: float, io_bytes: float, peak_flops: float, bandwidth: float) -> float:
  return max(flops / peak_flops, io_bytes / bandwidth)


def _analytic_variant(arch: Arch, spec: AttnSpec | FFNSpec, sc: Scenario, peak_flops: float,
                      bandwidth: float) -> dict[str, float]:
  """Ideal FLOPs (causal prefill counts half the scores) and bytes moved: weights, activations in
  and out, K/V written (prefill) or read (decode)."""
  mem = _memory(arch, spec, sc)
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
  table = _header(arch, scenario, "analytic", f"roofline {peak_flops:.3g} FLOP/s, {bandwidth:.3g} B/s")
  table["fixed"] = _analytic_fixed(arch, scenario, peak_flops, bandwidth)
  for k in dict.fromkeys(keys):
    table["variants"][k] = _analytic_variant(arch, _as_spec(k), scenario, peak_flops, bandwidth)
  return table
