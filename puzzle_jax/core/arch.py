"""Architecture as plain frozen data, with exact accounting.

A model is a tuple of per-layer `BlockSpec`s, each holding an attention and an FFN
sub-block spec. Everything here is hashable, so an `Arch` can be a static argument
of `jax.jit`. Params are separate pytrees (see `puzzle_jax.core.model`); the HF config.json
mapping is `puzzle_jax.core.hf_config` (`arch_from_hf`, `arch_to_hf`), which imports this module,
never the other way round.

Axis legend used across the package:
  B batch, L sequence (queries), S keys / cache slots, D hidden, N query heads,
  K kv heads, H head dim, F FFN width, V vocab, C candidates, E experts.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Sequence

# Sub-block kinds.
ATTN_KINDS = ("gqa", "linear", "noop")
FFN_KINDS = ("swiglu", "linear", "noop", "moe")

# Bytes per element for the dtypes we account for.
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "fp8": 1, "float8_e4m3fn": 1, "int8": 1}


class ArchError(ValueError):
  """A config or architecture that cannot be represented; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class AttnSpec:
  """Attention sub-block. `gqa`: grouped-query attention; `linear`: one DxD map; `noop`: skipped."""
  kind: str = "gqa"
  num_kv_heads: int | None = None  # gqa only; must divide the query head count.
  window: int | None = None  # sliding-window length in tokens (None = full causal context).
  num_sink_tokens: int | None = None  # nemotron-nas field, kept for round trips; not computed.
  bias: bool = False  # q/k/v/o biases (gpt-oss, Qwen); Llama has none.
  sinks: bool = False  # gpt-oss: a learned per-head logit joins the softmax and is dropped after it.
  kv_dtype: str | None = None  # "fp8": K/V stored as float8_e4m3fn / per-layer k_scale, v_scale.

  def __post_init__(self):
    if self.kind not in ATTN_KINDS:
      raise ArchError(f"attention kind {self.kind!r} unknown; use one of {ATTN_KINDS}")
    if self.kind == "gqa" and (self.num_kv_heads is None or self.num_kv_heads < 1):
      raise ArchError("gqa attention needs num_kv_heads >= 1")
    if self.window is not None and self.window < 1:
      raise ArchError(f"window must be >= 1, got {self.window}")
    if self.kv_dtype not in (None, "fp8"):
      raise ArchError(f"kv_dtype {self.kv_dtype!r} unknown; use None (activation dtype) or 'fp8'")

  @property
  def has_cache(self) -> bool:
    return self.kind == "gqa"


@dataclasses.dataclass(frozen=True)
class FFNSpec:
  """FFN sub-block. `swiglu`: gated MLP of width F; `linear`: one DxD map; `noop`; `moe`."""
  kind: str = "swiglu"
  intermediate_size: int | None = None  # swiglu width, or per-expert width for moe.
  num_experts: int | None = None  # moe only.
  top_k: int | None = None  # moe only.

  def __post_init__(self):
    if self.kind not in FFN_KINDS:
      raise ArchError(f"FFN kind {self.kind!r} unknown; use one of {FFN_KINDS}")
    if self.kind in ("swiglu", "moe") and not self.intermediate_size:
      raise ArchError(f"{self.kind} FFN needs intermediate_size > 0")
    if self.kind == "moe" and not (self.num_experts and self.top_k):
      raise ArchError("moe FFN needs num_experts and top_k")


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  attn: AttnSpec
  ffn: FFNSpec
  # Blocks (or FFNs) with the same non-None group id read the same input and add their
  # outputs (FFN Fusion / block parallelism). None = ordinary sequential block.
  parallel_group: int | None = None


@dataclasses.dataclass(frozen=True)
class RopeSpec:
  theta: float = 10000.0
  rope_type: str = "default"  # "default" or "llama3".
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position: int = 8192
  # YaRN (rope_type "yarn", gpt-oss): ramp bounds in rotations, and whether they are rounded.
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  truncate: bool = True


