"""End to end on the real parent at tiny settings: the CLI stages, their artifacts, the report,
the MIP child against both baselines, export of the child, and the quickstart notebook."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from puzzle_jax import io, stages
from puzzle_jax.core.arch import spec_from_key

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_stage_artifacts(run_dir):
  paths = stages.Paths(run_dir)
  for p in (paths.parent / "arch.json", paths.library / "library.json", paths.scores, paths.costs,
            paths.solution, paths.child / "arch.json", paths.report):
    assert p.exists(), p
  for png in (paths.bld / "losses.png", paths.scores.with_name("heatmap.png"),
              paths.solution.with_name("pareto.png"), paths.solution.with_name("choices.png"),
              paths.report.with_name("pareto_kl.png")):
    assert png.stat().st_size > 1000, png


def test_solution_meets_target_and_child_matches(run_dir):
  paths = stages.Paths(run_dir)
  sol = json.loads(paths.solution.read_text())
  assert sol["status"] == "optimal"
  assert sol["predicted_decode_speedup"] >= 1.2 - 1e-9  # tiny config's target
  arch, _ = io.load_checkpoint(paths.child)
  assert [[b.attn, b.ffn] for b in arch.blocks] == [[spec_from_key(a), spec_from_key(f)]
                                                    for a, f in sol["choices"]]
  assert sol["choices"][0][0] == "attn/gqa_kv3"  # keep_first_attn


def test_report_mip_beats_baselines(run_dir):
  report = json.loads((stages.Paths(run_dir).report).read_text())
  at = report["at_target"]
  assert report["parent"]["ppl"] > 1
  for name in ("uniform", "shortgpt"):
    if "kl" in at[name]:
      assert at[name]["predicted_decode_speedup"] >= 1.2 - 1e-9
      assert at["mip"]["kl"] <= at[name]["kl"] + 1e-6, (name, at["mip"]["kl"], at[name]["kl"])
  assert 0 < at["mip"]["kl"] < 10 and 0 < at["mip"]["top1"] <= 1


def test_rerun_skips_and_cli_generate_export(run_dir):
  args = [sys.executable, "-m", "puzzle_jax"]
  cfg = [f"--config={REPO / 'configs' / 'smollm2_135m.py'}:tiny", f"--config.workdir={run_dir}",
         f"--config.data.local_dir={REPO / 'data' / 'wikitext2'}", "--config.costs.backend=analytic"]
  out = subprocess.run(args + ["bld"] + cfg, capture_output=True, text=True, cwd=REPO, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "exists, skipping" in out.stdout
  out = subprocess.run(args + ["generate"] + cfg + ["--config.generate.checkpoint=child"],
                       capture_output=True, text=True, cwd=REPO, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "[child] What is the capital of France?" in out.stdout
  out = subprocess.run(args + ["export"] + cfg + ["--config.export.dtype=float32"], capture_output=True,
                       text=True, cwd=REPO, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  exported = run_dir / "export" / "child"
  arch, params = io.load_pretrained(exported)
  arch2, params2 = io.load_checkpoint(run_dir / "child")
  assert arch == arch2
  np.testing.assert_array_equal(params["model"]["norm"]["weight"], params2["model"]["norm"]["weight"])


def test_quickstart_notebook_executes(run_dir):
  import os
  import nbclient
  import nbformat
  nb = nbformat.read(REPO / "notebooks" / "01_quickstart.ipynb", as_version=4)
  env = {"PJ_WORKDIR": str(run_dir), "PJ_CONFIG_ARG": "tiny", "PJ_REPO": str(REPO), "PJ_COSTS_BACKEND": "analytic"}
  os.environ.update(env)
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(REPO / "notebooks")}})
  client.execute()
  outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
  assert "total params" in outputs and "parent: ppl" in outputs
  images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
  assert len(images) == 3
