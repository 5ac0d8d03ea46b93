"""puzzle_jax.infer against the reference model (and transformers for the real SmolLM2 parent)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from puzzle_jax import infer, kernels
from puzzle_jax.kernels import persistent
from puzzle_jax.core import model
from puzzle_jax.core.arch import Arch, AttnSpec, BlockSpec, FFNSpec, uniform_arch

A, F = AttnSpec, FFNSpec
FULL = BlockSpec(A("gqa", num_kv_heads=2), F("swiglu", 48))
WIN = BlockSpec(A("gqa", num_kv_heads=1, window=3), F("swiglu", 32))


def hetero_arch() -> Arch:
  """Every kind of layer: runs to scan, mixed kv heads and FFN widths, a window, linear and no-op
  sub-blocks, a parallel group."""
  blocks = (FULL, FULL,
            BlockSpec(A("gqa", num_kv_heads=4, window=4), F("linear")),
            BlockSpec(A("linear"), F("noop")),
            BlockSpec(A("noop"), F("swiglu", 32)),
            BlockSpec(A("gqa", num_kv_heads=1), F("swiglu", 32), parallel_group=1),
            BlockSpec(A("linear"), F("swiglu", 48), parallel_group=1),
            WIN, WIN)
  return Arch(vocab_size=64, hidden_size=32, num_heads=4, head_dim=8, blocks=blocks)


@pytest.fixture(scope="module")
def hetero():
  arch = hetero_arch()
  params = model.init_params(jax.random.PRNGKey(0), arch)
  return arch, params, infer.prepare(arch, params, jnp.float32)


@pytest.fixture(scope="module")
def batch():
  """Tokens [3, 12], left-padded: row 0 full, row 1 five pads, row 2 two pads."""
  tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(1), (3, 12), 0, 64), np.int32)
  mask = np.ones((3, 12), bool)
  mask[1, :5] = mask[2, :2] = False
  return tokens, mask


ref_forward = jax.jit(model.forward, static_argnums=0)


def test_plan_scans_runs_and_keeps_parallel_groups(hetero):
  arch, _, ip = hetero
  assert ip.plan == (infer.Segment((0, 1)), infer.Segment((2,)), infer.Segment((3,)), infer.Segment((4,)),
                     infer.Segment((5, 6), parallel=True), infer.Segment((7, 8)))
  assert ip.blocks[0]["wqkv_ExD"].shape == (2, (4 + 2 * 2) * 8, 32)  # stacked run, fused q/k/v
  assert ip.blocks[1]["wqkv_ExD"].shape == (1, (4 + 2 * 4) * 8, 32)
  assert set(ip.blocks[3]) == {"ffn_norm_D", "wgu_2xFxD", "wd_DxF"}  # no-op attention owns nothing
  unrolled = infer.plan_segments(arch, scan=False)
  assert len(unrolled) == 8 and unrolled[5] == infer.Segment((5, 6), parallel=True)


@pytest.mark.parametrize("padded", [False, True])
def test_prefill_matches_forward(hetero, batch, padded):
  arch, params, ip = hetero
  tokens, mask = batch
  mask = mask if padded else None
  got = np.asarray(infer.prefill_logits(ip, tokens, mask))
  want = np.asarray(ref_forward(arch, params, tokens, mask))
  valid = np.ones(tokens.shape, bool) if mask is None else mask
  np.testing.assert_allclose(got[valid], want[valid], rtol=1e-5, atol=1e-5)


def test_unrolled_layout_matches_scanned(hetero, batch):
  """scan=False: every layer its own weights and cache, nothing scanned; same numbers."""
  arch, params, ip = hetero
  tokens, mask = batch
  flat = infer.prepare(arch, params, jnp.float32, scan=False)
  assert len(flat.plan) == 8
  np.testing.assert_allclose(np.asarray(infer.prefill_logits(flat, tokens, mask))[mask],
                             np.asarray(infer.prefill_logits(ip, tokens, mask))[mask], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(infer.generate(flat, tokens, mask, max_new_tokens=10)),
                                np.asarray(infer.generate(ip, tokens, mask, max_new_tokens=10)))


def test_generate_greedy_matches_reference(hetero, batch):
  arch, params, ip = hetero
  tokens, mask = batch
  want = np.asarray(model.generate(arch, params, tokens, mask, max_new_tokens=10))
  got = np.asarray(infer.generate(ip, tokens, mask, max_new_tokens=10))
  np.testing.assert_array_equal(got, want)


def test_incremental_decoding_equals_full_forward(hetero, batch):
  """Prefill 7 tokens (left-padded), feed the other 5 one at a time: same logits as one forward."""
  _, _, ip = hetero
  tokens, mask = batch
  full = np.asarray(infer.prefill_logits(ip, tokens, mask))
  logits, cache = infer.prefill_cache(ip, tokens[:, :7], mask[:, :7], max_len=12)
  np.testing.assert_allclose(np.asarray(logits), full[:, 6], rtol=1e-5, atol=1e-5)
  for t in range(7, 12):
    logits, cache = infer.decode_step(ip, tokens[:, t], cache)
    np.testing.assert_allclose(np.asarray(logits), full[:, t], rtol=1e-5, atol=1e-5)


def test_sampling_reproducible_and_matches_reference(hetero, batch):
  arch, params, ip = hetero
  tokens, mask = batch
  kw = dict(max_new_tokens=8, temperature=0.8, top_p=0.9)
  k1, k2 = jax.random.PRNGKey(5), jax.random.PRNGKey(6)
  a = np.asarray(infer.generate(ip, tokens, mask, key=k1, **kw))
  np.testing.assert_array_equal(a, np.asarray(infer.generate(ip, tokens, mask, key=k1, **kw)))
  assert not np.array_equal(a, np.asarray(infer.generate(ip, tokens, mask, key=k2, **kw)))
  np.testing.assert_array_equal(a, np.asarray(model.generate(arch, params, tokens, mask, key=k1, **kw)))

  # Stop tokens: a row repeats the first stop token after its first stop; nothing else changes
  # (step t still samples with split(key)[t]). Stops: tokens first seen mid-row.
  stops = tuple(int(row[t]) for row in a for t in range(2, 8) if row[t] not in row[:t])[:2]
  assert stops, a
  expect = a.copy()
  for row in expect:
    hit = np.flatnonzero(np.isin(row, stops))
    if hit.size:
      row[hit[0] + 1:] = stops[0]
  np.testing.assert_array_equal(np.asarray(infer.generate(ip, tokens, mask, key=k1, stop_tokens=stops, **kw)),
                                expect)


def fused_arch() -> Arch:
  """hetero_arch's layers at sizes the fused decode kernels tile (head_dim 32); its parallel group
  is handed back to XLA."""
  return dataclasses.replace(hetero_arch(), hidden_size=64, head_dim=32)


@pytest.mark.parametrize("impl,scan", [("pallas", True), ("pallas", False), ("persistent", True)])
def test_fused_decode_kernels_match(batch, impl, scan):
  """decode_impl="pallas" / "persistent" (interpreted here): incremental decoding of a left-padded
  batch equals one full forward, and greedy tokens equal the XLA decode's."""
  arch = fused_arch()
  params = model.init_params(jax.random.PRNGKey(0), arch)
  tokens, mask = batch
  fused = infer.prepare(arch, params, jnp.float32, scan=scan, decode_impl=impl)
  full = np.asarray(infer.prefill_logits(fused, tokens, mask))
  logits, cache = infer.prefill_cache(fused, tokens[:, :7], mask[:, :7], max_len=12)
  for t in range(7, 12):
    logits, cache = infer.decode_step(fused, tokens[:, t], cache)
    np.testing.assert_allclose(np.asarray(logits), full[:, t], rtol=1e-4, atol=1e-4)
  xla = infer.prepare(arch, params, jnp.float32, scan=scan, decode_impl="xla")
  np.testing.assert_array_equal(np.asarray(infer.generate(fused, tokens, mask, max_new_tokens=8)),
                                np.asarray(infer.generate(xla, tokens, mask, max_new_tokens=8)))


