#!/usr/bin/env bash
# Device-side runner for the GPU numbers in BENCHMARKS.md: `bash benchmarks/gpu_suite.sh STEP`.
# Wheels (.whl/) and the SmolLM2 GGUF in three parts (.gguf/partNN) are carried by the device tool;
# they are installed / joined under /root/pj, which survives between calls while the machine is warm.
set -uo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# JAX and torch share the GPU in the comparison benchmarks: no 75% preallocation by JAX.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
ROOT=/root/pj
SITE=$ROOT/site
GGUF=$ROOT/smollm2.gguf
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
OUT=${OUT:-/tmp/out}
mkdir -p "$ROOT/gguf" "$OUT"

if [ -d .whl ] && [ ! -f "$SITE/.done" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    && touch "$SITE/.done"
fi
export PYTHONPATH=$SITE:$PWD
for p in .gguf/part*; do [ -f "$p" ] && cp "$p" "$ROOT/gguf/"; done
if [ ! -f "$GGUF" ] && [ -f "$ROOT/gguf/part00" ] && [ -f "$ROOT/gguf/part01" ] && [ -f "$ROOT/gguf/part02" ]; then
  cat "$ROOT/gguf/part00" "$ROOT/gguf/part01" "$ROOT/gguf/part02" > "$GGUF"
  echo "$SHA  $GGUF" | sha256sum -c - || rm -f "$GGUF"
fi
echo "gguf parts: $(ls $ROOT/gguf | tr '\n' ' ')  joined: $([ -f $GGUF ] && echo yes || echo no)"
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
python3 -c "import jax, torch, transformers; print('jax', jax.__version__, jax.devices(), 'torch', torch.__version__, 'transformers', transformers.__version__)"

run() { echo "+ $*"; "$@" 2>&1 | grep -vE "^(W|I)[0-9]{4} |Warning|warn\(" ; }

case "${1:-}" in
  a)  # BLD speed (vmap vs sequential, MFU at 8B shapes, SmolLM2 step) and cost-model fidelity
    run timeout 330 python3 benchmarks/bld.py --size h100 --out "$OUT/bld.json"
    run timeout 230 python3 benchmarks/cost_fidelity.py --out "$OUT/fidelity.json"
    ;;
  *) echo "usage: $0 a|b|c"; exit 2 ;;
esac
