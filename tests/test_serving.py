"""puzzle_jax.serving (the PyTorch side), on CPU: the static-cache runner gives the greedy tokens of HF
`generate(do_sample=False)` and of `puzzle_jax.core.model.generate`; measurements have the right keys;
request-level counts follow EOS; cost tables validate; both CLI commands run end to end.

The child covers every sub-block kind: KV heads 4/2/1, a sliding window, linear attention and FFN,
no-op attention and FFN, a 2-block parallel group, FFN widths 128 / 256. Runner buckets of 8 slots
make the decode cross bucket boundaries.
"""

import json
import math
import warnings

import numpy as np
import pytest
import torch

from puzzle_jax.serving import cli, costs as torch_costs, load, measure, runner as serving_runner
from puzzle_jax.search import costs
from puzzle_jax.core import model
from puzzle_jax import export as ex
from puzzle_jax.core.arch import Arch, FFNSpec, uniform_arch
from archs import hetero_child, random_params

V, L, NEW = 97, 12, 16
EOS = 2


def parent_arch() -> Arch:
  return uniform_arch(vocab_size=V, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=4,
                      intermediate_size=256, bos_token_id=1, eos_token_id=EOS)


def export(arch, params, out):
  with warnings.catch_warnings():  # widths off the 256 grid warn about vLLM's ffn_mult
    warnings.simplefilter("ignore", UserWarning)
    return ex.export(arch, params, out, dtype="float32")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # fixture in conftest.py


@pytest.fixture(scope="module")
def child(tmp_path_factory):
  arch = hetero_child()
  params = random_params(arch)
  path = export(arch, params, tmp_path_factory.mktemp("child") / "model")
  return arch, params, path, load.load_model(path, dtype=torch.float32, device="cpu")


@pytest.fixture(scope="module")
def parent_dir(tmp_path_factory):
  arch = parent_arch()
  return export(arch, random_params(arch, seed=1), tmp_path_factory.mktemp("parent") / "model")


def prompts():
  """(tokens [2, L], all-ones mask, left-padded mask)."""
  tokens = np.random.RandomState(1).randint(3, V, size=(2, L))
  full = np.ones((2, L), bool)
  padded = full.copy()
  padded[1, :5] = False
  return tokens, full, padded


def finite_positive(x) -> bool:
  return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


# ----------------------------------------------------------------------------- token equality
def test_runner_tokens_equal_hf_and_reference(child):
  arch, params, _, m = child
  tokens, full, padded = prompts()
  first = serving_runner.StaticRunner(m, 2, L + NEW + 1).generate(torch.tensor(tokens), max_new_tokens=NEW)[0]
  mid = int(first[0, 3])  # a stop id that row 0 meets mid-way
  for mask, stops in ((full, ()), (padded, ()), (padded, (EOS, mid))):
    runner = serving_runner.StaticRunner(m, 2, L + NEW + 1, bucket=8)  # decode crosses buckets 16, 24
    got, n_gen = runner.generate(torch.tensor(tokens), torch.tensor(mask), max_new_tokens=NEW, eos_ids=stops)
    want = np.asarray(model.generate(arch, params, tokens, mask, max_new_tokens=NEW, stop_tokens=stops))
    np.testing.assert_array_equal(got.numpy(), want, err_msg=f"vs model.generate, stops={stops}")
    hf = serving_runner.hf_generate(m, torch.tensor(tokens), torch.tensor(mask), NEW, stops)
    np.testing.assert_array_equal(got.numpy(), hf.numpy(), err_msg=f"vs HF generate, stops={stops}")
    if stops:
      assert int(n_gen[0]) == 4 and got[0, 3] == mid and (got[0, 4:] == EOS).all()
    else:
      assert n_gen.tolist() == [NEW, NEW]


