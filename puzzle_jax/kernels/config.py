"""`KernelConfig`: every knob of the decode kernels, as one frozen, hashable value.

It travels as static data (a meta field of `infer.InferParams`, a keyword of the kernel entry
points), so it is part of jit's cache key: a benchmark sweeping a knob builds another config and
gets another compile, never a stale one. The defaults are the measured best on the H200 at
SmolLM2 shapes (BENCHMARKS.md, "Decode kernels"); `benchmarks/segment_profile.py` and
`benchmarks/decode_profile.py` sweep the alternatives.
"""

from __future__ import annotations

import dataclasses

import jax

BARRIERS = ("counter", "flags")
IDLE_PREFETCH = ("all", "ffn", "")


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Knobs of `puzzle_jax.kernels` and of `infer`'s choice of kernels ("auto")."""
  # Backend: None = Pallas' interpreter everywhere but the GPU (Triton lowering is GPU-only);
  # False lowers to Triton on any host (tests and kernel_sass.py check lowering without a GPU).
  interpret: bool | None = None

  # The five kernels per block (`decode.matmul`, `decode.decode_attention`, `decode.attn_out`).
  tile: int = 16384  # weight elements per matmul program and step (registers: 4-8 warps)
  matmul_warps: int | None = 8  # None: 8 for full tiles, else 4 (8 measured best on SmolLM2 shapes)
  attn_warps: int = 4
  max_programs: int = 264  # matmul row blocks grow (8 -> 64 rows) until the grid fits one wave (2 per SM)
  chunk_s: int = 64  # cache slots per attention program (the split-K grain)
  max_chunks: int = 8  # at most this many chunks (the merge reads C x A values per output program)
  kv_upto_index: bool = True  # cached K/V read only below the current index (a growing cache: less traffic)

  # The persistent kernel (`persistent.decode_segment`).
  programs: int | None = None  # None: one per SM (all must be resident: the grid barriers wait for each)
  persistent_warps: int = 8  # with 256-slot attention steps (4 warps spill registers there)
  attn_block: int = 256  # cache slots per attention step (the largest dividing S); the first is loaded early
  ffn_rows: int | None = None  # FFN rows per item; None: `persistent._ffn_rows` (spread over all programs)
  early_kv: bool = True  # the first cache block is loaded during the q/k/v phase, not at the barrier after it
  qkv_tags: bool = True  # bf16 q/k/v as tagged words: no grid barrier between q/k/v and attention
  ffn_pieces: bool = True  # D in unmasked power-of-two pieces (576 = 512 + 64), not one masked tile
  idle_prefetch: str = "all"  # programs idle in a phase hint L2 to fetch the next phase's weights: every phase,
  #                             "ffn" (during attention only) or "" (off)
  prefetch_lines: int = 512  # L2 prefetch requests per loop step (8 warps: 2 per thread)
  barrier: str = "counter"  # grid barrier: one counter per call ("counter") or one flag per program ("flags")
  max_spin: int = 1 << 14  # polls before a barrier wait gives up (a program that is not resident would hang)

  # Profiling (each setting is its own compile; never the production kernel).
  timeline: bool = False  # decode_segment also returns each program's SM clock at points of every phase
  profile_skip: frozenset = frozenset()  # phase positions whose work is skipped (barriers kept)
  profile_layer0: bool = False  # every layer reads layer 0's weights and cache (L2-resident)

  # `infer`'s decode_impl="auto": where it takes the kernels instead of XLA.
  fused_backends: tuple = ("gpu",)  # backends where "auto" runs the kernels (tests add "cpu": interpreted)
  fused_max_batch: int = 1  # rows: each row's programs re-read the weights (larger batches untimed: XLA)
  fused_max_hidden: int = 2048  # at 8B shapes XLA's own matrix-vector products stream weights as fast
  min_run: int = 2  # "auto" runs a persistent kernel only for runs of at least this many identical blocks
  # `infer.default_scan` stacks runs for the persistent kernel only when they are this long on average:
  # one long run decodes faster stacked, runs of 1-5 blocks faster unrolled with five kernels per block
  # (BENCHMARKS.md, "Decode kernels"; lengths between 2 and 30 are untested).
  scan_min_mean_run: float = 4.0

  def __post_init__(self):
    if self.barrier not in BARRIERS:
      raise ValueError(f"KernelConfig.barrier must be one of {BARRIERS}, got {self.barrier!r}")
    if self.idle_prefetch not in IDLE_PREFETCH:
      raise ValueError(f"KernelConfig.idle_prefetch must be one of {IDLE_PREFETCH}, got {self.idle_prefetch!r}")
    # Sets and lists from a caller become hashable (the config is a jit cache key).
    object.__setattr__(self, "profile_skip", frozenset(self.profile_skip))
    object.__setattr__(self, "fused_backends", tuple(self.fused_backends))

  @property
  def interpreted(self) -> bool:
    """Whether the kernels run in Pallas' interpreter (resolved against the default backend)."""
    return jax.default_backend() != "gpu" if self.interpret is None else self.interpret

  @property
  def profiling(self) -> bool:
    return self.timeline or bool(self.profile_skip) or self.profile_layer0


DEFAULT = KernelConfig()
