"""Before launching: each stage's time and peak memory on this machine, from FLOPs, bytes and one probe.

The probe compiles and runs one forward of the parent's shapes (random weights) at the scoring batch;
its compile time and achieved FLOP/s scale to every stage by what the stage does: how many distinct
programs it compiles (in units of that forward) and how many forward-equivalent FLOPs it runs.
The constants below were fitted to the stage times recorded by `:tiny` and default runs on a 2-core
CPU (BENCHMARKS.md, "plan"); the aim is the right order of magnitude, not a benchmark.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Mapping, Sequence

import numpy as np

from puzzle_jax.core.arch import Arch

GB = 1 << 30
_IMPORT_S_PER_PARAM = 25e-9  # GGUF dequantize / safetensors read, numpy on one core
_SAVE_BYTES_PER_S = 250e6  # orbax write of a checkpoint
_MIP_S_PER_SOLVE = 0.1  # HiGHS on a few hundred binaries, with CVXPY's canonicalization


@dataclasses.dataclass(frozen=True)
class Probe:
  compile_s: float  # jit compile of one forward of the parent's shapes
  run_s: float  # one run of it
  flops: float  # FLOPs of that run

  @property
  def flops_per_s(self) -> float:
    return self.flops / max(self.run_s, 1e-9)


def forward_flops(arch: Arch, tokens: int, seq_len: int) -> float:
  """FLOPs of a forward over `tokens` tokens (LM head included) at sequences of `seq_len`."""
  return tokens * (arch.flops_per_token(seq_len, "prefill") + 2 * arch.hidden_size * arch.vocab_size)


def probe(arch: Arch, batch: int, seq_len: int) -> Probe:
  """Compile and time one forward of `arch` (random weights: shapes are what cost time)."""
  import jax
  import jax.numpy as jnp
  from puzzle_jax.core import model
  params = model.init_params(jax.random.PRNGKey(0), arch)
  tokens = jnp.zeros((batch, seq_len), jnp.int32)
  fwd = jax.jit(lambda p, t: model.forward(arch, p, t))
  t0 = time.perf_counter()
  compiled = fwd.lower(params, tokens).compile()
  compile_s = time.perf_counter() - t0
  jax.block_until_ready(compiled(params, tokens))
  t0 = time.perf_counter()
  jax.block_until_ready(compiled(params, tokens))
  return Probe(compile_s, time.perf_counter() - t0, forward_flops(arch, batch * seq_len, seq_len))


@dataclasses.dataclass(frozen=True)
class Work:
  """What a search does, in the numbers that set its cost (from the config and the library)."""
  source_params: int  # parameters read at import (the whole parent, before any truncation)
  candidates: int  # candidates in the library (parent variants and no-ops included)
  trained: int  # candidates BLD trains
  groups: int  # same-shape groups BLD vmaps over (one compiled update each)
  bld: Mapping[str, Any]  # steps, batch_size, seq_len, calib_batches, eval_batches
  score: Mapping[str, Any]  # num_seqs, seq_len, batch_size, candidate_chunk
  eval: Mapping[str, Any]  # num_seqs, seq_len, batch_size
  costs_backend: str
  variants: int  # distinct variant keys (what the costs stage times)
  sweep: int  # speed targets the MIP and evaluate solve for
  gkd: Mapping[str, Any] = dataclasses.field(default_factory=lambda: {"steps": 0, "batch_size": 1, "seq_len": 1})
  distill_data: Mapping[str, Any] = dataclasses.field(  # num_tokens, batch_size, prompt_len, max_new_tokens
      default_factory=lambda: {"num_tokens": 0, "batch_size": 1, "prompt_len": 1, "max_new_tokens": 1})
  lm_eval_requests: int = 0  # lm-eval requests per model in evaluate (documents x choices; 0 = off)
  upcycle: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # num_experts (0 = off), steps, ...


def _fwd_s(arch: Arch, p: Probe, tokens: int, seq_len: int) -> float:
  return forward_flops(arch, tokens, seq_len) / p.flops_per_s


def stage_seconds(arch: Arch, p: Probe, w: Work) -> dict[str, float]:
  """Estimated wall seconds of each stage."""
  n, weights = arch.num_layers, 4 * arch.num_params()
  b, s, e = w.bld, w.score, w.eval
  bld_tokens = b["batch_size"] * b["seq_len"]
  per_layer_candidates = w.trained / max(n, 1)
  bld_step = _fwd_s(arch, p, bld_tokens, b["seq_len"]) * (1 + 3 * per_layer_candidates / 2)
  u = w.upcycle
  # n layers x steps x (forward + backward of one layer on batch_tokens ~ 3/n of a model forward).
  upcycle = (0.1 if not u.get("num_experts") else
             p.compile_s * 2 + u["calib_seqs"] * _fwd_s(arch, p, u["seq_len"], u["seq_len"])
             + u["steps"] * 3 * _fwd_s(arch, p, u["batch_tokens"], 1) + 2 * weights / _SAVE_BYTES_PER_S)
  return {
      "import": _IMPORT_S_PER_PARAM * w.source_params + weights / _SAVE_BYTES_PER_S,
      "upcycle": upcycle,
      "bld": (p.compile_s * (2 + w.groups / 2) + b["steps"] * bld_step
              + (b["calib_batches"] + b["eval_batches"]) * _fwd_s(arch, p, bld_tokens, b["seq_len"])
              * (1 + per_layer_candidates) + 2 * weights / _SAVE_BYTES_PER_S),
      "score": (p.compile_s * (n + 1)
                + w.candidates / 2 * _fwd_s(arch, p, s["num_seqs"] * s["seq_len"], s["seq_len"])),
      # measure: a prefill and a decode program compiled and calibrated per variant.
      "costs": (0.1 if w.costs_backend == "analytic" else 16 * w.variants * p.compile_s / max(n, 1)),
      "mip": _MIP_S_PER_SOLVE * (1 + w.sweep),
      "realize": 0.3 + 2 * weights / _SAVE_BYTES_PER_S,
      "distill-data": _distill_data_s(arch, p, w.distill_data),
      # GKD: teacher forward + student forward and backward (~4 forwards) per step; the step, the
      # before/after evaluation and the checkpoint restore compile about a dozen forward-sized programs.
      "gkd": 12 * p.compile_s + w.gkd["steps"] * 4 * _fwd_s(arch, p, w.gkd["batch_size"] * w.gkd["seq_len"],
                                                           w.gkd["seq_len"]),
      "evaluate": ((1 + 3 * w.sweep) * (p.compile_s + _fwd_s(arch, p, e["num_seqs"] * e["seq_len"], e["seq_len"]))
                   + _lm_eval_s(arch, p, w.lm_eval_requests)),
  }


def _distill_data_s(arch: Arch, p: Probe, d: Mapping[str, Any]) -> float:
  """Decoding is one token per row per step: each step costs about a forward of `batch_size` tokens."""
  shards = -(-d["num_tokens"] // (d["batch_size"] * d["max_new_tokens"]))
  step = _fwd_s(arch, p, d["batch_size"], 1)
  return 5 * p.compile_s + shards * (d["max_new_tokens"] * step + _fwd_s(arch, p, d["batch_size"] * d["prompt_len"],
                                                                        d["prompt_len"]))


_LM_EVAL_MODELS, _LM_EVAL_BUCKETS, _LM_EVAL_TOKENS = 5, 4, 128  # parent, MIP child, GKD child, 2 baselines


def _lm_eval_s(arch: Arch, p: Probe, requests: int) -> float:
  """Task scoring: per model, a compile per length bucket and every request padded to ~128 tokens."""
  if not requests:
    return 0.0
  return _LM_EVAL_MODELS * (_LM_EVAL_BUCKETS * p.compile_s
                            + _fwd_s(arch, p, requests * _LM_EVAL_TOKENS, _LM_EVAL_TOKENS))


def stage_peak_bytes(arch: Arch, w: Work) -> dict[str, float]:
  """Estimated peak memory of each stage (weights, optimizer state, the largest activations)."""
  n, d, v = arch.num_layers, arch.hidden_size, arch.vocab_size
  weights = 4 * arch.num_params()
  per_layer = weights / max(n, 1)
  b, s, e = w.bld, w.score, w.eval
  bld_acts = 4 * b["batch_size"] * b["seq_len"] * (4 * d * n + 2 * v)
  logits = lambda batch, length, k=1: 4 * batch * length * v * k
  return {
      "import": 4 * w.source_params * 2,
      "upcycle": 2 * weights if w.upcycle.get("num_experts") else 0.01 * GB,
      "bld": weights + 3 * per_layer * w.trained + bld_acts,
      "score": weights + logits(s["batch_size"], s["seq_len"], 2 * s["candidate_chunk"]),
      "costs": weights,
      "mip": 0.2 * GB,
      "realize": 2 * weights,
      "distill-data": weights + 4 * w.distill_data["batch_size"] * (
          w.distill_data["prompt_len"] + w.distill_data["max_new_tokens"]) * 2 * d * n + logits(w.distill_data["batch_size"], 1),
      # float32 student + Adam (4x its weights), the teacher, three [B, L, V] logits-sized tensors.
      "gkd": 5 * weights + logits(w.gkd["batch_size"], w.gkd["seq_len"], 3),
      "evaluate": 2 * weights + logits(e["batch_size"], e["seq_len"], 3),
  }


def plan_rows(statuses: Sequence[Any], seconds: Mapping[str, float],
              peak: Mapping[str, float]) -> list[dict[str, Any]]:
  return [{"stage": st.stage, "state": st.state, "why": list(st.why),
           "est_s": None if st.state == "done" else float(seconds[st.stage]),
           "peak_gb": None if st.state == "done" else float(peak[st.stage]) / GB} for st in statuses]


def format_plan(rows: Sequence[Mapping[str, Any]], root) -> str:
  lines = [f"plan for {root}:", f"  {'stage':<12} {'state':<7} {'est. time':>10} {'peak mem':>9}"]
  for r in rows:
    t = "-" if r["est_s"] is None else _duration(r["est_s"])
    m = "-" if r["peak_gb"] is None else f"{r['peak_gb']:.2f} GB"
    lines.append(f"  {r['stage']:<12} {r['state']:<7} {t:>10} {m:>9}")
    lines += [f"      {w}" for w in r["why"]]
  todo = [r["est_s"] for r in rows if r["est_s"] is not None]
  lines.append(f"  total still to run: {_duration(float(np.sum(todo)))}" if todo else "  everything is done")
  return "\n".join(lines)


def _duration(s: float) -> str:
  return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"