@pytest.mark.parametrize("max_len,prompt", [(384, 300), (512, 450)])
def test_persistent_decode_long_cache(max_len, prompt):
  """The persistent kernel's attention steps cover the whole cache: 256-slot steps where they
  divide it (512: two, the second loaded in the loop), else 128 (384: three). Decode logits past
  the first step equal XLA's."""
  assert [persistent._attn_block(s, 256) for s in (128, 256, 384, 512)] == [128, 256, 128, 256]
  arch = uniform_arch(vocab_size=64, hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
                      intermediate_size=128, head_dim=32)
  params = model.init_params(jax.random.PRNGKey(0), arch)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (1, prompt + 2), 0, 64)
  out = {}
  for impl in ("persistent", "xla"):
    ip = infer.prepare(arch, params, jnp.float32, decode_impl=impl)
    _, cache = infer.prefill_cache(ip, tokens[:, :prompt], None, max_len=max_len)
    steps = []
    for t in range(prompt, prompt + 2):
      logits, cache = infer.decode_step(ip, tokens[:, t], cache)
      steps.append(np.asarray(logits))
    out[impl] = np.stack(steps)
  assert out["xla"].shape == (2, 1, 64)
  np.testing.assert_allclose(out["persistent"], out["xla"], rtol=1e-4, atol=1e-4)


