"""benchmarks/puzzle8b.py: proxy scores transferred from SmolLM2 cover every 8B candidate sensibly;
`select` solves end to end on CPU (roofline cost tables stand in for the H100's) and matches brute force.
"""

import json
import math
import warnings

import numpy as np
import pytest

from benchmarks import puzzle8b as P
from puzzle_jax.search import costs
from puzzle_jax.search import mip
from puzzle_jax.search import realize
from puzzle_jax.search import scoring
from puzzle_jax.search import select as search
from puzzle_jax import export as ex
from puzzle_jax.core.arch import Arch, uniform_arch

PARENT_DIR = P.REPO / "benchmarks" / "data" / "llama8b_parent"
PROXY = P.REPO / "benchmarks" / "data" / "llama8b_proxy_scores.json"
MONOTONE_LAYER = 7  # of the synthetic source: linear attention worse than its fewest KV heads
FIELDS = ("kl", "lm_loss", "lm_loss_delta", "top1", "one_minus_top1")


def entry(kl: float) -> dict[str, float]:
  top1 = math.exp(-kl)
  return {"kl": kl, "lm_loss": 3.0 + kl, "lm_loss_delta": kl, "top1": top1, "one_minus_top1": 1 - top1}


def smollm2_style_scores(seed: int = 0) -> dict[str, dict[str, float]]:
  """Every SmolLM2-135M candidate (30 layers; KV 3/1, FFN 1536/768/384, linear, no-op); the full
  variants score 0, narrower ones more; linear attention beats KV 1 except at MONOTONE_LAYER."""
  rng = np.random.default_rng(seed)
  out = {}
  for l in range(30):
    a, f = rng.uniform(0.01, 1.0, 2)
    lin_a = 0.5 * a if l != MONOTONE_LAYER else 2 * a
    kls = {"attn/gqa_kv3": 0.0, "attn/gqa_kv1": a, "attn/linear": lin_a, "attn/noop": 4 * a,
           "ffn/swiglu_1536": 0.0, "ffn/swiglu_768": f, "ffn/swiglu_384": 2 * f, "ffn/linear": 3 * f,
           "ffn/noop": 6 * f}
    out.update({f"L{l:03d}/{k}": entry(v) for k, v in kls.items()})
  return out


@pytest.fixture(scope="module")
def parent() -> Arch:
  return P.load_arch(PARENT_DIR)


@pytest.fixture(scope="module")
def proxy(parent) -> dict[str, dict[str, float]]:
  return P.proxy_scores(smollm2_style_scores(), P.load_arch(P.SMOLLM2_ARCH), P.candidate_set(parent))


# ----------------------------------------------------------------------------- the committed parent
def test_parent_dir_is_llama31_8b(parent):
  want = P.llama31_8b()
  assert parent == want
  b = parent.blocks[0]
  assert (parent.vocab_size, parent.hidden_size, parent.num_layers, parent.num_heads, parent.head_dim) == \
      (128256, 4096, 32, 32, 128)
  assert b.attn.num_kv_heads == 8 and b.ffn.intermediate_size == 14336 and not parent.tie_embeddings
  assert parent.rope.rope_type == "llama3" and parent.rope.theta == 500000.0 and parent.rope.factor == 8.0
  assert not list(PARENT_DIR.glob("*.safetensors"))
  cfg = json.loads((PARENT_DIR / "config.json").read_text())
  assert ex.check_nemotron_nas_config(cfg) == []
  assert not any((PARENT_DIR / f).exists() for f in P.export.hf_export.FILES)  # the harness brings the code


def test_candidate_keys_are_the_8b_variants(parent):
  assert sorted(P.candidate_set(parent).keys) == sorted(
      [f"attn/gqa_kv{k}" for k in (8, 4, 2, 1)] + ["attn/linear", "attn/noop"]
      + [f"ffn/swiglu_{w}" for w in (14336, 10752, 7168, 3584)] + ["ffn/linear", "ffn/noop"])