@dataclasses.dataclass(frozen=True)
class Arch:
  """A whole decoder-only LM: global dims plus one BlockSpec per layer."""
  vocab_size: int
  hidden_size: int
  num_heads: int
  head_dim: int
  blocks: tuple[BlockSpec, ...]
  rms_eps: float = 1e-5
  rope: RopeSpec = RopeSpec()
  tie_embeddings: bool = False
  max_position: int = 8192
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None

  def __post_init__(self):
    for i, b in enumerate(self.blocks):
      if b.attn.kind == "gqa" and self.num_heads % b.attn.num_kv_heads:
        raise ArchError(f"layer {i}: num_kv_heads={b.attn.num_kv_heads} does not divide "
                        f"num_heads={self.num_heads}; pick a divisor")

  @property
  def num_layers(self) -> int:
    return len(self.blocks)

  def replace_block(self, i: int, *, attn: AttnSpec | None = None, ffn: FFNSpec | None = None) -> Arch:
    b = self.blocks[i]
    nb = BlockSpec(attn or b.attn, ffn or b.ffn, b.parallel_group)
    return dataclasses.replace(self, blocks=self.blocks[:i] + (nb,) + self.blocks[i + 1:])

  # ---------------------------------------------------------------- accounting
  def attn_params(self, a: AttnSpec) -> int:
    return attn_params(a, self.hidden_size, self.num_heads, self.head_dim)

  def ffn_params(self, f: FFNSpec) -> int:
    return ffn_params(f, self.hidden_size)

  def block_params(self, i: int) -> int:
    b = self.blocks[i]
    return self.attn_params(b.attn) + self.ffn_params(b.ffn)

  def fixed_params(self) -> int:
    """Embedding, final norm and (untied) LM head."""
    emb = self.vocab_size * self.hidden_size
    return emb + self.hidden_size + (0 if self.tie_embeddings else emb)

  def num_params(self) -> int:
    return self.fixed_params() + sum(self.block_params(i) for i in range(self.num_layers))

  def weight_bytes(self, dtype: str = "bfloat16") -> int:
    return self.num_params() * DTYPE_BYTES[dtype]

  def kv_bytes_per_token(self, dtype: str = "bfloat16") -> int:
    """KV-cache bytes one token occupies, summed over layers (from head_dim, not D/N)."""
    return sum(kv_bytes_per_token(b.attn, self.head_dim, dtype) for b in self.blocks)

  def kv_cache_bytes(self, batch: int, context: int, dtype: str = "bfloat16") -> int:
    return sum(batch * min(context, b.attn.window or context) * kv_bytes_per_token(b.attn, self.head_dim, dtype)
               for b in self.blocks)

  def flops_per_token(self, context: int, mode: str = "decode") -> int:
    """Forward FLOPs for one token (2 per MAC), LM head included.

    decode: the token attends to `context` keys. prefill: a causal prompt of length
    `context`, averaged per token ((context+1)/2 keys each, capped by the window).
    """
    total = 2 * self.vocab_size * self.hidden_size
    for b in self.blocks:
      total += attn_flops(b.attn, self.hidden_size, self.num_heads, self.head_dim, context, mode)
      total += ffn_flops(b.ffn, self.hidden_size)
    return total

  def summary_rows(self) -> list[dict[str, Any]]:
    rows = []
    for i, b in enumerate(self.blocks):
      rows.append(dict(layer=i, attn=describe_attn(b.attn), ffn=describe_ffn(b.ffn),
                       params=self.block_params(i),
                       kv_bytes_per_token=kv_bytes_per_token(b.attn, self.head_dim, "bfloat16")))
    return rows

  def table(self) -> str:
    """A printable per-layer architecture table with totals."""
    lines = [f"{'layer':>5}  {'attention':<16} {'ffn':<16} {'params':>12} {'kv B/tok':>9}"]
    for r in self.summary_rows():
      lines.append(f"{r['layer']:>5}  {r['attn']:<16} {r['ffn']:<16} {r['params']:>12,} "
                   f"{r['kv_bytes_per_token']:>9,}")
    lines.append(f"total params {self.num_params():,}  (fixed {self.fixed_params():,}); "
                 f"KV {self.kv_bytes_per_token():,} B/token bf16; "
                 f"decode {self.flops_per_token(1024) / 1e6:.1f} MFLOP/token @1024")
    return "\n".join(lines)


def describe_attn(a: AttnSpec) -> str:
  if a.kind != "gqa":
    return a.kind
  return (f"gqa kv={a.num_kv_heads}" + (f" w={a.window}" if a.window else "")
          + (" fp8" if a.kv_dtype == "fp8" else ""))


def describe_ffn(f: FFNSpec) -> str:
  if f.kind == "swiglu":
    return f"swiglu {f.intermediate_size}"
  if f.kind == "moe":
    return f"moe {f.num_experts}x{f.intermediate_size} k{f.top_k}"
  return f.kind


