"""MXFP4 expert tensors as gpt-oss checkpoints store them, in numpy.

A tensor `W [E, R, C]` (gpt-oss: `gate_up_proj` as [E, 2F, D], `down_proj` as [E, D, F], i.e. the
transposes of the HF parameters) is stored as `*_blocks` uint8 [E, R, C/32, 16] (two FP4 e2m1 codes
per byte, low nibble first) and `*_scales` uint8 [E, R, C/32] (E8M0 exponents, bias 127): one shared
power-of-two scale per 32 consecutive values. Same decoding as transformers' `convert_moe_packed_tensors`.
"""

from __future__ import annotations

import numpy as np

FP4_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                       -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)
GROUP = 32
SUFFIXES = ("_blocks", "_scales")


def dequantize(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
  """(blocks [..., R, G, 16], scales [..., R, G]) -> float32 in the HF parameter layout [..., C, R]."""
  blocks, scales = np.asarray(blocks, np.uint8), np.asarray(scales)
  if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != GROUP // 2:
    raise ValueError(f"MXFP4 blocks {blocks.shape} and scales {scales.shape} do not pair: blocks must be "
                     f"scales.shape + ({GROUP // 2},)")
  vals = np.empty(blocks.shape[:-1] + (GROUP,), np.float32)
  vals[..., 0::2] = FP4_VALUES[blocks & 0x0F]
  vals[..., 1::2] = FP4_VALUES[blocks >> 4]
  vals = np.ldexp(vals, scales.astype(np.int32)[..., None] - 127)
  w = vals.reshape(scales.shape[:-1] + (-1,))  # [..., R, C]
  return np.ascontiguousarray(np.swapaxes(w, -1, -2))


def quantize(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """HF-layout float tensor [..., C, R] -> (blocks, scales); round to nearest FP4 after scaling the
  group's max magnitude into [3, 6] (the largest power-of-two scale that does not clip)."""
  w = np.swapaxes(np.asarray(w, np.float32), -1, -2)
  if w.shape[-1] % GROUP:
    raise ValueError(f"MXFP4 needs the contracted axis divisible by {GROUP}, got {w.shape[-1]}")
  g = w.reshape(w.shape[:-1] + (w.shape[-1] // GROUP, GROUP))
  amax = np.max(np.abs(g), axis=-1)
  exp = np.where(amax > 0, np.ceil(np.log2(np.maximum(amax, 1e-30) / 6.0)), 0).astype(np.int32)
  exp = np.clip(exp, -127, 127)
  x = g / np.ldexp(1.0, exp)[..., None]
  codes = np.argmin(np.abs(np.abs(x)[..., None] - FP4_VALUES[:8]), axis=-1).astype(np.uint8)  # magnitude
  codes = np.where((x < 0) & (codes > 0), codes + 8, codes).astype(np.uint8)
  blocks = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
  # Contiguous: safetensors' numpy writer copies the raw buffer of a strided view in memory order.
  return np.ascontiguousarray(blocks), np.ascontiguousarray((exp + 127).astype(np.uint8))


def dequantize_flat(flat: dict[str, np.ndarray], sources: dict[str, str] | None = None) -> dict[str, np.ndarray]:
  """Replace every `X_blocks` + `X_scales` pair in a flat {name: array} dict with float32 `X`."""
  out = dict(flat)
  for name in [k for k in flat if k.endswith("_blocks")]:
    base = name[: -len("_blocks")]
    if base + "_scales" not in flat:
      raise ValueError(f"{name} has no matching {base}_scales; an MXFP4 tensor needs both")
    out[base] = dequantize(out.pop(name), out.pop(base + "_scales"))
    if sources is not None:
      sources[base] = sources.get(name, "")
  return out


def quantize_flat(flat: dict[str, np.ndarray], suffixes=("experts.gate_up_proj", "experts.down_proj")) -> dict:
  """Repack the expert matrices of a flat dict to MXFP4 (`X` -> `X_blocks`, `X_scales`)."""
  out = {}
  for k, v in flat.items():
    if k.endswith(suffixes):
      out[k + "_blocks"], out[k + "_scales"] = quantize(np.asarray(v, np.float32))
    else:
      out[k] = v
  return out
