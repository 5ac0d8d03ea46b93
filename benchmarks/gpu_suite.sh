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
    run timeout 300 python3 -m puzzle_jax.serving measure --parent $ROOT/wd/export/parent --child $ROOT/wd/export/child \
      --out "$OUT/h100_measure.json"
    run timeout 230 python3 benchmarks/inference.py --device-size h100 --model smollm2 --gguf "$GGUF" --out "$OUT/infer_smollm2.json"
    ;;
  e)  # fast inference at 8B shapes and on an 80-layer child; cost-model fidelity
    run timeout 150 python3 benchmarks/inference.py --device-size h100 --model 8b-random --out "$OUT/infer_8b.json"
    run timeout 170 python3 benchmarks/inference.py --device-size h100 --model child-random --variants scan --compile-80 --out "$OUT/infer_child.json"
    run timeout 250 python3 benchmarks/cost_fidelity.py --out "$OUT/fidelity.json"
    ;;
  gkd)  # GKD step tokens/s (SmolLM2 child) and MFU (Llama-3.2-1B shapes), teacher corpus >= 10M tokens
    if [ -f "$GGUF" ]; then G="--gguf $GGUF"; else G=""; fi
    run timeout 420 python3 benchmarks/distill.py $G --out "$OUT/distill.json"
    ;;
  f)  # fresh machine, no GGUF: transformers comparison on SmolLM2 shapes, fidelity, 80-layer compile
    run timeout 170 python3 benchmarks/inference.py --device-size h100 --model smollm2-random --variants unrolled \
      --out "$OUT/infer_smollm2_hf.json"
    run timeout 200 python3 benchmarks/cost_fidelity.py --out "$OUT/fidelity.json"
    run timeout 200 python3 benchmarks/inference.py --device-size h100 --model child-random --variants unrolled \
      --compile-80 --out "$OUT/infer_child.json"
    ;;
  g)  # PyTorch per-variant cost table on the H100 (the MIP's serving-stack costs); 80-layer compile time
    run timeout 240 python3 -m puzzle_jax.serving costs --arch-from benchmarks/data/smollm2_parent \
      --keys attn/gqa_kv3,attn/gqa_kv1,attn/linear,attn/noop,ffn/swiglu_1536,ffn/swiglu_768,ffn/swiglu_384,ffn/linear,ffn/noop \
      --batch 4 --prompt-len 128 --gen-len 64 --out "$OUT/h100_costs_torch.json"
    run timeout 200 python3 -c "import json; from benchmarks import inference as I; r = I.compile_80(False); print(json.dumps(r)); open('$OUT/compile80.json', 'w').write(json.dumps(r))"
    ;;
  h)  # the MIP child chosen from the torch cost table (step g) vs its parent, serving harness
    run python3 benchmarks/export_random.py benchmarks/data/smollm2_parent $ROOT/rp
    run python3 benchmarks/export_random.py benchmarks/data/torchcost_child $ROOT/rc
    run timeout 300 python3 -m puzzle_jax.serving measure --parent $ROOT/rp --child $ROOT/rc --requests 16 \
      --out "$OUT/h100_measure_torchcost.json"
    ;;
  lm_eval)  # issue 23: the six-task lm-eval table, parent (and WORKDIR/child if step c left one): JAX path vs lm-eval hf
    CHILD=""; [ -f $ROOT/wd/child/arch.json ] && CHILD="--child $ROOT/wd/child"
    run timeout 400 python3 benchmarks/lm_eval_table.py --parent "$GGUF" --tokenizer "$GGUF" $CHILD \
      --batch-size 64 --out "$OUT/lm_eval_table.json"
    ;;
  moe)  # gpt-oss-puzzle: MoE layer at gpt-oss-20b shapes (JAX vs transformers), long-context decode parent vs child
    run timeout 240 python3 benchmarks/moe_layer.py
    run timeout 330 python3 benchmarks/gpt_oss_decode.py --layers 8 --contexts 8192 32768
    ;;
  k)  # 8B-shaped parent vs the MIP's child from H100 torch costs (random weights); SmolLM2 1.5x child
    KEYS=$(python3 benchmarks/puzzle8b.py keys --parent benchmarks/data/llama8b_parent)
    run timeout 200 python3 -m puzzle_jax.serving costs --arch-from benchmarks/data/llama8b_parent --keys "$KEYS" \
      --batch 64 --prompt-len 512 --gen-len 128 --out "$OUT/h100_costs_torch_8b.json"
    run python3 benchmarks/puzzle8b.py select --parent benchmarks/data/llama8b_parent \
      --scores benchmarks/data/llama8b_proxy_scores.json --costs "$OUT/h100_costs_torch_8b.json" --target 1.5 \
      --out "$OUT/puzzle8b"
    run timeout 200 python3 -m puzzle_jax.serving measure --parent benchmarks/data/llama8b_parent \
      --child "$OUT/puzzle8b/child" --random-weights --decode-batches 1,64 --prefill-grid 4x1024 \
      --out "$OUT/h100_measure_8b.json"
    run timeout 150 python3 -m puzzle_jax.serving measure --parent benchmarks/data/smollm2_parent \
      --child benchmarks/data/torchcost_child15 --random-weights --out "$OUT/h100_measure_child15.json"
    ;;
  decode)  # batch-1 decode kernels (BENCHMARKS.md "Decode kernels"): end to end per implementation,
           # then the persistent kernel's per-layer time and timeline; KNOBS: extra decode_profile specs
    run timeout 330 python3 benchmarks/decode_profile.py --model smollm2 --flags default --profile --timeout 320 \
      --runs "${RUNS:-10}" --impls "persistent,pallas,xla${KNOBS:+,$KNOBS}" --out "$OUT/h200_decode.json"
    run timeout 200 python3 benchmarks/segment_profile.py --layers 30 --timeline --variants full \
      --out "$OUT/h200_timeline.json"
    ;;
  infer)  # JAX inference in every layout (BENCHMARKS.md "Inference"): SmolLM2 shapes vs transformers, then
          # Llama-3.1-8B shapes at batch 1 and 64 next to the PyTorch serving runner on the same GPU
    run timeout 300 python3 benchmarks/inference.py --device-size h100 --model smollm2-random \
      --variants default,scan,unrolled --out "$OUT/h200_infer_smollm2.json"
    run timeout 400 python3 benchmarks/inference.py --device-size h100 --model 8b-random \
      --variants default,scan,unrolled --serving --out "$OUT/h200_infer_8b.json"
    ;;
  fusion)  # issue 24: k sequential FFNs vs one fused FFN, hidden 576/4096/8192, batch 1/64, with the cost model
    run timeout 420 python3 benchmarks/fusion_ffn.py --out "$OUT/fusion_ffn.json"
    ;;
  fusion2)  # issue 24 end to end: SmolLM2 with attention removed in layers 12-19, unfused vs two fused runs
    # of 4 (253B layout), serving harness; prediction from the torch cost table (--check-whole: fused arch)
    run timeout 200 python3 -m puzzle_jax.harness costs --arch-from benchmarks/data/fusion_fused \
      --keys attn/gqa_kv3,attn/noop,ffn/swiglu_1536,ffn/swiglu_6144,ffn/noop --batch 4 --prompt-len 128 \
      --gen-len 64 --check-whole --out "$OUT/fusion_costs_torch.json"
    run python3 -c "import json; from puzzle_jax.core import hf_config; from puzzle_jax.search import costs; t = costs.load_cost_table('$OUT/fusion_costs_torch.json'); p = {n: costs.predicted_totals(hf_config.arch_from_hf(json.load(open(f'benchmarks/data/fusion_{n}/config.json'))), t)['decode_s'] for n in ('unfused', 'fused')}; print('predicted decode speedup fused/unfused', p['unfused'] / p['fused'], p)"
    run timeout 300 python3 -m puzzle_jax.harness measure --parent benchmarks/data/fusion_unfused \
      --child benchmarks/data/fusion_fused --random-weights --out "$OUT/fusion_measure.json"
    ;;
  multi)  # issue 26: BLD (candidate axis) and GKD (data + FSDP) steps, TP fused FFN: every visible GPU vs one,
    # each row checked against the 1-device result before it is timed (run on nvidia-h200-x2)
    run timeout 300 python3 benchmarks/multi_gpu.py --out "$OUT/multi_gpu.json"
    ;;
  *) echo "usage: $0 a|c|d|e|f|g|h|k|decode|infer|fusion|fusion2|multi"; exit 2 ;;
esac