def variant_key(spec: AttnSpec | FFNSpec) -> str:
  """Stable id of a sub-block variant ("attn/gqa_kv2_w256", "ffn/swiglu_768", "ffn/noop").

  Same key = same shape = same cost, so costs are measured once per key, and a layer's
  candidates are named by it.
  """
  if isinstance(spec, AttnSpec):
    if spec.kind != "gqa":
      return f"attn/{spec.kind}"
    return (f"attn/gqa_kv{spec.num_kv_heads}" + (f"_w{spec.window}" if spec.window else "")
            + "".join(f"_{t}" for t, on in _attn_flags(spec) if on))
  if spec.kind == "swiglu":
    return f"ffn/swiglu_{spec.intermediate_size}"
  if spec.kind == "moe":
    return f"ffn/moe_e{spec.num_experts}_k{spec.top_k}_f{spec.intermediate_size}"
  return f"ffn/{spec.kind}"


def _attn_flags(a: AttnSpec) -> tuple[tuple[str, bool], ...]:
  """Key suffixes of the gpt-oss attention features (absent for Llama keys, which stay unchanged)."""
  return (("bias", a.bias), ("sinks", a.sinks), ("fp8", a.kv_dtype == "fp8"))


def spec_from_key(key: str) -> AttnSpec | FFNSpec:
  """Inverse of `variant_key`."""
  sub, _, rest = key.partition("/")
  parts = rest.split("_")
  if sub == "attn":
    if parts[0] != "gqa":
      return AttnSpec(parts[0])
    kv = int(parts[1][2:])
    window = next((int(t[1:]) for t in parts[2:] if t[:1] == "w" and t[1:].isdigit()), None)
    flags = set(parts[2:])
    return AttnSpec("gqa", num_kv_heads=kv, window=window, bias="bias" in flags, sinks="sinks" in flags,
                    kv_dtype="fp8" if "fp8" in flags else None)
  if sub == "ffn":
    if parts[0] == "swiglu":
      return FFNSpec("swiglu", int(parts[1]))
    if parts[0] == "moe":
      return FFNSpec("moe", int(parts[3][1:]), num_experts=int(parts[1][1:]), top_k=int(parts[2][1:]))
    return FFNSpec(parts[0])
  raise ArchError(f"bad variant key {key!r}; expected 'attn/...' or 'ffn/...'")


def attn_params(a: AttnSpec, d: int, n: int, h: int) -> int:
  if a.kind == "noop":
    return 0
  if a.kind == "linear":
    return d * d + d  # map + input norm
  k = a.num_kv_heads
  p = d * n * h * 2 + d * k * h * 2 + d  # q, o, k, v, input norm
  if a.bias:
    p += n * h + 2 * k * h + d
  if a.sinks:
    p += n
  if a.kv_dtype == "fp8":
    p += 2  # k_scale, v_scale
  return p


def ffn_params(f: FFNSpec, d: int) -> int:
  if f.kind == "noop":
    return 0
  if f.kind == "linear":
    return d * d + d
  if f.kind == "swiglu":
    return 3 * d * f.intermediate_size + d
  # gpt-oss experts (fused gate_up + down, with biases) + router (with bias) + norm.
  e, i = f.num_experts, f.intermediate_size
  return e * (3 * d * i + 2 * i + d) + e * (d + 1) + d


def kv_bytes_per_token(a: AttnSpec, head_dim: int, dtype: str) -> int:
  if not a.has_cache:
    return 0
  return 2 * a.num_kv_heads * head_dim * DTYPE_BYTES[a.kv_dtype or dtype]


def attn_flops(a: AttnSpec, d: int, n: int, h: int, context: int, mode: str) -> int:
  if a.kind == "noop":
    return 0
  if a.kind == "linear":
    return 2 * d * d
  proj = 2 * (2 * d * n * h + 2 * d * a.num_kv_heads * h)
  if mode == "decode":
    keys = min(context, a.window or context)
  elif mode == "prefill":
    keys = _mean_causal_keys(context, a.window)
  else:
    raise ArchError(f"mode must be 'decode' or 'prefill', got {mode!r}")
  return proj + 2 * 2 * n * h * keys  # QK^T and AV


def _mean_causal_keys(length: int, window: int | None) -> float:
  if window is None or window >= length:
    return (length + 1) / 2
  # The first `window` queries see 1..window keys, the rest see `window`.
  return (window * (window + 1) / 2 + (length - window) * window) / length


def ffn_flops(f: FFNSpec, d: int) -> int:
  if f.kind == "noop":
    return 0
  if f.kind == "linear":
    return 2 * d * d
  if f.kind == "swiglu":
    return 2 * 3 * d * f.intermediate_size
  return 2 * (f.top_k * 3 * d * f.intermediate_size + d * f.num_experts)


