"""Ablations at tiny settings on the finished tiny search: the metric and GKD-token sweeps write
their tables and plots, the metric sweep's KL child equals the pipeline's own MIP child, and
notebooks/02_ablations.ipynb executes on the outputs."""

import json
import os

import pytest

from conftest import REPO, tiny_config
from puzzle_jax import stages


def _load(name: str, path):
  """A script by path (experiments/ablations.py and configs/ablations.py share a module name)."""
  import importlib.util
  import sys
  spec = importlib.util.spec_from_file_location(name, path)
  mod = sys.modules[name] = importlib.util.module_from_spec(spec)  # dataclasses look the module up
  spec.loader.exec_module(mod)
  return mod


def _experiment():
  return _load("ablations_experiment", REPO / "experiments" / "ablations.py")


def _config():
  return _load("ablations_config", REPO / "configs" / "ablations.py").get_config("tiny")


@pytest.fixture(scope="module")
def results(run_dir, tmp_path_factory):
  out = tmp_path_factory.mktemp("ablations")
  c = _config()
  c.search = tiny_config(run_dir)  # the finished search: its stages are skipped, not redone
  c.out_dir = str(out)
  c.sweeps = ("metric", "gkd_tokens")
  c.metrics = ("kl", "nmse")
  c.gkd.step_grid = (0, 2)
  return out, _experiment().main(c)


def test_tables_and_plots(results, run_dir):
  out, res = results
  for name in ("metric", "gkd_tokens"):
    rows = json.loads((out / f"{name}.json").read_text())
    assert rows == res[name] and (out / f"{name}.png").stat().st_size > 1000
    assert (out / f"{name}.md").read_text().count("\n") == len(rows) + 2
  metric = {r["metric"]: r for r in res["metric"]}
  # The KL-scored child at the pipeline's target is the pipeline's own child: same measured KL.
  report = json.loads(stages.Paths(run_dir).report.read_text())
  assert metric["kl"]["kl"] == pytest.approx(report["at_target"]["mip"]["kl"], rel=1e-5)
  steps = {r["gkd_steps"]: r for r in res["gkd_tokens"]}
  assert steps[0]["kl"] == pytest.approx(metric["kl"]["kl"], rel=1e-6)  # 0 steps = the child itself
  assert steps[2]["kl"] != steps[0]["kl"] and steps[2]["gkd_tokens"] > 0


def test_ablations_notebook_executes(results):
  import nbclient
  import nbformat
  out, _ = results
  nb = nbformat.read(REPO / "notebooks" / "02_ablations.ipynb", as_version=4)
  os.environ["PJ_ABLATIONS_DIR"] = str(out)
  nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                          resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
  text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
  assert "sweeps ['gkd_tokens', 'metric']" in text and "lowest KL" in text
  assert sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", [])) == 2
