"""Fused decode kernels (Pallas: Triton on GPU, Pallas' interpreter elsewhere).

* `decode`: the five-kernel decode block (`matmul`, `decode_attention`, `attn_out`) and plain-jnp
  references of each fused op.
* `persistent`: a run of identical decode layers in one persistent kernel (`decode_segment`), with
  its plain-jnp reference `reference_segment`. `infer`'s decode_impl="auto" uses it on the GPU for
  batch-1 decoding (runs shorter than `KernelConfig.min_run` blocks take the five kernels).
* `triton_ops`: the primitives both are built from (grid barriers, relaxed atomics, L2 prefetch,
  tagged words).
* `profile`: the persistent kernel's timeline (SM clocks per phase), a profiling build only.
* `config`: `KernelConfig`, every knob, frozen and hashable: a static argument, part of jit's key.
"""

from puzzle_jax.kernels.config import DEFAULT, KernelConfig
from puzzle_jax.kernels.decode import (BLOCK_S, attn_out, chunking, decode_attention, head_dim_ok, matmul, qkv_width,
                                       reference_decode_attention, reference_matmul, supported)
from puzzle_jax.kernels.persistent import (SegmentState, decode_segment, persistent_programs, reference_segment,
                                           segment_state, sync_timeouts)
from puzzle_jax.kernels.profile import TIMELINE_POINTS
from puzzle_jax.kernels.triton_ops import sync_flags

__all__ = ["BLOCK_S", "DEFAULT", "KernelConfig", "SegmentState", "TIMELINE_POINTS", "attn_out", "chunking",
           "decode_attention", "decode_segment", "head_dim_ok", "matmul", "persistent_programs", "qkv_width",
           "reference_decode_attention", "reference_matmul", "reference_segment", "segment_state", "supported",
           "sync_flags", "sync_timeouts"]
