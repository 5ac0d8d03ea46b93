"""The candidate library: which sub-blocks each parent layer may be replaced with, and their
initialization from the parent (Puzzle, sec. 3: the init matters as much as the training).

- fewer KV heads: mean-pool the K/V projections of the heads that merge (more heads: repeat them,
  which is exact); Q and O stay.
- narrower FFN: keep the channels with the highest mean |silu(gate) * up| on calibration data.
- linear replacement: ridge least squares on calibration (input, output) pairs, closed form.
- window attention: the parent's weights as they are.
- FP8 KV cache (`kv_fp8`): the parent's weights, k_scale / v_scale from calibration amax.
- fewer MoE experts (`expert_fractions`, gpt-oss-puzzle): keep the experts with the largest mean
  routed output norm on calibration data, router rows sliced; other top-k values (`moe_top_ks`).
- no-op: nothing to train; it still gets a BLD loss (exactly 1, the NMSE of predicting 0).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from puzzle_jax.core import model
from puzzle_jax.moe import prune
from puzzle_jax.search import kv_fp8
from puzzle_jax.core.arch import Arch, ArchError, AttnSpec, FFNSpec, divisors, round_up, variant_key

Params = dict[str, Any]
SUBS = ("attn", "ffn")


@dataclasses.dataclass(frozen=True)
class LibraryConfig:
  kv_heads: tuple[int, ...] = ()  # () = every divisor of the parent's KV-head count.
  windows: tuple[int, ...] = ()
  attn_linear: bool = True
  attn_noop: bool = True
  ffn_fractions: tuple[float, ...] = (1.0, 0.5, 0.25)
  ffn_multiple: int = 64
  ffn_linear: bool = True
  ffn_noop: bool = True
  kv_fp8: bool = False  # add an FP8-KV-cache variant of each (full or window) attention candidate.
  expert_fractions: tuple[float, ...] = (1.0, 0.75, 0.5, 0.25)  # MoE parents: experts kept per layer.
  moe_top_ks: tuple[int, ...] = ()  # MoE parents: top-k values besides the parent's.
  ep_size: int = 1  # expert parallelism: every candidate's expert count is a multiple of this.
  layer_overrides: Mapping[int, Mapping[str, Any]] = dataclasses.field(default_factory=dict)

  def for_layer(self, i: int) -> LibraryConfig:
    extra = self.layer_overrides.get(i)
    if not extra:
      return self
    bad = set(extra) - {f.name for f in dataclasses.fields(self)}
    if bad:
      raise ValueError(f"library.layer_overrides[{i}] has unknown keys {sorted(bad)}")
    extra = {k: tuple(v) if isinstance(v, list) else v for k, v in extra.items()}
    return dataclasses.replace(self, layer_overrides={}, **extra)


@dataclasses.dataclass(frozen=True)
class Candidate:
  layer: int
  sub: str  # "attn" or "ffn"
  spec: AttnSpec | FFNSpec

  @property
  def key(self) -> str:
    return variant_key(self.spec)

  @property
  def id(self) -> str:
    return f"L{self.layer:03d}/{self.key}"


def parent_spec(arch: Arch, layer: int, sub: str) -> AttnSpec | FFNSpec:
  b = arch.blocks[layer]
  return b.attn if sub == "attn" else b.ffn


def is_parent(arch: Arch, c: Candidate) -> bool:
  return c.spec == parent_spec(arch, c.layer, c.sub)


def is_trainable(arch: Arch, c: Candidate) -> bool:
  """No-op has no params; the parent's own sub-block already is the target."""
  return c.spec.kind != "noop" and not is_parent(arch, c)


def _attn_specs(arch: Arch, parent: AttnSpec, cfg: LibraryConfig) -> list[AttnSpec]:
  specs = [parent]
  if parent.kind == "gqa":
    kvs = cfg.kv_heads or tuple(divisors(parent.num_kv_heads))
    for kv in kvs:
      if arch.num_heads % kv:
        raise ArchError(f"library.kv_heads={kv} does not divide num_heads={arch.num_heads}")
      specs.append(dataclasses.replace(parent, num_kv_heads=kv))
    specs += [dataclasses.replace(parent, window=w) for w in cfg.windows]
    if cfg.kv_fp8:
      specs += [dataclasses.replace(sp, kv_dtype="fp8") for sp in list(specs)]
  if cfg.attn_linear:
    specs.append(AttnSpec("linear"))
  if cfg.attn_noop:
    specs.append(AttnSpec("noop"))
  return specs


