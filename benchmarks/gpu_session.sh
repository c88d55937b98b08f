#!/usr/bin/env bash
# The GPU checks and measurements in one run, most important first, within a time budget (seconds, default 400):
# the fused block's backward (GPU tests, then the training step's speed and memory, the block alone), the other
# GPU tests, the rest of the README's GPU table (TNT-Ti/B training, TNT-S eager and compiled inference), where
# inference time goes (operators by device time).
#
#     OUT=/tmp/gpu PYTHONPATH=src benchmarks/gpu_session.sh 400
#     FROM=5 OUT=/tmp/gpu PYTHONPATH=src benchmarks/gpu_session.sh 400   # a second call: steps 5 onwards
#
# On a machine whose timm is not 1.0.x, install the wheel first (here: `pip download timm==1.0.31` into .whl/,
# then `pip install --no-index --no-deps --target /tmp/site .whl/*.whl` and PYTHONPATH=/tmp/site:src).
#
# A step that would start with too little of the budget left is skipped. Results (JSON, Markdown) are bundled in
# $OUT/results.tar.gz after every step, so a run cut short still returns what it measured; the log is $OUT/log.txt.
set -u
BUDGET=${1:-400}
FROM=${FROM:-1}
OUT=${OUT:-/tmp/tnt-gpu}
RES=$(mktemp -d)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-src} TNT_VISION_CPU_KERNELS=0
START=$SECONDS
STEP=0

step() {  # step LIMIT NEEDED COMMAND...: run COMMAND under LIMIT seconds if NEEDED seconds of the budget remain
    local limit=$1 needed=$2
    shift 2
    STEP=$((STEP + 1))
    local left=$((BUDGET - (SECONDS - START)))
    if ((STEP < FROM)); then
        return
    fi
    if ((left < needed)); then
        echo "== step $STEP skipped (${left}s left): $*"
        return
    fi
    ((limit > left)) && limit=$left
    echo "== step $STEP: $* (limit ${limit}s, ${left}s left)"
    local t0=$SECONDS
    timeout "$limit" "$@"
    echo "== exit $? after $((SECONDS - t0))s"
    tar -czf "$OUT/results.tar.gz" -C "$RES" .
}

{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
    python3 -c "import torch, triton, timm; print('torch', torch.__version__, 'triton', triton.__version__, 'timm', timm.__version__)"
    table="python3 benchmarks/perf_table.py --device cuda --batch 256 --runs 10 --warmup 3"
    tests="python3 -m pytest -v -p no:cacheprovider tests/test_kernels.py"  # -v: a line per test, even if cut
    step 240 60 $tests -k "gpu and (backward or training)"
    step 150 60 $table --models tnt_s_patch16_224 --settings bf16-train --out "$RES/train"
    step 150 50 python3 benchmarks/gpu_inner_block.py --batch 256 --dtypes bf16 --out "$RES/gpu_inner_block.json"
    step 200 60 $tests -k "gpu and not backward and not training"
    # the known failure in full (xfail hides it): is the operator in Dynamo's graph, and does Inductor launch it?
    step 90 40 $tests --runxfail -k compiled_model_on_the_gpu
    step 120 40 $table --models tnt_ti_patch16_224 tnt_b_patch16_224 --settings bf16-train --out "$RES/tib"
    step 120 40 $table --models tnt_s_patch16_224 --settings bf16-infer fp32-infer --no-memory --out "$RES/eager"
    step 90 40 python3 benchmarks/time_breakdown.py --device cuda --dtype bf16 --batch 256 --rounds 5 --ops 15
    step 200 100 $table --models tnt_s_patch16_224 --settings bf16-infer --no-memory --compile --out "$RES/compiled"
    step 150 50 python3 benchmarks/gpu_inner_block.py --batch 256 --dtypes fp32 tf32 --out "$RES/gpu_inner_block_fp32.json"
    echo "== done in $((SECONDS - START))s"
} 2>&1 | tee "$OUT/log.txt"
