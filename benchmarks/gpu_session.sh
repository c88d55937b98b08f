#!/usr/bin/env bash
# The GPU checks and measurements in one run, most important first, within a time budget (seconds, default 400):
# Triton's kernels compiled for every autotuner configuration in parallel (`gpu_warm_cache.py`, in the background)
# while every GPU test runs (pytest-xdist), then the add-and-norm kernel (each fusion alone and in the model), the
# backward's tiles at TNT-Ti/B's shapes each alone, the fused block's training step (speed and memory), the block
# alone, the rest of the README's GPU table (TNT-Ti/B, TNT-S eager and compiled inference), where inference time
# goes (operators by device time), the block at fp32 and TF32, and where the host's time goes (`gpu_host.py`).
#
#     OUT=/tmp/gpu PYTHONPATH=src benchmarks/gpu_session.sh 400
#     FROM=5 OUT=/tmp/gpu PYTHONPATH=src benchmarks/gpu_session.sh 400   # a second call: steps 5 onwards
#     STEPS="1 4 8" TESTS="gpu and training" WARM="bf16" OUT=/tmp/gpu PYTHONPATH=src benchmarks/gpu_session.sh 300
#
# STEPS: the step numbers to run (default all from FROM); TESTS: the GPU tests' -k expression (default "gpu");
# WARM: the modes the compile warm-up covers (default all, see gpu_warm_cache.py --modes).
#
# Wheels in .whl/ (say timm 1.0.x where the machine's timm is another) are installed first, into /tmp/site.
#
# A step that would start with too little of the budget left is skipped. Results (JSON, Markdown) are bundled in
# $OUT/results.tar.gz after every step, so a run cut short still returns what it measured; the log is $OUT/log.txt.
set -u
BUDGET=${1:-400}
FROM=${FROM:-1}
STEPS=${STEPS:-}
TESTS=${TESTS:-gpu}
WARM=${WARM:-}
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
    if ((STEP < FROM)) || [[ -n $STEPS && " $STEPS " != *" $STEP "* ]]; then
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
    if ! python3 -c "import timm, sys; sys.exit(not timm.__version__.startswith('1.0.'))" && compgen -G ".whl/*.whl"; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
        export PYTHONPATH=/tmp/site:$PYTHONPATH
    fi
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
    python3 -c "import torch, triton, timm; print('torch', torch.__version__, 'triton', triton.__version__, 'timm', timm.__version__)"
    python3 benchmarks/gpu_warm_cache.py ${WARM:+--modes $WARM} > "$OUT/warm.txt" 2>&1 &
    warm=$!
    table="python3 benchmarks/perf_table.py --device cuda --batch 256 --runs 10 --warmup 3"
    # -v: a line per test, even if cut; --runxfail: an expected failure in full
    parallel=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
    step 300 120 python3 -m pytest -v -p no:cacheprovider $parallel --runxfail tests/test_kernels.py -k "$TESTS"
    echo "== waiting for the compile warm-up"; wait $warm; cat "$OUT/warm.txt"
    step 150 60 python3 benchmarks/gpu_add_norm.py --batch 256 --runs 10 --out "$RES/gpu_add_norm.json"
    # the backward's configurations at TNT-Ti's and TNT-B's shapes, each alone (see verified_backward)
    step 150 60 python3 benchmarks/gpu_backward_configs.py --models tnt_ti_patch16_224 tnt_b_patch16_224
    step 150 60 $table --models tnt_s_patch16_224 --settings bf16-train --out "$RES/train"
    step 150 50 $table --models tnt_ti_patch16_224 tnt_b_patch16_224 --settings bf16-train --out "$RES/tib"
    step 150 50 python3 benchmarks/gpu_inner_block.py --batch 256 --dtypes bf16 --out "$RES/gpu_inner_block.json"
    step 120 40 $table --models tnt_s_patch16_224 --settings bf16-infer fp32-infer --no-memory --out "$RES/eager"
    step 200 100 $table --models tnt_s_patch16_224 --settings bf16-infer --no-memory --compile --out "$RES/compiled"
    step 100 40 $table --models tnt_ti_patch16_224 tnt_b_patch16_224 --settings bf16-infer --no-memory --out "$RES/tib_infer"
    step 90 40 python3 benchmarks/time_breakdown.py --device cuda --dtype bf16 --batch 256 --rounds 5 --ops 15
    step 150 50 python3 benchmarks/gpu_inner_block.py --batch 256 --dtypes fp32 tf32 --out "$RES/gpu_inner_block_fp32.json"
    step 90 40 python3 benchmarks/gpu_host.py --batch 256 --dtype bf16 --rounds 10 --top 30
    echo "== done in $((SECONDS - START))s"
} 2>&1 | tee "$OUT/log.txt"
