"""The cost-table format (`puzzle_jax.costs/v1`): what `search.costs` (JAX) and `serving.costs`
(PyTorch) write and the MIP reads, and the checks that a table fits a model, candidates and workload.

A table is JSON: {"format", "backend", "device", "scenario": the `Scenario` plus its decode
context, "model": the dims it was measured for, "fixed": embedding + head + final norm costs,
"variants": {variant key (`arch.variant_key`): costs}}. Each cost entry holds `prefill_s` and
`decode_s` (seconds per application, median; `*_min`, `*_iqr`, `*_reps` beside them),
`weight_bytes`, `params` and, for variants, `kv_bytes` (at the end of generation).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
from typing import Any, Iterable

from puzzle_jax.artifacts import ArtifactError
from puzzle_jax.core.arch import (DTYPE_BYTES, Arch, ArchError, AttnSpec, FFNSpec, kv_bytes_per_token, spec_from_key,
                                  variant_key)

FORMAT = "puzzle_jax.costs/v1"
MODEL_DIMS = ("hidden_size", "num_heads", "head_dim")  # must match; vocab_size is checked if present.
FIXED_FIELDS = ("prefill_s", "decode_s", "weight_bytes", "params")
VARIANT_FIELDS = ("prefill_s", "decode_s", "weight_bytes", "kv_bytes", "params")
WORKLOAD_FIELDS = ("batch", "prompt_len", "gen_len", "dtype", "kv_dtype")  # what, not how, is timed.


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



def stats(prefill: dict[str, float], decode: dict[str, float]) -> dict[str, float]:
  """Timings of both modes ({"s", "min", "iqr", "reps"} each) -> the entry's timing fields."""
  out = {}
  for mode, r in (("prefill", prefill), ("decode", decode)):
    out.update({f"{mode}_s": r["s"], f"{mode}_s_min": r["min"], f"{mode}_s_iqr": r["iqr"],
                f"{mode}_reps": r["reps"]})
  return out



def params_of(arch: Arch, spec: AttnSpec | FFNSpec) -> int:
  return arch.attn_params(spec) if isinstance(spec, AttnSpec) else arch.ffn_params(spec)


def weight_bytes(arch: Arch, spec: AttnSpec | FFNSpec, dtype: str) -> int:
  return params_of(arch, spec) * DTYPE_BYTES[dtype]


def kv_bytes(arch: Arch, spec: AttnSpec | FFNSpec, sc: Scenario) -> int:
  """Cache bytes at the end of generation (window variants: only the window), from head_dim."""
  if not isinstance(spec, AttnSpec):
    return 0
  slots = min(sc.max_context, spec.window or sc.max_context)
  return sc.batch * slots * kv_bytes_per_token(spec, arch.head_dim, sc.kv_dtype)


def memory(arch: Arch, spec: AttnSpec | FFNSpec, sc: Scenario) -> dict[str, int]:
  """A variant's size fields: weight bytes, KV bytes at the end of generation, parameters."""
  return {"weight_bytes": weight_bytes(arch, spec, sc.dtype), "kv_bytes": kv_bytes(arch, spec, sc),
          "params": params_of(arch, spec)}


def as_spec(spec: AttnSpec | FFNSpec | str) -> AttnSpec | FFNSpec:
  """A spec, or the spec a canonical variant key names (a bad key raises, naming the fix)."""
  if not isinstance(spec, str):
    return spec
  try:
    parsed = spec_from_key(spec)
  except (ValueError, IndexError) as e:
    raise ArchError(f"bad variant key {spec!r} ({e}); keys look like 'attn/gqa_kv3', 'ffn/swiglu_768'")
  if variant_key(parsed) != spec:
    raise ArchError(f"variant key {spec!r} is not canonical; did you mean {variant_key(parsed)!r}?")
  return parsed



def arch_keys(arch: Arch) -> list[str]:
  """Distinct variant keys an architecture uses, in layer order."""
  return list(dict.fromkeys(variant_key(s) for b in arch.blocks for s in (b.attn, b.ffn)))


def header(arch: Arch, scenario: Scenario, backend: str, device: str) -> dict[str, Any]:
  """An empty table for `arch` under `scenario`, measured by `backend` on `device`."""
  return {"format": FORMAT, "backend": backend, "device": device,
          "scenario": dataclasses.asdict(scenario) | {"decode_context": scenario.decode_context},
          "model": {"hidden_size": arch.hidden_size, "num_heads": arch.num_heads, "head_dim": arch.head_dim,
                    "vocab_size": arch.vocab_size},
          "fixed": {}, "variants": {}}



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