def test_persistent_ffn_rows_spread_over_programs():
  """FFN items need not be powers of two: 1536 rows over 132 SMs are 128 items of 12 rows (16-row
  tiles, 4 masked) instead of 96 of 16. Interpreted with 12-row items over a 96-wide FFN (8 items
  in 16-row tiles; the last tile runs past the gate rows into the up rows and past the array's
  end, masked): decode logits equal XLA's."""
  assert persistent._ffn_rows(1536, 132) == 12 and persistent._ffn_rows(14336, 132) == 64
  assert persistent._ffn_rows(1536, 1) == persistent._row_block(1536, 1)
  arch = uniform_arch(vocab_size=64, hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
                      intermediate_size=96, head_dim=32)
  params = model.init_params(jax.random.PRNGKey(0), arch)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (1, 10), 0, 64)
  out = {}
  for impl in ("persistent", "xla"):
    ip = infer.prepare(arch, params, jnp.float32, decode_impl=impl, kernel_config=kernels.KernelConfig(ffn_rows=12))
    _, cache = infer.prefill_cache(ip, tokens[:, :8], None, max_len=128)
    steps = []
    for t in (8, 9):
      logits, cache = infer.decode_step(ip, tokens[:, t], cache)
      steps.append(np.asarray(logits))
    out[impl] = np.stack(steps)
  np.testing.assert_allclose(out["persistent"], out["xla"], rtol=1e-4, atol=1e-4)


# "auto" on the CPU as it is on the GPU: the interpreted kernels for one half-precision row.
AUTO_HERE = kernels.KernelConfig(fused_backends=(jax.default_backend(),), min_run=3)


def _step_jaxpr(ip, cache) -> str:
  return str(jax.make_jaxpr(infer.decode_step)(ip, jnp.ones((1,), jnp.int32), cache))


@pytest.mark.parametrize("layers,auto_kernels", [(2, 5), (3, 1)])  # 2: five kernels in the scan body
def test_auto_decode_uses_persistent_kernels_for_long_runs_only(layers, auto_kernels):
  """decode_impl="auto" where it picks the persistent kernel (the CPU, by `fused_backends`) runs it
  only for runs of at least `min_run` identical blocks; shorter runs take the five kernels (a
  persistent kernel's start costs more than it saves there). "persistent" asked for explicitly
  runs it for every run; float32 (or a wider batch) under "auto" stays on XLA."""
  arch = uniform_arch(vocab_size=64, hidden_size=64, num_layers=layers, num_heads=2, num_kv_heads=1,
                      intermediate_size=128, head_dim=32)
  params = model.init_params(jax.random.PRNGKey(0), arch)
  # Pallas kernels in one decode step's jaxpr: 5 per (scanned) block, or 1 per persistent run
  for impl, dtype, want in (("auto", jnp.bfloat16, auto_kernels), ("persistent", jnp.bfloat16, 1),
                            ("auto", jnp.float32, 0)):
    ip = infer.prepare(arch, params, dtype, decode_impl=impl, kernel_config=AUTO_HERE)
    _, cache = infer.prefill_cache(ip, jnp.ones((1, 4), jnp.int32), None, max_len=8)
    assert _step_jaxpr(ip, cache).count("pallas_call") == want, (impl, dtype, layers)


