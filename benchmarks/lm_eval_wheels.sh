#!/usr/bin/env bash
# Wheels the H200 image lacks for benchmarks/lm_eval_table.py (lm-eval and what its import and
# `simple_evaluate` on the offline tasks pull in; the image already has pyarrow, pandas, xxhash,
# fsspec, huggingface-hub, sacrebleu, scikit-learn, transformers, torch). Run here, in the repo root;
# gpu_suite.sh installs everything in .whl/ at the start of each step. All four are pure Python.
set -euo pipefail
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> "$(git rev-parse --git-path info/exclude)"
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl \
  lm_eval==0.4.13 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
ls -la .whl