# ----------------------------------------------------------------------------- proxy scores
def test_proxy_scores_cover_every_candidate(parent, proxy):
  library = P.candidate_set(parent)
  assert set(proxy) == {c.id for c in library.candidates} and len(proxy) == 32 * 12
  for cid, e in proxy.items():
    assert set(e) == set(FIELDS) and all(math.isfinite(v) for v in e.values()), cid
  for l in range(32):
    assert proxy[f"L{l:03d}/attn/gqa_kv8"]["kl"] == pytest.approx(0.0, abs=1e-12)
    assert proxy[f"L{l:03d}/ffn/swiglu_14336"]["kl"] == pytest.approx(0.0, abs=1e-12)


def test_proxy_scores_follow_the_layer_map_and_fractions(proxy):
  src = smollm2_style_scores()
  assert [P.source_layer(i, 32, 30) for i in (0, 8, 31)] == [0, 7, 29]
  for l in (0, 31):
    s = P.source_layer(l, 32, 30)
    assert proxy[f"L{l:03d}/attn/noop"] == src[f"L{s:03d}/attn/noop"]  # copied
    assert proxy[f"L{l:03d}/ffn/linear"] == src[f"L{s:03d}/ffn/linear"]
    for f8, f1 in ((7168, 768), (3584, 384)):  # same fraction: exact
      assert proxy[f"L{l:03d}/ffn/swiglu_{f8}"]["kl"] == pytest.approx(src[f"L{s:03d}/ffn/swiglu_{f1}"]["kl"])
    half = (src[f"L{s:03d}/ffn/swiglu_768"]["kl"] + 0) / 2  # 0.75 is halfway between 0.5 and 1
    assert proxy[f"L{l:03d}/ffn/swiglu_10752"]["kl"] == pytest.approx(half)
    kv1, lin = src[f"L{s:03d}/attn/gqa_kv1"]["kl"], src[f"L{s:03d}/attn/linear"]["kl"]
    assert proxy[f"L{l:03d}/attn/gqa_kv4"]["kl"] == pytest.approx(kv1 * (1 - 0.5) / (1 - 1 / 3))
    assert proxy[f"L{l:03d}/attn/gqa_kv2"]["kl"] == pytest.approx(lin + (kv1 - lin) * 0.25 * 3)  # below 1/3


def test_proxy_scores_monotone_where_the_source_is(proxy):
  l = 8  # -> source layer MONOTONE_LAYER
  assert P.source_layer(l, 32, 30) == MONOTONE_LAYER
  for sub, names in (("attn", [f"gqa_kv{k}" for k in (8, 4, 2, 1)] + ["linear"]),
                     ("ffn", [f"swiglu_{w}" for w in (14336, 10752, 7168, 3584)])):
    kls = [proxy[f"L{l:03d}/{sub}/{n}"]["kl"] for n in names]
    assert all(a < b for a, b in zip(kls, kls[1:])), (sub, kls)


def test_proxy_scores_cli_writes_scores_v1(tmp_path):
  src = tmp_path / "src.json"
  scoring.save_scores(src, smollm2_style_scores(), {"tokens": 256})
  out = P.main(["proxy-scores", "--src", str(src), "--parent", str(PARENT_DIR), "--out", str(tmp_path / "p.json")])
  doc = json.loads(out.read_text())
  assert doc["format"] == "puzzle_jax.scores/v1" and "PROXY" in doc["note"] and doc["source_meta"] == {"tokens": 256}
  assert doc["keys"] == P.candidate_set(P.load_arch(PARENT_DIR)).keys and len(doc["layer_map"]) == 32
  assert len(scoring.load_scores(out)) == 32 * 12


def test_committed_proxy_scores_cover_the_parent(parent):
  scores = scoring.load_scores(PROXY)
  assert set(scores) == {c.id for c in P.candidate_set(parent).candidates}
  assert all(math.isfinite(e["kl"]) for e in scores.values())