def test_persistent_generate_raises_on_barrier_timeouts():
  """A persistent kernel whose programs were not all resident (barrier waits gave up) decodes
  wrong tokens: generate does not return them. Asked for, it raises; chosen by "auto", it decodes
  again with the five kernels, and says so (timeouts cannot happen in the interpreter's single
  program: `after_timeouts` is what generate calls when they do)."""
  arch = uniform_arch(vocab_size=64, hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
                      intermediate_size=128, head_dim=32)
  ip = infer.prepare(arch, model.init_params(jax.random.PRNGKey(0), arch), jnp.float32, decode_impl="persistent")
  tokens = jnp.ones((1, 4), jnp.int32)
  assert infer.generate(ip, tokens, max_new_tokens=2).shape == (1, 2)
  with pytest.raises(RuntimeError, match="grid-barrier waits .* timed out"):
    infer.after_timeouts(ip, 3)
  auto = dataclasses.replace(ip, decode_impl="auto")
  with pytest.warns(UserWarning, match="decoded again with decode_impl='pallas'"):
    retry = infer.after_timeouts(auto, 3)
  assert retry.decode_impl == "pallas"
  np.testing.assert_array_equal(infer.generate(retry, tokens, max_new_tokens=3),
                                infer.generate(dataclasses.replace(ip, decode_impl="xla"), tokens, max_new_tokens=3))


def test_prepare_rejects_unknown_decode_impl(hetero):
  arch, params, _ = hetero
  with pytest.raises(ValueError, match="decode_impl"):
    infer.prepare(arch, params, decode_impl="triton")


def test_smollm2_real_weights_match_transformers(smollm2_parent, smollm2_hf, one_torch_thread):
  """The real parent (30 layers in one scanned run): float32 prefill logits vs transformers' own
  load of the same GGUF."""
  import torch
  arch, params = smollm2_parent
  ip = infer.prepare(arch, params, jnp.float32)
  assert ip.plan == (infer.Segment(tuple(range(30))),)
  tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(3), (2, 12), 0, arch.vocab_size), np.int32)
  with torch.no_grad():
    want = smollm2_hf(input_ids=torch.from_numpy(tokens)).logits.float().numpy()
  got = np.asarray(infer.prefill_logits(ip, tokens))
  assert np.abs(got - want).max() < 1e-3 * np.abs(want).max()
  np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))


def test_benchmark_cpu_mode_runs_and_agrees(tmp_path):
  from benchmarks import inference
  res = inference.main(["--device-size", "cpu", "--model", "smollm2-random", "--runs", "2",
                        "--variants", "scan,default", "--serving", "--out", str(tmp_path / "bench.json")])
  assert res["agreement"]["ok"], res["agreement"]
  assert {"ours (scan)", "ours (default)", "transformers eager", "serving runner (eager)"} <= set(res["rows"])
  assert res["rows"]["ours (scan)"]["decode_b1"]["tok_s"] > 0
  assert res["rows"]["serving runner (eager)"]["decode_b4"]["tok_s"] > 0
  assert res["rows"]["ours (default)"]["decode_b1"]["layout"] == "scan"  # off the GPU prepare scans
  assert (tmp_path / "bench.json").exists()


def test_decode_profile_cpu_mode_agrees(tmp_path):
  """benchmarks/decode_profile.py at tiny sizes: the fused kernels (interpreted) decode the same
  float32 greedy tokens as XLA, and every implementation and knob setting gets timed."""
  from benchmarks import decode_profile
  res = decode_profile.main(["--model", "tiny", "--flags", "default", "--runs", "1",
                             "--impls", "xla,pallas/matmul_warps=4,persistent", "--out", str(tmp_path / "p.json")])
  run = res["runs"]["default"]
  for impl in ("pallas", "persistent"):
    check = run["f32_check"][impl]
    assert check["greedy_equal"] and check["step_logits_rel_err"] < 1e-4 and check["barrier_timeouts"] == 0, check
  assert all(r["tok_s"] > 0 and "error" not in r for r in run["impls"].values()), run["impls"]
  assert run["impls"]["pallas/matmul_warps=4"]["step_top1_equal"] and run["impls"]["persistent"]["step_top1_equal"]