def uniform_arch(*, vocab_size: int, hidden_size: int, num_layers: int, num_heads: int,
                 num_kv_heads: int, intermediate_size: int, head_dim: int | None = None,
                 **kw) -> Arch:
  """A plain Llama-style arch: every layer the same full block."""
  block = BlockSpec(AttnSpec("gqa", num_kv_heads=num_kv_heads), FFNSpec("swiglu", intermediate_size))
  return Arch(vocab_size=vocab_size, hidden_size=hidden_size, num_heads=num_heads,
              head_dim=head_dim or hidden_size // num_heads, blocks=(block,) * num_layers, **kw)


def divisors(n: int) -> list[int]:
  return [k for k in range(1, n + 1) if n % k == 0]


def round_up(x: float, multiple: int) -> int:
  return max(multiple, int(math.ceil(x / multiple) * multiple))


def is_ffn_only(b: BlockSpec) -> bool:
  """A block whose attention is removed and whose FFN is a SwiGLU: the members FFN Fusion merges."""
  return b.attn.kind == "noop" and b.ffn.kind == "swiglu"


def _check_run(arch: Arch, run: Sequence[int]) -> list[int]:
  run = [int(i) for i in run]
  if len(run) < 2 or run != list(range(run[0], run[0] + len(run))) or not 0 <= run[0] <= run[-1] < arch.num_layers:
    raise ArchError(f"a fused/parallel run must be >= 2 consecutive layer indices in [0, {arch.num_layers}), "
                    f"got {run}")
  return run


def fuse_ffn_run(arch: Arch, run: Sequence[int]) -> Arch:
  """FFN Fusion of consecutive FFN-only layers: the first holds one SwiGLU as wide as the members
  together, the others become fully no-op placeholders (the Llama-Nemotron-Ultra-253B layout, which
  every nemotron_nas loader reads: the engines have no parallel-block field).

  Exactly equal to running the members in parallel from one input (`parallel_arch`); the weights
  come from `model.fuse_ffn_params`."""
  run = _check_run(arch, run)
  bad = [i for i in run if not is_ffn_only(arch.blocks[i])]
  if bad:
    raise ArchError(f"layers {bad} are not FFN-only (noop attention + swiglu FFN): "
                    f"{[describe_attn(arch.blocks[i].attn) + ' / ' + describe_ffn(arch.blocks[i].ffn) for i in bad]}; "
                    "remove their attention first, or fuse a run without them")
  width = sum(arch.blocks[i].ffn.intermediate_size for i in run)
  fused = BlockSpec(AttnSpec("noop"), FFNSpec("swiglu", width))
  placeholder = BlockSpec(AttnSpec("noop"), FFNSpec("noop"))
  blocks = list(arch.blocks)
  blocks[run[0]:run[-1] + 1] = [fused] + [placeholder] * (len(run) - 1)
  return dataclasses.replace(arch, blocks=tuple(blocks))


def fusable_groups(arch: Arch) -> list[list[int]]:
  """Parallel groups made only of FFN-only blocks: what `fuse_ffn_run` turns into one wide FFN."""
  return [r for r in parallel_runs(arch.blocks) if len(r) > 1 and all(is_ffn_only(arch.blocks[i]) for i in r)]


def parallel_arch(arch: Arch, run: Sequence[int]) -> Arch:
  """Whole-block parallelism: the blocks of `run` (attention and FFN alike) read one input and add
  their deltas (`parallel_group` = the run's first index). On FFN-only blocks this equals
  `fuse_ffn_run`; on full blocks it is the block-parallelism ablation."""
  run = _check_run(arch, run)
  taken = [i for i in run if arch.blocks[i].parallel_group is not None]
  if taken:
    raise ArchError(f"layers {taken} already belong to a parallel group; pick disjoint runs")
  blocks = list(arch.blocks)
  for i in run:
    blocks[i] = dataclasses.replace(blocks[i], parallel_group=run[0])
  return dataclasses.replace(arch, blocks=tuple(blocks))


def parallel_runs(blocks: Iterable[BlockSpec]) -> list[list[int]]:
  """Group consecutive layer indices by parallel_group (singletons for None)."""
  runs: list[list[int]] = []
  prev = object()
  for i, b in enumerate(blocks):
    if b.parallel_group is not None and b.parallel_group == prev:
      runs[-1].append(i)
    else:
      runs.append([i])
    prev = b.parallel_group
  return runs