def test_runner_cache_layout(child):
  arch, _, _, m = child
  runner = serving_runner.StaticRunner(m, 3, 20, bucket=8)
  assert runner.slots == 24
  gqa = [i for i, b in enumerate(arch.blocks) if b.attn.kind == "gqa"]
  assert sorted(runner.cache) == gqa
  for i in gqa:
    assert tuple(runner.cache[i][0].shape) == (3, arch.blocks[i].attn.num_kv_heads, 24, arch.head_dim)
  assert runner.kv_cache_bytes == 3 * 24 * arch.kv_bytes_per_token("float32")


# ----------------------------------------------------------------------------- measurements
def test_measure_model_cpu(child):
  _, _, path, _ = child
  r = measure.measure_model(path, prefill_grid=[(2, 16), (1, 8)], decode_batches=(1, 3), decode_context=12,
                            new_tokens=4, dtype=torch.float32, repeats=2, warmup=1)
  assert r["mode"] == "eager" and r["mode_requested"] == "graphs" and r["device"] == "cpu"
  assert r["model"]["path"] == str(path) and r["model"]["attention_layers"] == 4
  assert [(p["batch"], p["prompt_len"]) for p in r["prefill"]] == [(2, 16), (1, 8)]
  assert [d["batch"] for d in r["decode"]] == [1, 3]
  for row in r["prefill"] + r["decode"]:
    for k in ("s", "min", "tokens_per_s"):
      assert finite_positive(row[k]), (k, row)
    assert row["iqr"] >= 0
  for d in r["decode"]:
    assert d["context"] == 12 and d["new_tokens"] == 4 and finite_positive(d["step_s"])
    assert finite_positive(d["kv_cache_bytes"])
  json.dumps(r, allow_nan=False)


def test_measure_requests_counts_tokens_to_eos(child):
  arch, params, _, m = child
  rng = np.random.RandomState(3)
  reqs = [rng.randint(3, V, size=n).tolist() for n in (7, 12, 4, 9, 5)]
  tokens, mask, _ = measure.left_pad(reqs, len(reqs))  # one left-padded batch: one compile
  greedy = np.asarray(model.generate(arch, params, tokens.numpy(), mask.numpy(), max_new_tokens=NEW))
  eos = int(greedy[0][0])  # request 0 stops at its first token

  def expected(seq):
    hits = np.nonzero(seq == eos)[0]
    return int(hits[0]) + 1 if len(hits) else NEW
  r = measure.measure_requests(m, None, reqs, batch=2, max_new_tokens=NEW, eos_ids=(eos,), mode="graphs")
  assert r["new_tokens"] == [expected(s) for s in greedy] and r["new_tokens"][0] == 1
  assert r["requests"] == 5 and r["mode"] == "eager"
  assert r["mean_new_tokens"] == pytest.approx(sum(r["new_tokens"]) / 5)
  assert r["tokens_per_s"] == pytest.approx(r["requests_per_s"] * r["mean_new_tokens"])
  assert finite_positive(r["requests_per_s"]) and r["stopped_frac"] >= 0.2


# ----------------------------------------------------------------------------- cost tables
def test_cost_table_torch_validates():
  # head_dim 24 != hidden / heads = 16, so a D/N slip shows in the KV bytes.
  arch = uniform_arch(vocab_size=V, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=128, head_dim=24)
  keys = ["attn/gqa_kv2", "attn/gqa_kv1_w4", "attn/linear", "attn/noop", "ffn/swiglu_128", "ffn/linear",
          "ffn/noop"]
  sc = costs.Scenario(batch=2, prompt_len=16, gen_len=8, dtype="float32", kv_dtype="float32", repeats=2,
                      warmup=1, min_call_s=0.0, flush_bytes=0)
  table = torch_costs.cost_table_torch(64, 4, 24, V, keys + keys[:1], sc, device="cpu")
  costs.validate_cost_table(table, arch, keys, scenario=sc)
  assert table["backend"] == "torch-cpu" and list(table["variants"]) == keys
  for k, v in table["variants"].items():
    if k.endswith("noop"):
      assert [v[f] for f in ("prefill_s", "decode_s", "weight_bytes", "kv_bytes", "params")] == [0] * 5
    else:
      assert finite_positive(v["prefill_s"]) and finite_positive(v["decode_s"]), k
  v = table["variants"]
  assert v["attn/gqa_kv2"]["kv_bytes"] == 2 * 2 * 24 * 4 * sc.batch * (16 + 8)
  assert v["attn/gqa_kv1_w4"]["kv_bytes"] == 2 * 1 * 24 * 4 * sc.batch * 4
  assert v["ffn/swiglu_128"]["params"] == arch.ffn_params(FFNSpec("swiglu", 128))
  assert finite_positive(table["fixed"]["prefill_s"]) and finite_positive(table["fixed"]["decode_s"])
  assert table["fixed"]["params"] == arch.fixed_params()


