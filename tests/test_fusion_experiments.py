"""The fusion experiments, the fusion-deps CLI stage and the fusion notebook, end to end at tiny size on
the real parent (on a copy of the suite's one tiny search run, conftest.run_dir)."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def results(run_dir, tmp_path_factory):
  """The experiments on a copy of the suite's tiny search (conftest.run_dir is read-only)."""
  import importlib.util
  import shutil
  from conftest import tiny_config
  root = tmp_path_factory.mktemp("fusion") / "wd"
  shutil.copytree(run_dir, root)
  spec = importlib.util.spec_from_file_location("fusion_smollm2", REPO / "configs" / "fusion_smollm2.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = tiny_config(root)
  c.fusion_exp = mod.get_config("tiny").fusion_exp
  sys.path.insert(0, str(REPO / "experiments"))
  import fusion
  return c, fusion.main(c)


def test_experiments_write_tables_and_plots(results):
  c, out = results
  res = json.loads((out / "fusion.json").read_text())
  rl = res["run_length"]
  assert [r["k"] for r in rl] == [1, 2, 3]
  assert all(r["fusion_delta"] > 0 for r in rl if r["k"] > 1)  # fusion changes the model
  assert rl[2]["kl_fused"] > rl[1]["kl_fused"]  # a longer fused run costs more
  assert len(res["block_parallel"]) == 3 and all(r["kl"] > 0 for r in res["block_parallel"])
  done = [r for r in res["joint"] if "joint_kl" in r]
  assert done, res["joint"]
  for r in done:  # same predicted speed, and the joint objective is never worse (it contains fuse-after)
    assert r["joint_pred_speedup"] >= r["pred_speedup"] * (1 - 1e-6)
    assert r["joint_objective"] <= r["seq_objective"] + 1e-9
  for r in res["child_fusion"]:
    assert r["pred_speedup_fused"] >= r["pred_speedup_unfused"] - 1e-9
  md = (out / "fusion.md").read_text()
  assert "## Fused-run length" in md and "| start | k |" in md
  for png in ("run_length.png", "block_parallel.png", "joint_vs_sequential.png"):
    assert (out / png).stat().st_size > 1000, png


def test_fusion_deps_cli_stage(results):
  c, _ = results
  cmd = [sys.executable, "-m", "puzzle_jax", "fusion-deps", f"--config={REPO / 'configs' / 'smollm2_135m.py'}:tiny",
         f"--config.workdir={c.workdir}", f"--config.data.local_dir={c.data.local_dir}"]
  out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
  assert out.returncode == 0, out.stderr[-2000:]
  doc = json.loads((pathlib.Path(c.workdir) / "fusion" / "deps.json").read_text())
  dep = np.array(doc["dep"], dtype=float)
  assert doc["window"] == [0, 1, 2, 3] and dep.shape == (4, 4)
  upper = dep[np.triu_indices(4, 1)]
  assert np.isfinite(upper).all() and (upper >= 0).all() and (upper <= 2).all()
  assert (pathlib.Path(c.workdir) / "fusion" / "deps.png").stat().st_size > 1000
  assert doc["fusable_ffn_runs"] == []  # the parent keeps attention everywhere


def test_fusion_notebook_executes(results):
  import nbclient
  import nbformat
  c, _ = results
  nb = nbformat.read(REPO / "notebooks" / "02_fusion.ipynb", as_version=4)
  os.environ.update({"PJ_WORKDIR": c.workdir, "PJ_CONFIG_ARG": "tiny", "PJ_REPO": str(REPO)})
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(REPO / "notebooks")}})
  client.execute()
  text = "".join(o.get("text", "") for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", []))
  assert "fused vs parallel members" in text and "vLLM loader check: ok" in text
  assert sum("image/png" in o.get("data", {}) for cell in nb.cells for o in cell.get("outputs", [])) == 1