def _ffn_specs(parent: FFNSpec, cfg: LibraryConfig) -> list[FFNSpec]:
  specs = [parent]
  if parent.kind == "swiglu":
    for frac in cfg.ffn_fractions:
      width = min(parent.intermediate_size, round_up(frac * parent.intermediate_size, cfg.ffn_multiple))
      specs.append(FFNSpec("swiglu", width))
  if parent.kind == "moe":
    for n in prune.expert_counts(parent.num_experts, cfg.expert_fractions, cfg.ep_size):
      specs += [prune.pruned_spec(parent, n, k) for k in (parent.top_k,) + tuple(cfg.moe_top_ks)]
  if cfg.ffn_linear:
    specs.append(FFNSpec("linear"))
  if cfg.ffn_noop:
    specs.append(FFNSpec("noop"))
  return specs


def _dedupe(specs):
  return list(dict.fromkeys(specs))


def build_library(arch: Arch, cfg: LibraryConfig) -> list[Candidate]:
  """Every layer's candidates, the parent's own sub-block first in each (layer, sub)."""
  out = []
  for i, b in enumerate(arch.blocks):
    lc = cfg.for_layer(i)
    out += [Candidate(i, "attn", s) for s in _dedupe(_attn_specs(arch, b.attn, lc))]
    out += [Candidate(i, "ffn", s) for s in _dedupe(_ffn_specs(b.ffn, lc))]
  return out


@dataclasses.dataclass
class CandidateSet:
  """A parent's candidates, without params: all the search needs (`library.Library` adds trained params)."""
  arch: Arch
  candidates: list[Candidate]

  def at(self, layer: int, sub: str) -> list[Candidate]:
    return [c for c in self.candidates if c.layer == layer and c.sub == sub]

  @property
  def keys(self) -> list[str]:
    """Every distinct variant key, in first-seen order (what a cost table must cover)."""
    return list(dict.fromkeys(c.key for c in self.candidates))


# ----------------------------------------------------------------------------- calibration
def calib_stats_layer(arch: Arch, layer_params: Params, spec, h_in_BxLxD, attn_BxLxD, mid_BxLxD,
                      ffn_BxLxD) -> dict[str, jax.Array]:
  """Sufficient statistics of one calibration batch for a layer's inits (sums; float32).

  `spec` is the layer's BlockSpec (static), so equal layers share one compiled function."""
  stats = {}
  if spec.attn.kind != "noop":
    x = model.rms_norm(layer_params["input_layernorm"], h_in_BxLxD, arch.rms_eps)
    stats.update(_lsq_sums("attn", x, attn_BxLxD))
    if spec.attn.has_cache:
      stats.update(_kv_amax(arch, layer_params, spec.attn, x))
  if spec.ffn.kind != "noop":
    x = model.rms_norm(layer_params["post_attention_layernorm"], mid_BxLxD, arch.rms_eps)
    stats.update(_lsq_sums("ffn", x, ffn_BxLxD))
    if spec.ffn.kind == "swiglu":
      m = layer_params["mlp"]
      act = jax.nn.silu(model.linear(m["gate_proj"], x)) * model.linear(m["up_proj"], x)
      stats["ffn_importance"] = jnp.abs(act.astype(jnp.float32)).sum(axis=(0, 1))
      stats["ffn_count"] = jnp.asarray(x.shape[0] * x.shape[1], jnp.float32)
    if spec.ffn.kind == "moe":
      x_TxD = x.reshape(-1, x.shape[-1])
      stats["moe_contribution"] = prune.expert_stats(layer_params["mlp"], x_TxD, spec.ffn.top_k)["contribution"]
  return stats


def _kv_amax(arch: Arch, layer_params: Params, spec: AttnSpec, x_BxLxD) -> dict[str, jax.Array]:
  """Largest |K| (after RoPE) and |V| of the batch; `bld.calibrate` max-reduces "_amax" keys."""
  B, L, _ = x_BxLxD.shape
  a = layer_params["self_attn"]
  ctx = model.forward_ctx(arch, jnp.zeros((B, L), jnp.int32))
  k = model.apply_rope(model.linear(a["k_proj"], x_BxLxD).reshape(B, L, spec.num_kv_heads, arch.head_dim),
                       ctx.cos, ctx.sin)
  return {"attn_k_amax": jnp.max(jnp.abs(k)), "attn_v_amax": jnp.max(jnp.abs(model.linear(a["v_proj"], x_BxLxD)))}


def _lsq_sums(sub: str, x_BxLxD, y_BxLxD) -> dict[str, jax.Array]:
  x = x_BxLxD.reshape(-1, x_BxLxD.shape[-1]).astype(jnp.float32)
  y = y_BxLxD.reshape(-1, y_BxLxD.shape[-1]).astype(jnp.float32)
  return {f"{sub}_xtx": x.T @ x, f"{sub}_xty": x.T @ y}