def test_predicted_vs_measured(child):
  arch, _, _, m = child
  sc = costs.Scenario(batch=2, prompt_len=16, gen_len=8, dtype="float32", kv_dtype="float32", repeats=2,
                      warmup=1, min_call_s=0.0, flush_bytes=0)
  table = torch_costs.cost_table_torch(64, 4, 16, V, costs.arch_keys(arch), sc, device="cpu")
  measured = measure.measure_model(m, prefill_grid=[(2, 16)], decode_batches=(2,), decode_context=16,
                                   new_tokens=8, repeats=2, warmup=1)
  cmp = torch_costs.predicted_vs_measured(table, arch, measured)
  assert set(cmp) == {"decode_s", "prefill_s"}
  for v in cmp.values():
    assert finite_positive(v["predicted"]) and finite_positive(v["measured"])
    assert v["predicted_over_measured"] == pytest.approx(v["predicted"] / v["measured"])
  assert torch_costs.predicted_vs_measured(table, arch, 1e-3)["decode_s"]["measured"] == 1e-3


# ----------------------------------------------------------------------------- CLI
def test_cli_measure_quick(child, parent_dir, tmp_path):
  _, _, child_dir, _ = child
  out = tmp_path / "measure.json"
  cli.main(["measure", "--parent", str(parent_dir), "--child", str(child_dir), "--out", str(out), "--quick"])
  res = json.loads(out.read_text())
  assert res["harness"]["quick"] and res["harness"]["device"] == "cpu"
  for role, path in (("parent", parent_dir), ("child", child_dir)):
    r = res[role]
    assert r["model"]["path"] == str(path) and r["mode"] == "eager"
    assert [d["batch"] for d in r["decode"]] == list(measure.QUICK.decode_batches)
    assert r["requests"]["requests"] == measure.QUICK.requests
    assert r["check"]["runner_equals_eager_runner"] and r["check"]["match_frac_vs_hf"] == 1.0
  ratios = res["ratios"]
  assert set(ratios["decode_speedup"]) == {"1", "4"} and set(ratios["prefill_speedup"]) == {"2x32", "1x32"}
  for k in ("request_speedup", "tokens_per_request_ratio", "params_ratio"):
    assert finite_positive(ratios[k]), k
  want = res["child"]["decode"][0]["tokens_per_s"] / res["parent"]["decode"][0]["tokens_per_s"]
  assert ratios["decode_speedup"]["1"] == pytest.approx(want)