def test_persistent_tagged_qkv_matches_barrier():
  """bf16 persistent decoding with tagged q/k/v words (no grid barrier between q/k/v and attention,
  attention adding into the next residual buffer) gives the logits of the barrier version, and
  greedy tokens equal the five-kernel path's."""
  arch = uniform_arch(vocab_size=64, hidden_size=64, num_layers=3, num_heads=2, num_kv_heads=1,
                      intermediate_size=128, head_dim=32)
  params = model.init_params(jax.random.PRNGKey(0), arch)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (1, 9), 0, 64)
  out = {}
  for name, tags in (("tags", True), ("barrier", False)):
    ip = infer.prepare(arch, params, jnp.bfloat16, decode_impl="persistent",
                       kernel_config=kernels.KernelConfig(qkv_tags=tags))
    _, cache = infer.prefill_cache(ip, tokens[:, :6], None, max_len=128)
    # tagged q/k/v words: bf16 bits or'ed with the layer's tag (no `or` in the kernel without them)
    assert (" or " in _step_jaxpr(ip, cache)) == tags
    steps = []
    for t in range(6, 9):
      logits, cache = infer.decode_step(ip, tokens[:, t], cache)
      steps.append(np.asarray(logits, np.float32))
    out[name] = np.stack(steps)
  np.testing.assert_allclose(out["tags"], out["barrier"], rtol=1e-2, atol=1e-2)
  five = infer.prepare(arch, params, jnp.bfloat16, decode_impl="pallas")
  segment = infer.prepare(arch, params, jnp.bfloat16, decode_impl="persistent")
  np.testing.assert_array_equal(np.asarray(infer.generate(segment, tokens, None, max_new_tokens=6)),
                                np.asarray(infer.generate(five, tokens, None, max_new_tokens=6)))


def test_core_imports_without_torch():
  """The JAX core (package, infer, stages) imports neither torch nor transformers: they belong to
  the `serving` extra. A subprocess with both hidden imports it."""
  import subprocess
  import sys
  code = ("import importlib.abc, sys\n"
          "class Hide(importlib.abc.MetaPathFinder):\n"
          "  def find_spec(self, name, path=None, target=None):\n"
          "    if name.split('.')[0] in ('torch', 'transformers'):\n"
          "      raise ModuleNotFoundError(name + ' hidden')\n"
          "sys.meta_path.insert(0, Hide())\n"
          "import puzzle_jax, puzzle_jax.infer, puzzle_jax.stages, puzzle_jax.kernels, puzzle_jax.cost_table\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]


def test_default_layout_is_the_fastest_measured():
  """On the GPU prepare stacks runs only where the persistent kernel decodes them (SmolLM2 at
  batch 1, bf16, long runs); Llama-3.1-8B shapes at any batch and SmolLM2 at batch 64 get per-layer buffers,
  unrolled (the scan copies each layer's weights every step). Off the GPU it always scans."""
  small = uniform_arch(vocab_size=64, hidden_size=576, num_layers=8, num_heads=9, num_kv_heads=3,
                       intermediate_size=1536, head_dim=64)
  big = uniform_arch(vocab_size=64, hidden_size=4096, num_layers=2, num_heads=32, num_kv_heads=8,
                     intermediate_size=14336, head_dim=128)
  bf = jnp.bfloat16
  assert infer.default_scan(small, bf, 1, backend="gpu") and infer.default_scan(small, bf, None, backend="gpu")
  assert not infer.default_scan(small, bf, 64, backend="gpu")
  assert not infer.default_scan(big, bf, 1, backend="gpu") and not infer.default_scan(big, bf, 64, backend="gpu")
  assert not infer.default_scan(small, jnp.float32, 1, backend="gpu")  # float32: XLA decodes
  assert not infer.default_scan(small, bf, 1, "xla", backend="gpu") and infer.default_scan(small, bf, 64, "persistent",
                                                                                             backend="gpu")
  assert all(infer.default_scan(a, bf, b, backend="cpu") for a in (small, big) for b in (1, 64))
  # short runs (a heterogeneous child: runs of 1-2 blocks) decode faster unrolled, five kernels per block
  mixed = dataclasses.replace(small, blocks=tuple(small.blocks[0] if i % 3 else dataclasses.replace(
      small.blocks[0], ffn=FFNSpec("swiglu", 768)) for i in range(6)))
  assert not infer.default_scan(mixed, bf, 1, backend="gpu")
  two = dataclasses.replace(small, blocks=small.blocks[:2])
  params = model.init_params(jax.random.PRNGKey(0), two)
  assert len(infer.prepare(two, params, bf).plan) == 1  # this backend (CPU in tests): stacked
  assert len(infer.prepare(two, params, bf, scan=False).plan) == 2
