"""lm-eval through the JAX path: same requests, same numbers as lm-eval's own `hf` backend."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")

from puzzle_jax.evals import TASKS, TASKS_DIR, lm  # noqa: E402
from puzzle_jax.io import data  # noqa: E402
from puzzle_jax.io.tokenizer import load_tokenizer  # noqa: E402

LIMIT = 4  # documents per task: ~70 requests over the six tasks


@pytest.fixture(scope="module")
def task_manager():
  from lm_eval.tasks import TaskManager
  return TaskManager(include_path=str(TASKS_DIR))


@pytest.fixture(scope="module")
def small_lm(smollm2_small, smollm2_gguf):
  arch, params = smollm2_small
  return lm.PuzzleLM(arch=arch, params=params, tokenizer=load_tokenizer(smollm2_gguf), batch_size=8)


def evaluate(model, task_manager, tasks=TASKS, limit=LIMIT):
  return lm_eval.simple_evaluate(model=model, tasks=list(tasks), limit=limit, task_manager=task_manager,
                                 log_samples=True, bootstrap_iters=0)


def test_task_prompts_are_the_stock_formats(task_manager):
  """Rendered contexts/choices equal `data.load_eval_task` (lm-eval's prompt formats, written
  independently), so the local configs ask the stock questions."""
  tasks = task_manager.load(list(TASKS))["tasks"]
  for name, task in tasks.items():
    ref = data.load_eval_task(name.removeprefix("pj_"), limit=3)
    docs = list(task.eval_docs)[:3]
    for doc, want in zip(docs, ref):
      if name == "pj_lambada":
        assert (task.doc_to_text(doc), task.doc_to_target(doc)) == (want["context"], " " + want["target"])
        continue
      assert task.doc_to_text(doc) == want["context"]
      assert task.doc_to_choice(doc) == want["choices"]
      assert task.doc_to_target(doc) == want["label"]


@pytest.fixture(scope="module")
def hf_lm(smollm2_small, smollm2_gguf, tmp_path_factory):
  """lm-eval's own `hf` backend on the exported float32 parent (4-block slice of the real SmolLM2)."""
  from lm_eval.models.huggingface import HFLM
  from puzzle_jax import export
  out = export.export(*smollm2_small, tmp_path_factory.mktemp("hf") / "parent",
                      tokenizer=load_tokenizer(smollm2_gguf), dtype="float32")
  return HFLM(pretrained=str(out), trust_remote_code=True, dtype="float32", device="cpu", batch_size=8)


def resps(samples, k):
  return [[r[0][k] for r in s["resps"]] for s in samples]


def test_tasks_match_lm_eval_hf_backend(small_lm, hf_lm, task_manager, one_torch_thread):
  """Per request log-likelihoods and greedy flags, and every task metric, equal the `hf` backend's."""
  ours, ref = evaluate(small_lm, task_manager), evaluate(hf_lm, task_manager)
  for task in TASKS:
    a, b = ours["samples"][task], ref["samples"][task]
    assert [s["arguments"] for s in a] == [s["arguments"] for s in b]
    np.testing.assert_allclose(resps(a, 0), resps(b, 0), rtol=1e-4, atol=2e-3, err_msg=task)
    assert resps(a, 1) == resps(b, 1), task
    for metric, value in ref["results"][task].items():
      if metric.startswith(("acc", "perplexity")) and "stderr" not in metric:
        assert ours["results"][task][metric] == pytest.approx(value, rel=1e-3, abs=5e-3), (task, metric)


@pytest.mark.parametrize("max_length", [None, 16])
def test_rolling_matches_lm_eval_hf_backend(smollm2_small, small_lm, hf_lm, max_length, one_torch_thread):
  """loglikelihood_rolling (perplexity tasks) as HFLM: one window, and many 16-token windows."""
  from lm_eval.api.instance import Instance
  ours = lm.PuzzleLM(arch=smollm2_small[0], params=smollm2_small[1], tokenizer=small_lm.tok,
                     batch_size=4, max_length=max_length)
  hf_lm._max_length = max_length
  texts = ["The quick brown fox jumps over the lazy dog. " * 6, "Short text."]
  reqs = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
  np.testing.assert_allclose(ours.loglikelihood_rolling(reqs, True), hf_lm.loglikelihood_rolling(reqs, True),
                             rtol=1e-4, atol=2e-3)