def test_cli_measure_random_weights_on_config_only_exports(tmp_path, capsys):
  with warnings.catch_warnings():  # widths off the 256 grid warn about vLLM's ffn_mult
    warnings.simplefilter("ignore", UserWarning)
    parent = ex.export_config(parent_arch(), tmp_path / "parent", dtype="float32")
    child = ex.export_config(hetero_child(), tmp_path / "child", dtype="float32", code=False)  # package code
  out = tmp_path / "measure.json"
  cli.main(["measure", "--parent", str(parent), "--child", str(child), "--out", str(out), "--quick",
                "--random-weights", "--decode-batches", "2,3", "--prefill-grid", "2x8,1x16"])
  res = json.loads(out.read_text())
  assert res["harness"]["random_weights"] and res["harness"]["sizes"]["decode_batches"] == [2, 3]
  for role in ("parent", "child"):
    r = res[role]
    assert r["requests"] is None and r["check"] is None and r["model"]["random_weights"]
    assert [d["batch"] for d in r["decode"]] == [2, 3]
    assert [(p["batch"], p["prompt_len"]) for p in r["prefill"]] == [(2, 8), (1, 16)]
  ratios = res["ratios"]
  assert set(ratios["decode_speedup"]) == {"2", "3"} and set(ratios["prefill_speedup"]) == {"2x8", "1x16"}
  assert all(finite_positive(v) for v in ratios["decode_speedup"].values())
  assert "request_speedup" not in ratios and finite_positive(ratios["params_ratio"])
  assert "random weights" in capsys.readouterr().out  # the table says why req/s is missing


def test_cli_rejects_bad_grids():
  with pytest.raises(SystemExit):
    cli.parse_args(["measure", "--parent", "p", "--out", "o", "--prefill-grid", "16x"])
  assert cli.parse_args(["measure", "--parent", "p", "--out", "o"]).decode_batches is None


def test_cli_costs_with_whole_model_check(child, tmp_path):
  arch, _, child_dir, _ = child
  out = tmp_path / "costs.json"
  cli.main(["costs", "--arch-from", str(child_dir), "--keys", "attn/gqa_kv1,ffn/swiglu_64", "--batch", "2",
                "--prompt-len", "8", "--gen-len", "4", "--repeats", "2", "--check-whole", "--out", str(out)])
  keys = ["attn/gqa_kv1", "ffn/swiglu_64"]
  with pytest.raises(costs.CostTableError, match="measured for another model"):
    costs.load_cost_table(out, uniform_arch(vocab_size=V, hidden_size=32, num_layers=1, num_heads=4,
                                            num_kv_heads=1, intermediate_size=64), keys)
  table = costs.load_cost_table(out, arch, keys + costs.arch_keys(arch))
  assert table["backend"] == "torch-cpu"
  assert finite_positive(table["whole_model_check"]["decode_s"]["predicted_over_measured"])


def test_altered_modeling_file_is_refused(child, tmp_path, capsys):
  """An export whose shipped modeling code differs from the package's (or that ships other Python)
  is refused before anything is loaded: neither `load_model` nor `measure` runs code from it."""
  import shutil
  _, _, path, _ = child
  bad = tmp_path / "bad"
  shutil.copytree(path, bad)
  load.verify_export_code(bad)  # an untouched copy is the package's code
  with open(bad / "modeling_decilm.py", "a") as f:
    f.write("\nimport os; os.environ['PWNED'] = '1'\n")
  with pytest.raises(load.ExportCodeError, match="modeling_decilm.py: not this package's modeling code"):
    load.load_model(bad, dtype=torch.float32, device="cpu")
  with pytest.raises(load.ExportCodeError):
    cli.main(["measure", "--parent", str(bad), "--out", str(tmp_path / "r.json"), "--quick"])
  assert "PWNED" not in __import__("os").environ and not (tmp_path / "r.json").exists()
  extra = tmp_path / "extra"
  shutil.copytree(path, extra)
  (extra / "helper.py").write_text("x = 1\n")
  with pytest.raises(load.ExportCodeError, match="helper.py"):
    load.load_model(extra, dtype=torch.float32, device="cpu")


def test_harness_alias_runs_the_serving_cli():
  """`python -m puzzle_jax.harness` is the serving CLI under its old name."""
  import subprocess
  import sys
  for mod in ("puzzle_jax.serving", "puzzle_jax.harness"):
    out = subprocess.run([sys.executable, "-m", mod, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "measure" in out.stdout and "costs" in out.stdout, out.stderr[-2000:]
