"""The multi-device benchmark's --small run on the 8 fake CPU devices (conftest): every row's
n-device result matches one device, and the table has its three sections."""

import jax

from benchmarks import multi_gpu


def test_small_run_checks_pass_in_every_section(tmp_path):
  assert len(jax.devices()) == 8, "conftest sets 8 fake CPU devices"
  out = multi_gpu.main(["--small", "--out", str(tmp_path / "m.json")])
  rows = out["rows"]
  assert {r["what"] for r in rows} == {"bld", "gkd", "ffn tp"}
  assert all(r["ok"] and r["n_ms"] > 0 for r in rows), [(r["what"], r["err"]) for r in rows]
  assert out["devices"] == 8 and (tmp_path / "m.json").exists()
  for what in ("bld", "gkd", "ffn tp"):
    assert what in out["table"]
