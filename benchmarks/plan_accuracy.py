r"""`plan`'s estimates against the stage times a real run records, on this machine.

  python benchmarks/plan_accuracy.py --config configs/smollm2_135m.py:tiny --workdir /tmp/plan_tiny
  python benchmarks/plan_accuracy.py --config configs/smollm2_135m.py --workdir /tmp/plan_cpu

Plans on a fresh workdir, runs the search there, then prints estimate vs measured per stage (the
`seconds` of each stage's record) and the ratio; writes plan_accuracy.json into the workdir.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from ml_collections import config_flags

REPO = pathlib.Path(__file__).resolve().parents[1]


def _config(spec: str, workdir: str, overrides: list[str]):
  from absl import flags
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=False)
  fv([sys.argv[0], f"--config={spec}", *overrides])
  c = fv.config
  c.workdir = workdir
  c.data.local_dir = str(REPO / "data" / "wikitext2")
  return c


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", default=f"{REPO / 'configs' / 'smollm2_135m.py'}:tiny")
  ap.add_argument("--workdir", required=True, help="a directory that does not exist yet")
  ap.add_argument("overrides", nargs="*", help="--config.key=value ...")
  args = ap.parse_args()
  from puzzle_jax import artifacts, stages
  root = pathlib.Path(args.workdir)
  if root.exists():
    sys.exit(f"{root} exists: plan_accuracy needs a fresh workdir to time every stage")
  config = _config(args.config, str(root), args.overrides)
  rows = stages.plan(config)
  stages.run(config)
  out, worst = [], 1.0
  print(f"\n{'stage':<10} {'estimate':>10} {'measured':>10} {'ratio':>7}")
  for r in rows:
    measured = json.loads(stages.Paths(root).record(r["stage"]).read_text())["seconds"]
    ratio = r["est_s"] / max(measured, 1e-9)
    worst = max(worst, ratio, 1 / ratio) if measured > 1.0 else worst  # sub-second stages: noise
    out.append({**r, "measured_s": measured, "ratio": ratio})
    print(f"{r['stage']:<10} {r['est_s']:>9.1f}s {measured:>9.1f}s {ratio:>7.2f}")
  total_est, total = sum(r["est_s"] for r in out), sum(r["measured_s"] for r in out)
  print(f"{'total':<10} {total_est:>9.1f}s {total:>9.1f}s {total_est / total:>7.2f}")
  print(f"worst factor over stages of > 1 s: {worst:.2f}x")
  artifacts.write_json(root / "plan_accuracy.json", {"rows": out, "worst_factor": worst})


if __name__ == "__main__":
  main()
