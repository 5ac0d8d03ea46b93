"""puzzle_jax.kernels (Pallas; interpreted on the CPU) against the plain JAX they replace."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from puzzle_jax import infer, kernels
from puzzle_jax.core import model
from puzzle_jax.core.arch import RopeSpec
from puzzle_jax.kernels import decode, triton_ops

RNG = np.random.default_rng(0)


def arr(*shape, scale=1.0):
  return jnp.asarray(RNG.standard_normal(shape) * scale, jnp.float32)


def close(a, b, tol=1e-5):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


def test_matmul_norm_residual_swiglu():
  B, D, N = 3, 96, 160  # D: not a power of two (masked tiles); N: 20 blocks of 8 rows
  x, g, res = arr(B, D), arr(D), arr(B, N)
  xn = model.rms_norm({"weight": g}, x, 1e-5)
  w, w2 = arr(N, D, scale=0.1), arr(2, N, D, scale=0.1)
  close(kernels.matmul(x, w), x @ w.T)
  close(kernels.matmul(x, w, norm_D=g, residual_BxN=res), res + xn @ w.T)
  gu = jnp.einsum("bd,tfd->btf", xn, w2)
  close(kernels.matmul(x, w2, norm_D=g, swiglu=True), jax.nn.silu(gu[:, 0]) * gu[:, 1])
  # the plain-jnp reference beside the kernel computes the same (bf16 too: same rounding points)
  for kw in ({}, {"norm_D": g, "residual_BxN": res}, {"norm_D": g, "swiglu": True}):
    ww = w2 if kw.get("swiglu") else w
    close(kernels.matmul(x, ww, **kw), kernels.reference_matmul(x, ww, **kw))
    xb, wb = x.astype(jnp.bfloat16), ww.astype(jnp.bfloat16)
    kb = {k: v.astype(jnp.bfloat16) if hasattr(v, "astype") else v for k, v in kw.items()}
    close(kernels.matmul(xb, wb, **kb).astype(jnp.float32),
          kernels.reference_matmul(xb, wb, **kb).astype(jnp.float32), tol=2e-2)


def test_kernel_config_is_a_static_cache_key():
  """Two configs that differ in a knob are two jit cache entries (no stale compile), equal configs
  one; bad values are refused by name."""
  a, b = kernels.KernelConfig(), kernels.KernelConfig(matmul_warps=4)
  assert a == kernels.KernelConfig() and hash(a) == hash(kernels.KernelConfig()) and a != b
  traces = []

  @functools.partial(jax.jit, static_argnames="cfg")
  def f(x, w, cfg):
    traces.append(cfg)
    return kernels.matmul(x, w, cfg=cfg)

  x, w = arr(1, 64), arr(16, 64)
  for cfg in (a, b, kernels.KernelConfig()):
    f(x, w, cfg=cfg)
  assert traces == [a, b]
  assert kernels.KernelConfig(profile_skip=[1, 0]).profile_skip == frozenset({0, 1})
  with pytest.raises(ValueError, match="barrier"):
    kernels.KernelConfig(barrier="spin")


def test_matmul_rejects_bad_shapes():
  with pytest.raises(ValueError, match="does not match"):
    kernels.matmul(arr(2, 64), arr(64, 32))
  with pytest.raises(ValueError, match="power-of-two"):
    kernels.matmul(arr(2, 64), arr(36, 64))


def rope(B, H, pos):
  inv = jnp.asarray(model.rope_inv_freq(RopeSpec(), H))
  f = jnp.asarray(pos, jnp.float32)[:, None, None] * inv[None, None, :]
  emb = jnp.concatenate([f, f], -1)
  return jnp.cos(emb), jnp.sin(emb)  # [B, 1, H]


@pytest.mark.parametrize("S, idx", [(256, 0), (256, 70), (384, 300), (1024, 700), (1152, 1100)])
# chunks: 4; 8 (2 empty); 8; 8 of two blocks each (3 wholly past the end, one partly)
def test_decode_attention_and_merge_match_reference(S, idx):
  """decode_attention (RoPE, slot write, split-K attention) + attn_out (merge, o_proj, residual):
  same output and cache as infer's XLA path."""
  B, N, K, H, n, layer, D = 2, 6, 2, 32, 3, 1, 48
  qkv, kc, vc = arr(B, (N + 2 * K) * H), arr(n, B, K, S, H), arr(n, B, K, S, H)
  wo, res = arr(D, N * H, scale=0.1), arr(B, D)
  cos, sin = rope(B, H, [idx // 2, idx])
  mask = jnp.asarray(RNG.random((B, S)) < 0.7).at[:, idx:].set(True)  # slots >= idx ignored anyway
  parts, k2, v2 = kernels.decode_attention(qkv, cos[:, 0], sin[:, 0], mask, kc, vc, layer, idx,
                                           num_heads=N, num_kv_heads=K)
  assert parts[0].shape == (B, kernels.chunking(S)[1], N * H)
  q = model.apply_rope(qkv[:, :N * H].reshape(B, 1, N, H), cos, sin)
  k = model.apply_rope(qkv[:, N * H:(N + K) * H].reshape(B, 1, K, H), cos, sin)
  kv = infer._write_kv({"k": kc, "v": vc}, layer, k, qkv[:, (N + K) * H:].reshape(B, 1, K, H), idx)
  seen = mask & (jnp.arange(S) <= idx)[None, :]
  att = infer._decode_attention(q, kv["k"][layer], kv["v"][layer], seen.at[:, idx].set(True)).reshape(B, N * H)
  close(kernels.attn_out(parts, wo, res), res + att @ wo.T, tol=2e-5)
  close(k2, kv["k"])  # the new slot written, every other slot and layer untouched
  close(v2, kv["v"])
  ref, kr, vr = kernels.reference_decode_attention(qkv, cos[:, 0], sin[:, 0], mask, kc, vc, layer, idx, num_heads=N,
                                                   num_kv_heads=K)
  close(ref, att, tol=2e-5)  # the plain-jnp reference beside the kernel: the same attention and cache
  close(kr, kv["k"])
  close(vr, kv["v"])


def test_decode_attention_rejects_bad_cache():
  with pytest.raises(ValueError, match="S % 128 == 0"):
    kernels.decode_attention(arr(1, 4 * 32), arr(1, 32), arr(1, 32), jnp.ones((1, 40), bool),
                             arr(1, 1, 1, 40, 32), arr(1, 1, 1, 40, 32), 0, 0, num_heads=2, num_kv_heads=1)


LOWER = kernels.KernelConfig(interpret=False)  # Triton lowering on this host (no GPU needed to lower)


def test_fused_decode_lowers_to_triton():
  """The kernels run interpreted here; lowering the whole fused generate loop for CUDA (no GPU
  needed) checks what only the GPU would otherwise catch: every op has a Triton lowering."""
  from puzzle_jax.core.arch import uniform_arch
  arch = uniform_arch(vocab_size=256, hidden_size=96, num_layers=2, num_heads=3, num_kv_heads=1,
                      intermediate_size=160, head_dim=64)
  params = jax.eval_shape(lambda: model.init_params(jax.random.PRNGKey(0), arch, jnp.bfloat16))
  ip = jax.eval_shape(lambda p: infer.prepare(arch, p, jnp.bfloat16, scan=False, decode_impl="pallas",
                                              kernel_config=LOWER), params)
  tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  lowered = jax.jit(infer._generate, static_argnames=("max_new_tokens", "temperature", "top_p", "stop_tokens")).trace(
      ip, tokens, None, jax.random.PRNGKey(0), max_new_tokens=4, temperature=0.0, top_p=1.0,
      stop_tokens=()).lower(lowering_platforms=("cuda",))
  text = lowered.as_text()
  assert text.count("__gpu$xla.gpu.triton") >= 2 * 5  # five kernels per layer
  S_, bf = jax.ShapeDtypeStruct, jnp.bfloat16  # the long-cache (looped chunks) attention too
  cache = S_((1, 1, 1, 1024, 64), bf)
  jax.jit(functools.partial(kernels.decode_attention, num_heads=3, num_kv_heads=1, cfg=LOWER)).trace(
      S_((1, 5 * 64), bf), S_((1, 64), jnp.float32), S_((1, 64), jnp.float32), S_((1, 1024), jnp.int32),
      cache, cache, 0, S_((), jnp.int32)).lower(lowering_platforms=("cuda",))


@pytest.mark.parametrize("barrier", ["counter", "flags"])
def test_persistent_decode_lowers_to_triton(monkeypatch, barrier):
  """The persistent segment kernel with one program per SM of an H100/H200 (132; barriers, atomics
  and volatile loads only exist there) lowers to Triton for CUDA: one kernel per run of blocks."""
  from puzzle_jax.core.arch import AttnSpec, BlockSpec, FFNSpec, uniform_arch
  from jax._src.lib.triton import dialect as tt
  from jax._src.pallas.triton import lowering as tl
  atomics, acq_rel = [], tl._atomic_rmw

  def spy(op, ptr, val, mask=None, semantic=tt.MemSemantic.ACQUIRE_RELEASE, **kw):
    atomics.append((str(op), str(semantic)))
    return acq_rel(op, ptr, val, mask=mask, semantic=semantic, **kw)

  monkeypatch.setattr(tl, "_atomic_rmw", spy)
  arch = uniform_arch(vocab_size=256, hidden_size=96, num_layers=4, num_heads=3, num_kv_heads=1,
                      intermediate_size=160, head_dim=64)
  blocks = list(arch.blocks)
  blocks[2] = BlockSpec(AttnSpec("linear"), FFNSpec("linear"))
  blocks[3] = BlockSpec(AttnSpec("noop"), blocks[3].ffn)
  arch = dataclasses.replace(arch, blocks=tuple(blocks))
  params = jax.eval_shape(lambda: model.init_params(jax.random.PRNGKey(0), arch, jnp.bfloat16))
  cfg = dataclasses.replace(LOWER, programs=132, barrier=barrier)
  ip = jax.eval_shape(lambda p: infer.prepare(arch, p, jnp.bfloat16, scan=True, decode_impl="persistent",
                                              kernel_config=cfg), params)
  lowered = jax.jit(infer._generate, static_argnames=("max_new_tokens", "temperature", "top_p", "stop_tokens")).trace(
      ip, jax.ShapeDtypeStruct((1, 8), jnp.int32), None, jax.random.PRNGKey(0), max_new_tokens=4, temperature=0.0,
      top_p=1.0, stop_tokens=()).lower(lowering_platforms=("cuda",))
  assert lowered.as_text().count("__gpu$xla.gpu.triton") == 3  # segments: 2 gqa/swiglu, linear/linear, noop/swiglu
  # Split-K sums into the residual are relaxed float adds; the barrier's arrival releases them
  # (acquire-release: a counter's add, a flag's exchange; the timeout count: relaxed).
  assert {sem for op, sem in atomics if op == "fadd"} == {"relaxed"}, set(atomics)
  arrivals = {("add", "acq_rel")} if barrier == "counter" else {("exch", "acq_rel")}
  assert {a for a in atomics if a[0] != "fadd"} == arrivals | {("add", "relaxed")}, set(atomics)


def test_col_block_never_slices_past_the_row():
  """A tile width that does not divide D falls back to one masked power-of-two tile."""
  for d in (64, 576, 1536, 4096, 5120):
    for bn in (8, 16, 32, 64):
      bd = decode._col_block(d, bn, kernels.DEFAULT.tile)
      assert bd & (bd - 1) == 0 and (d % bd == 0 or bd >= d), (d, bn, bd)


def test_grid_sync_benchmark_cpu_mode():
  """benchmarks/grid_sync.py off-GPU (one program, no barriers): every chain it times agrees with
  the NumPy reference chain."""
  from benchmarks import grid_sync
  res = grid_sync.main(["--n", "3", "--d", "128", "--runs", "1", "--modes", "flags,counter"])
  assert res["programs"] == 1 and res["timeouts"] == {"flags": 0, "counter": 0}
  assert all(v["ok"] and v["call_s"] > 0 for v in res["variants"].values()), res["variants"]


def test_segment_profile_benchmark_cpu_mode():
  """benchmarks/segment_profile.py off-GPU at tiny shapes: each variant runs and is timed."""
  from benchmarks import segment_profile
  res = segment_profile.main(["--layers", "2", "--shape", "64,2,1,32,128,128", "--reps", "1", "--runs", "1",
                              "--variants", "full,barriers only", "--timeline"])
  assert all("error" not in r and r["us_per_call"] > 0 and r["barrier_timeouts"] == 0
             for r in res["rows"].values()), res["rows"]
  # The interpreter has no SM clock: the timeline is there (full kernel only) and all zero.
  assert "timeline" in res["rows"]["full"] and "timeline" not in res["rows"]["barriers only"]
  assert res["rows"]["full"]["timeline"]["cycles_per_call"] == 0


def test_kernel_sass_lowers_persistent_kernel_on_cpu():
  """benchmarks/kernel_sass.py's first half (no `triton` package needed): the persistent kernel's
  Triton IR, lowered here as on the GPU, sums split-K shares with relaxed float atomics, arrives
  at barriers with acquire-release integer adds and counts timeouts with relaxed ones."""
  import re
  from benchmarks import kernel_sass
  ir = kernel_sass.triton_ir((64, 2, 1, 32, 128, 128), layers=2, programs=132)
  assert set(re.findall(r"tt\.atomic_rmw (\w+), (\w+), gpu", ir)) == {("fadd", "relaxed"), ("add", "acq_rel"),
                                                                      ("add", "relaxed")}
  assert "%clock" not in ir
  # The timeline build reads the SM clock at every point of every phase (inside the layer loop):
  # start; q/k/v (bf16: tagged words, no barrier after it): data in, result; attention and FFN:
  # arrived, left, data in, half way, result.
  timed = kernel_sass.triton_ir((64, 2, 1, 32, 128, 128), layers=2, programs=132,
                                cfg=kernels.KernelConfig(timeline=True))
  assert timed.count("mov.u32 $0, %clock;") == 1 + 2 + 2 * 5, timed.count("%clock")


@pytest.mark.parametrize("mode,hints", [("all", 4), ("ffn", 2), ("", 0)])
def test_idle_programs_prefetch_next_phase_weights(mode, hints):
  """Every phase of the tiny shape leaves programs idle (16 items each on 132 programs); they hint
  L2 (`prefetch.global.L2`, predicated per line) to fetch the next phase's weights: o_proj's
  during q/k/v, gate/up and down during attention, the next layer's q/k/v during the FFN."""
  from benchmarks import kernel_sass
  ir = kernel_sass.triton_ir((64, 2, 1, 32, 128, 128), layers=2, programs=132,
                             cfg=kernels.KernelConfig(idle_prefetch=mode))
  assert ir.count("@p prefetch.global.L2 [$1]") == hints


@pytest.mark.parametrize("lines,n,step", [(27648, 51, 512), (8640, 4, 512), (8640, 4, 64), (10, 3, 512), (5, 8, 2),
                                          (1, 1, 512)])
def test_prefetch_shares_cover_every_line_once(lines, n, step):
  """The n idle programs' shares, loop step by loop step, hint each line of the weight exactly
  once and nothing past its end."""
  _, per_step, trips = triton_ops.share_steps(lines, n, step)
  assert per_step <= step
  seen = [np.asarray(i)[np.asarray(m)] for k in range(n) for t in range(trips)
          for i, m in [triton_ops.share_lines(lines, n, jnp.int32(k), t, step)]]
  np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(lines))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_segment_state_carries_across_calls(dtype):
  """A persistent segment with a `SegmentState` (residual buffers rotating on from call to call,
  tagged q/k/v words kept, the input read in place, RoPE tables indexed in the kernel) gives the
  results of fresh buffers every call, over consecutive decode steps."""
  from puzzle_jax.core.arch import uniform_arch
  # 2 layers: 4 flips per call, so the rotation does not come back to buffer 0 by itself
  arch = uniform_arch(vocab_size=64, hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
                      intermediate_size=128, head_dim=32)
  ip = infer.prepare(arch, model.init_params(jax.random.PRNGKey(0), arch), dtype, decode_impl="persistent")
  cache = infer.init_cache(ip, 2, 128)
  p, E = ip.blocks[0], (2 + 2 * 1) * arch.head_dim  # (N + 2K) H
  kw = dict(attn_kind="gqa", ffn_kind="swiglu", num_heads=2, num_kv_heads=1, eps=arch.rms_eps)
  cos_SxH, sin_SxH = cache["rope"]
  mask = jnp.ones((2, 128), jnp.int32)
  h = arr(2, 64).astype(dtype)
  runs, kv_ref = {}, cache["layers"][0]
  for name, sync in (("fresh", kernels.sync_flags(1)), ("state", kernels.segment_state(1, 2, 64, E))):
    kv, hs = cache["layers"][0], []
    for idx in range(5, 9):
      pos = jnp.array([idx, idx - 3], jnp.int32)
      if name == "fresh":
        out, kv, sync = kernels.decode_segment(h, p, kv, sync, cos_SxH[pos], sin_SxH[pos], mask, idx, **kw)
        # the plain-jnp reference beside the kernel, layer after layer
        want, kv_ref = kernels.reference_segment(h, p, kv_ref, cos_SxH[pos], sin_SxH[pos], mask, idx, **kw)
        close(np.asarray(out, np.float32), np.asarray(want, np.float32), 1e-4 if dtype == jnp.float32 else 3e-2)
      else:
        out, kv, sync = kernels.decode_segment(h, p, kv, sync, cos_SxH, sin_SxH, mask, idx, pos_B=pos, **kw)
      hs.append(np.asarray(out, np.float32))
    runs[name] = (np.stack(hs), np.asarray(kv["k"], np.float32))
  close(runs["state"][0], runs["fresh"][0], 1e-5 if dtype == jnp.float32 else 2e-2)
  close(runs["state"][1], runs["fresh"][1], 1e-6)
  with pytest.raises(ValueError, match="residual buffers"):
    kernels.decode_segment(h, p, cache["layers"][0], kernels.segment_state(1, 3, 64, E), cos_SxH, sin_SxH, mask, 5,
                           pos_B=jnp.array([5, 2]), **kw)