def ridge_solve(xtx_DxD: np.ndarray, xty_DxD: np.ndarray, ridge: float) -> np.ndarray:
  """argmin_W ||X W^T - Y||^2 + lam ||W||^2 -> W [out, in] (torch layout); lam relative to X^T X."""
  xtx = np.asarray(xtx_DxD, np.float64)
  lam = ridge * np.trace(xtx) / xtx.shape[0]
  wt = np.linalg.solve(xtx + lam * np.eye(xtx.shape[0]), np.asarray(xty_DxD, np.float64))
  return wt.T.astype(np.float32)


# ----------------------------------------------------------------------------- inits
def pool_kv(w_KHxD: np.ndarray, k_from: int, k_to: int, head_dim: int) -> np.ndarray:
  """Resize the KV heads of a k/v projection: mean-pool merging groups, or repeat heads."""
  w = np.asarray(w_KHxD).reshape(k_from, head_dim, -1)
  if k_from % k_to == 0:
    w = w.reshape(k_to, k_from // k_to, head_dim, -1).mean(axis=1)
  elif k_to % k_from == 0:
    w = np.repeat(w, k_to // k_from, axis=0)
  else:
    raise ArchError(f"cannot map {k_from} KV heads to {k_to}: one must divide the other")
  return w.reshape(k_to * head_dim, -1)


def init_from_parent(arch: Arch, c: Candidate, layer_params: Params, stats: Mapping[str, np.ndarray],
                     ridge: float) -> Params:
  """A candidate's params from its parent layer (see module docstring)."""
  attn_p, ffn_p = model.split_layer(layer_params)
  s = c.spec
  if s.kind == "noop":
    return {}
  if c.sub == "attn":
    if s.kind == "linear":
      w = ridge_solve(stats["attn_xtx"], stats["attn_xty"], ridge)
      return {"input_layernorm": attn_p["input_layernorm"], "self_attn": {"linear_attn": {"weight": w}}}
    k_from = parent_spec(arch, c.layer, "attn").num_kv_heads
    sa = dict(attn_p["self_attn"])
    for name in ("k_proj", "v_proj"):
      sa[name] = {n: pool_kv(np.asarray(w).reshape(k_from * arch.head_dim, -1), k_from, s.num_kv_heads,
                             arch.head_dim).reshape((-1,) + np.shape(w)[1:]) for n, w in sa[name].items()}
    for name in ("k", "v"):
      sa.pop(f"{name}_scale", None)
      if s.kv_dtype == "fp8":
        sa[f"{name}_scale"] = np.float32(max(stats[f"attn_{name}_amax"] * kv_fp8.FP8Settings().margin, 1e-6)
                                         / model.FP8_MAX)
    return {"input_layernorm": attn_p["input_layernorm"], "self_attn": sa}
  if s.kind == "linear":
    w = ridge_solve(stats["ffn_xtx"], stats["ffn_xty"], ridge)
    return {"post_attention_layernorm": ffn_p["post_attention_layernorm"], "mlp": {"linear_mlp": {"weight": w}}}
  if s.kind == "moe":
    ids = prune.keep_ids(stats["moe_contribution"], s.num_experts)
    return {"post_attention_layernorm": ffn_p["post_attention_layernorm"], "mlp": prune.prune_mlp(ffn_p["mlp"], ids)}
  keep = np.sort(np.argsort(-np.asarray(stats["ffn_importance"]), kind="stable")[: s.intermediate_size])
  m = ffn_p["mlp"]
  mlp = {"gate_proj": {"weight": np.asarray(m["gate_proj"]["weight"])[keep]},
         "up_proj": {"weight": np.asarray(m["up_proj"]["weight"])[keep]},
         "down_proj": {"weight": np.asarray(m["down_proj"]["weight"])[:, keep]}}
  return {"post_attention_layernorm": ffn_p["post_attention_layernorm"], "mlp": mlp}


def init_random(arch: Arch, c: Candidate, key: jax.Array, dtype=jnp.float32) -> Params:
  fn = model.attn_init if c.sub == "attn" else model.ffn_init
  return fn(key, c.spec, arch, dtype)


def apply_candidate(arch: Arch, c_sub: str, spec, params: Params, x_BxLxD: jax.Array) -> jax.Array:
  """The candidate's output (residual delta) for its input: block input for attention (a
  full causal context over the sequence), post-attention residual for FFNs."""
  if c_sub == "attn":
    ctx = model.forward_ctx(arch, jnp.zeros(x_BxLxD.shape[:2], jnp.int32))
    return model.attn_apply(params, x_BxLxD, spec, arch, ctx)[0]
  return model.ffn_apply(params, x_BxLxD, spec, arch)


def stack(trees: Sequence[Params]) -> Params:
  return jax.tree_util.tree_map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *trees)


def unstack(tree: Params, n: int) -> list[Params]:
  return [jax.tree_util.tree_map(lambda x: x[i], tree) for i in range(n)]
