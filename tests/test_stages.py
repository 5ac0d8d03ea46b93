"""Stages you can trust, on the real `:tiny` search: records refuse stale artifacts and name the keys,
--rerun_from equals a fresh run, a run killed in every stage resumes to the uninterrupted result,
corrupt artifacts are named with the command that rebuilds them, nothing of the user's is touched."""

import json
import pathlib
import re
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import REPO, tiny_config
from puzzle_jax import artifacts, stages
from puzzle_jax.search import library as library_lib

CLI = [sys.executable, "-m", "puzzle_jax"]


def _cli_config(root) -> list[str]:
  return [f"--config={REPO / 'configs' / 'smollm2_135m.py'}:tiny", f"--config.workdir={root}",
          f"--config.data.local_dir={REPO / 'data' / 'wikitext2'}", "--config.costs.backend=analytic"]


def _set(config, key: str, value) -> None:
  *path, last = key.split(".")
  node = config
  for part in path:
    node = node[part]
  node[last] = value


def _copy(run_dir, dst: pathlib.Path) -> pathlib.Path:
  shutil.copytree(run_dir, dst, ignore=shutil.ignore_patterns("export", "superseded"))
  return dst


def _assert_same_params(a, b) -> None:
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_finished_run_is_done_and_records_fingerprints(run_dir):
  assert [s.state for s in stages.status(tiny_config(run_dir))] == ["done"] * len(stages.PIPELINE)
  report = json.loads(stages.Paths(run_dir).report.read_text())
  records = {s: json.loads(stages.Paths(run_dir).record(s).read_text()) for s in report["fingerprints"]}
  assert list(records) == stages._upstream("evaluate")  # every stage the report rests on
  assert set(records) >= {"import", "bld", "score", "costs", "mip", "gkd"}
  assert all(report["fingerprints"][s] == r["fingerprint"] and r["status"] == "done" for s, r in records.items())
  assert records["bld"]["config"]["bld.steps"] == 4 and records["bld"]["version"] == stages.VERSION


@pytest.mark.parametrize("key,value,stage", [("bld.steps", 5, "bld"), ("library.ffn_fractions", (0.25,), "bld"),
                                             ("mip.target_decode_speedup", 1.1, "mip"),
                                             ("parent.max_layers", 3, "import")])
def test_changed_key_is_refused_and_named(run_dir, key, value, stage):
  c = tiny_config(run_dir)
  _set(c, key, value)
  with pytest.raises(stages.UserError) as e:
    stages.check(c)
  msg = str(e.value)
  assert f"stage `{stage}`" in msg and key in msg and f"--rerun_from={stage}" in msg, msg
  assert [s.state for s in stages.status(tiny_config(run_dir))] == ["done"] * len(stages.PIPELINE)


def test_interrupted_bld_refuses_a_changed_schedule(run_dir, tmp_path):
  wd = tmp_path / "wd"
  wd.mkdir()
  (wd / "records").mkdir()
  rec = json.loads(stages.Paths(run_dir).record("bld").read_text())
  (wd / "records" / "bld.json").write_text(json.dumps({**rec, "status": "running"}))
  for done in ("import", "upcycle"):
    shutil.copy(stages.Paths(run_dir).record(done), wd / "records" / f"{done}.json")
  c = tiny_config(wd)
  assert [s.state for s in stages.status(c)][:3] == ["resume"] * 3  # no artifacts: all rerun
  c.bld.lr = 1e-3
  with pytest.raises(stages.UserError, match=r"bld\.lr: 0\.0003 -> 0\.001"):
    stages.check(c)


def test_rerun_from_equals_a_fresh_run(run_dir, tmp_path):
  wd = _copy(run_dir, tmp_path / "wd")
  c = tiny_config(wd)
  c.bld.steps = 5
  stages.run(c, until="mip", rerun_from="bld")
  fresh = tiny_config(tmp_path / "fresh")
  fresh.bld.steps = 5
  stages.run(fresh, until="mip")
  a, b = (library_lib.load_library(stages.Paths(d).library) for d in (wd, tmp_path / "fresh"))
  _assert_same_params(a.params_by_group, b.params_by_group)
  sol = lambda d: {k: v for k, v in json.loads(stages.Paths(d).solution.read_text()).items() if k != "solve_s"}
  assert sol(wd)["choices"] == sol(tmp_path / "fresh")["choices"]
  assert sol(wd)["objective"] == sol(tmp_path / "fresh")["objective"]
  moved = list((wd / "superseded").glob("*/bld/library/library.json"))  # the old library: moved, not deleted
  assert len(moved) == 1 and json.loads(moved[0].read_text())["bld"]["steps"] == 4