def test_generate_until_matches_lm_eval_hf_backend(small_lm, hf_lm, one_torch_thread):
  """Greedy generate_until with left-padded batches and a stop sequence equals HFLM's text."""
  from lm_eval.api.instance import Instance
  hf_lm._max_length = None
  kw = {"until": [".", "\n"], "max_gen_toks": 12, "do_sample": False}
  prompts = ["Once upon a time", "The capital of France is", "Question: What is two plus two?\nAnswer:"]
  reqs = [Instance("generate_until", {}, (p, kw), i) for i, p in enumerate(prompts)]
  ours, ref = small_lm.generate_until(reqs, True), hf_lm.generate_until(reqs, True)
  assert ours == ref
  assert all("." not in t and "\n" not in t for t in ours) and sum(map(len, ours)) > 10, ours


def test_multiple_choice_is_a_hand_computed_comparison(smollm2_small, small_lm, task_manager):
  """A constructed ARC question through lm-eval's own request building and scoring: each choice's
  log-likelihood equals sum log p(choice tokens | context) from one plain `forward`, and acc /
  acc_norm are the argmax of those sums (raw, and divided by the choice's length in characters)."""
  from puzzle_jax.core import model
  arch, params = smollm2_small
  task = task_manager.load(["pj_arc_easy"])["tasks"]["pj_arc_easy"]
  doc = {"question": "What color is the sky on a clear day?", "choices": ["blue", "a loud noise", "green"],
         "gold": 1}
  ctx = task.doc_to_text(doc)
  got = small_lm.loglikelihood(task.construct_requests(doc, ctx, metadata=("t", 0, 1)), disable_tqdm=True)
  tok, hand, forward = small_lm.tok, [], jax.jit(model.forward, static_argnums=0)
  for choice in doc["choices"]:
    n_ctx, full = len(tok.encode(ctx)), tok.encode(f"{ctx} {choice}")
    logp = jax.nn.log_softmax(forward(arch, params, jnp.asarray([full[:-1]])), -1)[0]
    hand.append(sum(float(logp[t - 1, full[t]]) for t in range(n_ctx, len(full))))
  np.testing.assert_allclose([ll for ll, _ in got], hand, rtol=1e-5, atol=1e-4)
  metrics = task.process_results(doc, got)
  lens = np.array([len(c) for c in doc["choices"]], float)
  assert metrics["acc"] == float(np.argmax(hand) == doc["gold"])
  assert metrics["acc_norm"] == float(np.argmax(np.array(hand) / lens) == doc["gold"])


def test_retention_arithmetic():
  from puzzle_jax.evals.retention import retention
  scores = {"parent": {"a": 0.5, "b": 0.0, "c": 0.8}, "child": {"a": 0.25, "b": 0.1, "c": 0.8}}
  r = retention(scores, "parent")
  assert r["parent"] == {"a": 1.0, "b": None, "c": 1.0, "average": 1.0}
  assert r["child"] == {"a": 0.5, "b": None, "c": 1.0, "average": 0.75}


def test_retention_table(smollm2_small, small_lm, task_manager, tmp_path):
  """A copy of the parent keeps 100%; the child's retention is its score over the parent's (that the
  scores are each model's own lm-eval run is checked on the pipeline's child in test_pipeline)."""
  from puzzle_jax.core import model
  from puzzle_jax.evals import retention as R
  child = model.truncate(*smollm2_small, 3)
  table = R.retention_table({"parent": smollm2_small, "copy": smollm2_small, "child": child}, small_lm.tok,
                            ["arc_easy", "piqa"], limit=LIMIT, batch_size=8, progress=False,
                            manager=task_manager)
  assert table["tasks"] == ["pj_arc_easy", "pj_piqa"] and table["metric"]["pj_piqa"] == "acc_norm"
  assert table["scores"]["copy"] == table["scores"]["parent"]
  for t in table["tasks"]:
    p, c = table["scores"]["parent"][t], table["scores"]["child"][t]
    assert table["retention"]["child"][t] == (c / p if p > 0 else None)
    assert table["retention"]["copy"][t] in (1.0, None)
  R.plot_retention(table, tmp_path / "retention.png")
  assert (tmp_path / "retention.png").stat().st_size > 1000
  assert "child" in R.format_table(table)
  with pytest.raises(ValueError, match="unknown eval task"):
    R.task_name("mmlu")


def test_bad_model_args_are_named(tmp_path):
  with pytest.raises(TypeError, match=r"unknown argument\(s\) \['chekpoint'\]"):
    lm.PuzzleLM(checkpoint=str(tmp_path), chekpoint="x")
  with pytest.raises(FileNotFoundError, match="does not exist; pass a project checkpoint"):
    lm.PuzzleLM(checkpoint=str(tmp_path / "missing"))
  with pytest.raises(FileNotFoundError, match="no tokenizer found .* pass tokenizer="):
    lm.find_tokenizer(tmp_path)