# ----------------------------------------------------------------------------- select
def roofline_table(arch: Arch, path, **scenario):
  sc = costs.Scenario(**scenario)
  table = costs.analytic_table(arch, P.candidate_set(arch).keys, sc, peak_flops=989e12, bandwidth=3.35e12)
  costs.save_cost_table(table, path)
  return path


def run_select(parent_dir, scores, costs_path, target, out):
  P.main(["select", "--parent", str(parent_dir), "--scores", str(scores), "--costs", str(costs_path),
          "--target", str(target), "--out", str(out)])
  return json.loads((out / "solution.json").read_text())


def check_outputs(out, parent: Arch, doc: dict, target: float) -> Arch:
  assert (out / "choices.png").stat().st_size > 0 and not list(out.glob("*.tmp*"))
  child = P.load_arch(out / "child")
  assert child == realize.child_arch(parent, [tuple(c) for c in doc["choices"]])
  assert not list((out / "child").glob("*.safetensors"))
  assert doc["choices"][0][0] == realize.parent_choices(parent)[0][0]  # layer 0's attention kept
  assert doc["predicted_decode_speedup"] >= target * (1 - 1e-9)
  assert doc["totals"]["decode_s"] <= doc["parent_totals"]["decode_s"] / target * (1 + 1e-9)
  return child


def test_select_tiny_matches_brute_force(tmp_path, capsys):
  parent = uniform_arch(vocab_size=64, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2,
                        intermediate_size=256)
  with warnings.catch_warnings():  # widths off the 256 grid warn about vLLM's ffn_mult
    warnings.simplefilter("ignore", UserWarning)
    parent_dir = ex.export_config(parent, tmp_path / "parent")
    library = P.candidate_set(parent)
    rng = np.random.default_rng(1)
    scores = {c.id: entry(0.0 if realize.parent_choices(parent)[c.layer][c.sub == "ffn"] == c.key
                          else float(rng.uniform(0.05, 1.0))) for c in library.candidates}
    scoring.save_scores(tmp_path / "scores.json", scores, {})
    # small batch and context: KV reads and FFN weights cost alike, so the choice mixes both
    table = roofline_table(parent, tmp_path / "costs.json", batch=4, prompt_len=32, gen_len=16)
    doc = run_select(parent_dir, tmp_path / "scores.json", table, 1.3, tmp_path / "out")
  assert capsys.readouterr().out.strip().splitlines()[-1].startswith("select: optimal")
  check_outputs(tmp_path / "out", parent, doc, 1.3)
  problem = search.build_problem(library, scores, costs.load_cost_table(table), "kl",
                                 search.Targets(decode_speedup=1.3))
  best = mip.brute_force(problem.layers, search.budgets(problem.parent_totals, problem.targets),
                         fixed=problem.fixed, forced=problem.forced)
  assert doc["objective"] == pytest.approx(best.objective, abs=1e-9) and best.objective > 0
  assert {a for a, _ in doc["choices"][1:]} != {"attn/gqa_kv2"} and {f for _, f in doc["choices"]} != {"ffn/swiglu_256"}
  assert doc["scenario"]["batch"] == 4 and doc["cost_table"]["backend"] == "analytic"


def test_select_8b_with_proxy_scores(parent, proxy, tmp_path):
  scoring.save_scores(tmp_path / "scores.json", proxy, {})
  table = roofline_table(parent, tmp_path / "costs.json", batch=64, prompt_len=512, gen_len=128)
  doc = run_select(PARENT_DIR, tmp_path / "scores.json", table, 1.5, tmp_path / "out")
  child = check_outputs(tmp_path / "out", parent, doc, 1.5)
  assert child.num_layers == 32 and doc["status"] == "optimal"
  assert ex.check_nemotron_nas_config(json.loads((tmp_path / "out" / "child" / "config.json").read_text())) == []
