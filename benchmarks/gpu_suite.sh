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

if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
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
  c)  # forward parity+speed with real weights, then the whole search on the GPU (resumable)
    run timeout 120 python3 benchmarks/forward.py --batch 16 --seq 1024 --dtype bfloat16 --gguf "$GGUF" --out "$OUT/forward.json"
    run timeout 420 python3 -m puzzle_jax run --config configs/smollm2_135m.py:gpu --config.parent.path="$GGUF" \
      --config.workdir=$ROOT/wd --config.bld.steps=200
    cp $ROOT/wd/mip/solution.json $ROOT/wd/report/report.json "$OUT/" 2>/dev/null
    cp $ROOT/wd/report/pareto_kl.png $ROOT/wd/mip/choices.png "$OUT/" 2>/dev/null
    ;;
  d)  # export parent + child, PyTorch harness (parent vs child, request-level), fast inference path
    run timeout 60 python3 -m puzzle_jax export --config configs/smollm2_135m.py:gpu --config.parent.path="$GGUF" \
      --config.workdir=$ROOT/wd --config.export.checkpoint=parent
    run timeout 60 python3 -m puzzle_jax export --config configs/smollm2_135m.py:gpu --config.parent.path="$GGUF" \
      --config.workdir=$ROOT/wd --config.export.checkpoint=child
    run timeout 300 python3 -m puzzle_jax.harness measure --parent $ROOT/wd/export/parent --child $ROOT/wd/export/child \
      --out "$OUT/h100_measure.json"
    run timeout 230 python3 benchmarks/inference.py --device-size h100 --model smollm2 --gguf "$GGUF" --out "$OUT/infer_smollm2.json"
    ;;
  e)  # fast inference at 8B shapes and on an 80-layer child; cost-model fidelity
    run timeout 150 python3 benchmarks/inference.py --device-size h100 --model 8b-random --out "$OUT/infer_8b.json"
    run timeout 170 python3 benchmarks/inference.py --device-size h100 --model child-random --variants scan --compile-80 --out "$OUT/infer_child.json"
    run timeout 250 python3 benchmarks/cost_fidelity.py --out "$OUT/fidelity.json"
    ;;
  f)  # fresh machine, no GGUF: transformers comparison on SmolLM2 shapes, fidelity, 80-layer compile
    run timeout 170 python3 benchmarks/inference.py --device-size h100 --model smollm2-random --variants unrolled \
      --out "$OUT/infer_smollm2_hf.json"
    run timeout 200 python3 benchmarks/cost_fidelity.py --out "$OUT/fidelity.json"
    run timeout 200 python3 benchmarks/inference.py --device-size h100 --model child-random --variants unrolled \
      --compile-80 --out "$OUT/infer_child.json"
    ;;
  g)  # PyTorch per-variant cost table on the H100 (the MIP's serving-stack costs); 80-layer compile time
    run timeout 240 python3 -m puzzle_jax.harness costs --arch-from benchmarks/data/smollm2_parent \
      --keys attn/gqa_kv3,attn/gqa_kv1,attn/linear,attn/noop,ffn/swiglu_1536,ffn/swiglu_768,ffn/swiglu_384,ffn/linear,ffn/noop \
      --batch 4 --prompt-len 128 --gen-len 64 --out "$OUT/h100_costs_torch.json"
    run timeout 200 python3 -c "import json; from benchmarks import inference as I; r = I.compile_80(False); print(json.dumps(r)); open('$OUT/compile80.json', 'w').write(json.dumps(r))"
    ;;
  h)  # the MIP child chosen from the torch cost table (step g) vs its parent, serving harness
    run python3 benchmarks/export_random.py benchmarks/data/smollm2_parent $ROOT/rp
    run python3 benchmarks/export_random.py benchmarks/data/torchcost_child $ROOT/rc
    run timeout 300 python3 -m puzzle_jax.harness measure --parent $ROOT/rp --child $ROOT/rc --requests 16 \
      --out "$OUT/h100_measure_torchcost.json"
    ;;
  moe)  # gpt-oss-puzzle: MoE layer at gpt-oss-20b shapes (JAX vs transformers), long-context decode parent vs child
    run timeout 240 python3 benchmarks/moe_layer.py
    run timeout 330 python3 benchmarks/gpt_oss_decode.py --layers 8 --contexts 8192 32768
    ;;
  i)  # batch-1 decode: fused Pallas kernels vs XLA, XLA flag sets (CUDA-graph while loops), kernels per token
    run timeout 170 python3 benchmarks/decode_profile.py --model smollm2 --impls xla,pallas --flags default \
      --profile --timeout 160 --out "$OUT/decode_profile_smollm2.json"
    run timeout 200 python3 benchmarks/decode_profile.py --model 8b --impls xla,pallas --flags default --runs 5 \
      --timeout 190 --out "$OUT/decode_profile_8b.json"
    run timeout 200 python3 benchmarks/inference.py --device-size h100 --model smollm2-random --variants scan,unrolled \
      --skip-hf --out "$OUT/infer_smollm2_random.json"
    ;;
  j)  # batch-1 fused-kernel launch knobs (SmolLM2 shapes)
    run timeout 420 python3 benchmarks/decode_profile.py --model smollm2 --flags default --profile --timeout 410 \
      --impls xla,pallas,pallas/MATMUL_WARPS=4,pallas/MAX_PROGRAMS=132,pallas/CHUNK_S=32 \
      --out "$OUT/decode_knobs_smollm2.json"
    ;;
  k)  # issue 5: 8B-shaped parent vs the MIP's child from H100 torch costs (random weights); SmolLM2 1.5x child
    KEYS=$(python3 benchmarks/puzzle8b.py keys --parent benchmarks/data/llama8b_parent)
    run timeout 200 python3 -m puzzle_jax.harness costs --arch-from benchmarks/data/llama8b_parent --keys "$KEYS" \
      --batch 64 --prompt-len 512 --gen-len 128 --out "$OUT/h100_costs_torch_8b.json"
    run python3 benchmarks/puzzle8b.py select --parent benchmarks/data/llama8b_parent \
      --scores benchmarks/data/llama8b_proxy_scores.json --costs "$OUT/h100_costs_torch_8b.json" --target 1.5 \
      --out "$OUT/puzzle8b"
    run timeout 200 python3 -m puzzle_jax.harness measure --parent benchmarks/data/llama8b_parent \
      --child "$OUT/puzzle8b/child" --random-weights --decode-batches 1,64 --prefill-grid 4x1024 \
      --out "$OUT/h100_measure_8b.json"
    run timeout 150 python3 -m puzzle_jax.harness measure --parent benchmarks/data/smollm2_parent \
      --child benchmarks/data/torchcost_child15 --random-weights --out "$OUT/h100_measure_child15.json"
    ;;
  l)  # fast path with the fused batch-1 kernels: profile, transformers comparison (SmolLM2 shapes), child
    run timeout 200 python3 benchmarks/decode_profile.py --model smollm2 --flags default --profile --timeout 190 \
      --impls xla,pallas --out "$OUT/decode_profile_final.json"
    run timeout 200 python3 benchmarks/inference.py --device-size h100 --model smollm2-random --variants unrolled \
      --out "$OUT/infer_smollm2_hf.json"
    run timeout 200 python3 benchmarks/inference.py --device-size h100 --model child-random --variants unrolled \
      --out "$OUT/infer_child.json"
    ;;
  m)  # heterogeneous child vs its parent at batch 1, fused kernels and XLA, same run
    run timeout 150 python3 benchmarks/decode_profile.py --model smollm2 --flags default --impls xla,pallas \
      --timeout 140 --out "$OUT/decode_parent.json"
    run timeout 150 python3 benchmarks/decode_profile.py --model child --flags default --impls xla,pallas \
      --timeout 140 --out "$OUT/decode_child.json"
    ;;
  n)  # session 3 (H200): grid-barrier probe, persistent segment kernel vs five kernels vs XLA, phase costs
    run timeout 200 python3 benchmarks/grid_sync.py --n 120 --d 1024 --modes flags,plain,none --profile \
      --out "$OUT/h200_grid_sync.json"
    run timeout 250 python3 benchmarks/decode_profile.py --model smollm2 --impls persistent,pallas,xla --flags default \
      --profile --timeout 240 --out "$OUT/h200_decode_persistent.json"
    run timeout 280 python3 benchmarks/segment_profile.py --out "$OUT/h200_segment_profile.json"
    ;;
  o)  # session 4 (H200): three-phase persistent kernel (atomic split-K residual) vs five kernels vs XLA
    run timeout 150 python3 benchmarks/grid_sync.py --n 120 --d 1024 --modes counter,flags --profile \
      --out "$OUT/h200_grid_sync_counter.json"
    run timeout 300 python3 benchmarks/decode_profile.py --model smollm2 --flags default --profile --timeout 290 \
      --impls persistent,persistent/BARRIER=flags,persistent/PERSISTENT_WARPS=8,pallas,xla \
      --out "$OUT/h200_decode_persistent3.json"
    run timeout 200 python3 benchmarks/segment_profile.py --out "$OUT/h200_segment_profile3.json"
    ;;
  p)  # session 4: phase costs of the three-phase kernel under knobs (FFN rows/tiles, warps, programs)
    run timeout 240 python3 benchmarks/segment_profile.py --out "$OUT/h200_segment_profile4.json"
    ;;
  q)  # session 4: end to end, one program per SM vs two / three, five kernels, XLA (profiled)
    run timeout 120 python3 benchmarks/segment_profile.py --out "$OUT/h200_segment_programs.json" \
      --variants "full,full 264 programs,full 264 programs 8 warps,full 396 programs,ffn only,ffn only 264 programs,attention+o_proj only,attention+o_proj only 264 programs,barriers only"
    run timeout 280 python3 benchmarks/decode_profile.py --model smollm2 --flags default --profile --timeout 270 \
      --impls persistent,persistent/PERSISTENT_PROGRAMS=264,persistent/PERSISTENT_PROGRAMS=396,pallas,xla \
      --out "$OUT/h200_decode_persistent_final.json"
    ;;
  r)  # session 5: every data load of a phase before its first CTA barrier; what HBM weight streaming costs
    run timeout 200 python3 benchmarks/segment_profile.py --out "$OUT/h200_segment_s5.json" \
      --variants "full,barriers only,qkv only,attention+o_proj only,ffn only,full layer-0 weights,barriers layer-0,full 8 warps"
    run timeout 250 python3 benchmarks/decode_profile.py --model smollm2 --flags default --profile --timeout 240 \
      --impls persistent,pallas,xla --out "$OUT/h200_decode_s5.json"
    ;;
  s)  # session 5: the persistent kernel's per-phase timeline (SM clocks at every grid barrier)
    run timeout 200 python3 benchmarks/segment_profile.py --timeline --variants "${VARIANTS:-full}" \
      --out "$OUT/h200_timeline_s5${TAG:-}.json"
    ;;
  t)  # session 5: timelines of the knob settings, then end to end
    run timeout 200 python3 benchmarks/segment_profile.py --timeline --out "$OUT/h200_timeline_s5${TAG:-}.json" \
      --variants "${VARIANTS:-full,full 8 warps,full 8 warps attn 256}"  # run when "full" was 4 warps, 128 slots
    run timeout 250 python3 benchmarks/decode_profile.py --model smollm2 --flags default --profile --timeout 240 \
      --impls "${IMPLS:-persistent,persistent/PERSISTENT_WARPS=8/PERSISTENT_ATTN_BLOCK=256,pallas}" \
      --out "$OUT/h200_decode_s5${TAG:-}.json"
    ;;
  v)  # session 5: the attention's cache block loaded during the q/k/v phase vs at the barrier
    run timeout 200 python3 benchmarks/segment_profile.py --timeline --out "$OUT/h200_timeline_s5_early.json" \
      --variants "full,full kv at barrier,full 4 warps attn 128"
    run timeout 250 python3 benchmarks/decode_profile.py --model smollm2 --flags default --profile --timeout 240 \
      --impls "persistent,persistent/PERSISTENT_EARLY_KV=0,pallas" --out "$OUT/h200_decode_s5_early.json"
    ;;
  u)  # session 5: end to end with the new defaults (auto = persistent at batch 1) and vs transformers
    run timeout 200 python3 benchmarks/decode_profile.py --model smollm2 --flags default --profile --timeout 190 \
      --impls persistent,pallas,xla --out "$OUT/h200_decode_s5_final.json"
    run timeout 330 python3 benchmarks/inference.py --device-size h100 --model smollm2-random --variants scan,unrolled \
      --out "$OUT/h200_infer_smollm2_s5.json"
    [ -n "${CHILD:-}" ] && run timeout 150 python3 benchmarks/decode_profile.py --model child --flags default \
      --impls persistent,pallas,xla --timeout 140 --out "$OUT/h200_decode_child_s5.json"
    ;;
  w)  # session 6: tagged q/k/v (no barrier before attention), 12-row FFN items, cached K/V read below
      # the index; each turned back, then all (session 5's kernel); end to end; the auto path vs transformers
    run timeout 200 python3 benchmarks/segment_profile.py --timeline --out "$OUT/h200_timeline_s6${TAG:-}.json" \
      --variants "${VARIANTS:-full,full s5 defaults,full qkv barrier,full ffn 16 rows,full kv whole cache}"
    run timeout 200 python3 benchmarks/decode_profile.py --model smollm2 --flags default --profile --timeout 190 \
      --impls "${IMPLS:-persistent,persistent/PERSISTENT_QKV_TAGS=0/PERSISTENT_FFN_ROWS=16/KV_UPTO_INDEX=0,pallas,pallas/KV_UPTO_INDEX=0,xla}" \
      --out "$OUT/h200_decode_s6${TAG:-}.json"
    [ -n "${INFER:-}" ] && run timeout 190 python3 benchmarks/inference.py --device-size h100 --model smollm2-random \
      --variants scan --out "$OUT/h200_infer_smollm2_s6.json"
    ;;
  x)  # session 7: L2 prefetch of the next phase's weights by the programs idle in a phase (default: every
      # phase), off, attention only; 16 warps; the all-L2 bound (layer-0 weights); end to end
      # (FLAGS=default,graphs: also CUDA graphs); INFER=1: the auto path vs transformers
    run timeout 230 python3 benchmarks/segment_profile.py --timeline --out "$OUT/h200_timeline_s7${TAG:-}.json" \
      --variants "${VARIANTS:-full,full no idle prefetch,full idle prefetch ffn,full 16 warps,full layer-0 weights}"
    run timeout 330 python3 benchmarks/decode_profile.py --model smollm2 --flags "${FLAGS:-default}" --profile \
      --timeout 320 --impls "${IMPLS:-persistent,persistent/PERSISTENT_IDLE_PREFETCH=,persistent/PERSISTENT_IDLE_PREFETCH=ffn,xla}" \
      --out "$OUT/h200_decode_s7${TAG:-}.json"
    [ -n "${INFER:-}" ] && run timeout 190 python3 benchmarks/inference.py --device-size h100 --model smollm2-random \
      --variants scan --out "$OUT/h200_infer_smollm2_s7.json"
    ;;
  y)  # session 7: where "auto" should start running persistent kernels (infer.PERSISTENT_MIN_RUN), on the
      # heterogeneous child (runs of 1-5 identical blocks): 12 (none of its runs), 4, 2, 1
    run timeout 280 python3 benchmarks/decode_profile.py --model child --flags default --timeout 270 \
      --impls "${IMPLS:-auto,auto/PERSISTENT_MIN_RUN=4,auto/PERSISTENT_MIN_RUN=2,auto/PERSISTENT_MIN_RUN=1}" \
      --out "$OUT/h200_decode_s7_minrun.json"
    ;;
  z)  # session 8: one decode step's kernels in order (the glue around the persistent kernel), per
      # implementation spec (IMPLS); MODEL=child for the heterogeneous child; INFER=1: the auto path;
      # S: the session in the file names (default s8)
    run timeout 330 python3 benchmarks/decode_profile.py --model "${MODEL:-smollm2}" --flags default --profile \
      --timeout 320 --runs "${RUNS:-10}" --impls "${IMPLS:-persistent}" --out "$OUT/h200_decode_${S:-s8}${TAG:-}.json"
    [ -n "${INFER:-}" ] && run timeout 190 python3 benchmarks/inference.py --device-size h100 --model smollm2-random \
      --variants scan --out "$OUT/h200_infer_smollm2_${S:-s8}${TAG:-}.json"
    ;;
  *) echo "usage: $0 a|b|c|d|e|f|g|h|i|j|k|l|m|n|o|p|q|r|s|t|u|v|w|x|y|z"; exit 2 ;;
esac