def _kill_in(stage: str, root: pathlib.Path, delay_s: float) -> None:
  """Start `run`, wait until `stage` has begun, let it work `delay_s`, kill the process hard."""
  proc = subprocess.Popen(CLI + ["run"] + _cli_config(root), cwd=REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  record = stages.Paths(root).record(stage)
  deadline = time.monotonic() + 600
  while proc.poll() is None and time.monotonic() < deadline:
    if record.exists() and json.loads(record.read_text() or "{}").get("status") == "running":
      break
    time.sleep(0.05)
  time.sleep(delay_s)
  proc.kill()
  proc.wait()


def test_killed_in_every_stage_then_rerun_equals_uninterrupted(run_dir, tmp_path):
  root = tmp_path / "wd"
  rng = np.random.default_rng(0)
  for stage in ("import", "bld", "score", "mip", "realize", "evaluate"):
    _kill_in(stage, root, float(rng.uniform(0.0, 2.0)))
  out = subprocess.run(CLI + ["run"] + _cli_config(root), cwd=REPO, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  a, b = stages.Paths(root), stages.Paths(run_dir)
  _assert_same_params(library_lib.load_library(a.library).params_by_group,
                      library_lib.load_library(b.library).params_by_group)
  assert json.loads(a.solution.read_text())["choices"] == json.loads(b.solution.read_text())["choices"]
  ra, rb = (json.loads(p.report.read_text()) for p in (a, b))
  assert ra["at_target"]["mip"]["kl"] == pytest.approx(rb["at_target"]["mip"]["kl"], rel=1e-6)
  assert ra["fingerprints"] == rb["fingerprints"]


# (file, the stage that writes it, a stage that reads it), read downstream first so that moving a
# reader aside never removes a later case's file.
ARTIFACTS = [("mip/solution.json", "mip", "realize"), ("scores/scores.json", "score", "mip"),
             ("costs/costs.json", "costs", "mip"), ("bld/library/library.json", "bld", "score"),
             ("parent/arch.json", "import", "bld")]


def test_truncated_artifacts_are_named_with_their_rebuild_command(run_dir, tmp_path):
  wd = _copy(run_dir, tmp_path / "wd")
  c = tiny_config(wd)
  good = (wd / "mip" / "solution.json").read_text()
  (wd / "mip" / "solution.json").write_text("{}")  # valid JSON, no choices
  with pytest.raises(stages.UserError, match=re.escape("solution.json: lacks 'choices'")):
    stages.run(c, until="realize", rerun_from="realize")
  (wd / "mip" / "solution.json").write_text(good)
  for rel, writer, reader in ARTIFACTS:
    path = wd / rel
    good = path.read_bytes()
    path.write_bytes(good[:len(good) // 2])
    with pytest.raises(stages.UserError) as e:
      stages.run(c, until=reader, rerun_from=reader)
    msg = str(e.value)
    assert str(path) in msg and f"`{writer}` stage" in msg and f"--rerun_from={writer}" in msg, msg
    path.write_bytes(good)


def test_export_never_writes_into_a_directory_it_did_not_create(run_dir, tmp_path):
  c = tiny_config(run_dir)
  mine = tmp_path / "my_model"
  mine.mkdir()
  (mine / "config.json").write_text("{}")
  (mine / "model.safetensors").write_bytes(b"precious")
  c.export.out_dir = str(mine)
  with pytest.raises(stages.UserError, match="not written by puzzle_jax"):
    stages.export(c)
  assert sorted(p.name for p in mine.iterdir()) == ["config.json", "model.safetensors"]
  assert (mine / "model.safetensors").read_bytes() == b"precious"
  c.parent.path, c.export.out_dir = str(mine), str(mine)
  assert any("is (or holds, or lies inside) the parent" in e for e in stages.validate(c))


def test_workdir_must_be_ours(tmp_path):
  (tmp_path / "notes.txt").write_text("mine")
  with pytest.raises(stages.UserError, match="not created by puzzle_jax"):
    stages.run(tiny_config(tmp_path), until="import")
  assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_cli_config_mistakes_are_one_line_each(tmp_path):
  out = subprocess.run(CLI + ["run"] + _cli_config(tmp_path) + ["--config.score.metric=bogus", "--config.bld.steps=-5"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 2 and "Traceback" not in out.stderr
  lines = out.stderr.strip().splitlines()
  assert any("score.metric='bogus'" in l for l in lines) and any("bld.steps=-5" in l for l in lines), lines
  assert not list(tmp_path.iterdir())  # caught before any stage ran
  out = subprocess.run(CLI + ["bld"] + _cli_config(tmp_path) + ["--config.bld.stpes=3"], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 2 and "Traceback" not in out.stderr and 'Did you mean "steps"' in out.stderr


def test_plan(run_dir, tmp_path, capsys):
  rows = stages.plan(tiny_config(run_dir))
  assert [r["state"] for r in rows] == ["done"] * len(stages.PIPELINE)
  assert "everything is done" in capsys.readouterr().out
  rows = stages.plan(tiny_config(tmp_path / "fresh"))
  assert [r["state"] for r in rows] == ["todo"] * len(stages.PIPELINE)
  assert all(r["est_s"] > 0 and r["peak_gb"] > 0 for r in rows)
  assert not (tmp_path / "fresh").exists()  # planning writes nothing


def test_stage_table_is_the_one_order():
  names = [s.name for s in stages.PIPELINE]
  assert names == ["import", "upcycle", "bld", "score", "costs", "mip", "realize", "distill-data", "gkd",
                   "evaluate"]
  for s in stages.PIPELINE:  # inputs come earlier in the order
    assert all(names.index(i) < names.index(s.name) for i in s.inputs), s.name
  readme = (REPO / "README.md").read_text()
  assert " → ".join(names) in readme
  rows = re.findall(r"^\| `([a-z-]+)` \|", readme, re.M)
  assert rows[:len(names)] == names


def test_artifacts_json_helpers(tmp_path):
  p = artifacts.write_json(tmp_path / "a.json", {"x": np.float32(1.5), "y": (1, 2)})
  assert artifacts.read_json(p, required=("x",)) == {"x": 1.5, "y": [1, 2]}
  p.write_text('{"x": 1')
  with pytest.raises(artifacts.ArtifactError, match="not valid JSON"):
    artifacts.read_json(p)
  assert artifacts.diff({"a": {"b": 1}}, {"a": {"b": 2}, "c": 3}) == ["a.b: 1 -> 2", "c: '(absent)' -> 3"]


def test_distributed_switch_reaches_jax_distributed_initialize(monkeypatch, tmp_path):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  monkeypatch.setitem(stages._DIST, "done", False)
  c = tiny_config(tmp_path)
  stages.maybe_init_distributed(c)
  assert calls == []  # off by default
  c.distributed.enabled = True
  stages.maybe_init_distributed(c)
  assert calls == [{}]  # everything from the cluster environment
  monkeypatch.setitem(stages._DIST, "done", False)
  c.distributed.coordinator_address, c.distributed.num_processes, c.distributed.process_id = "10.0.0.1:1234", 2, 1
  assert stages.validate(c) == []
  stages.main_command("bogus", c)  # an unknown command initializes nothing
  stages.maybe_init_distributed(c)
  assert calls[-1] == {"coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1}
  c.distributed.num_processes = 0
  assert any("coordinator_address and num_processes together" in e for e in stages.validate(c))


def test_lm_eval_config_mistakes_are_named(tmp_path):
  c = tiny_config(tmp_path)
  assert stages.validate(c) == []
  c.lm_eval.tasks, c.lm_eval.limit, c.lm_eval.batch_size = ("piqa", "mmlu"), -1, 0
  c.lm_eval.eval_dir = str(tmp_path / "nowhere")
  errors = "\n".join(stages.validate(c))
  assert "lm_eval.tasks: ['mmlu'] are not among hellaswag" in errors
  assert "lm_eval.limit=-1" in errors and "lm_eval.batch_size=0" in errors
  assert "lm_eval.eval_dir=" in errors and "not a directory" in errors
