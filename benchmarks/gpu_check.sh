#!/usr/bin/env bash
# lineside on a CUDA machine, in one command: the figures the README's GPU section asks for,
# the most telling first, each written into OUT as soon as it is measured (a run cut short
# by a time limit keeps what it measured).
#
#   bash benchmarks/gpu_check.sh DATA OUT            # speed, then tests
#   bash benchmarks/gpu_check.sh DATA OUT speed      # or tests alone
#
# speed: benchmarks/gpu_train.py (the reference loop and its --ablate variants, `--strategy
#   full` and `finetune --unfreeze all` at batch 32 and 128, channels_last and NCHW:
#   OUT/gpu_train.json), N-process scaling when the machine has several GPUs
#   (OUT/scaling.json), and the default `lineside train` on 10 images per class of DATA,
#   scored on the rest (benchmarks/fewshot.py, one draw: OUT/fewshot.json).
# tests: the test suite with every training on CUDA (LINESIDE_TEST_DEVICE=cuda), each
#   failure appended to OUT/failures.txt as it happens; pytest-xdist spreads it over
#   workers of 2 threads each when installed.
# PYTHON picks the interpreter (default: python); GPU_TRAIN_ARGS adds options to
# gpu_train.py (e.g. "--limit 600" for a quicker run).
set -uo pipefail
if [ $# -lt 2 ]; then
    echo "usage: bash benchmarks/gpu_check.sh DATA OUT [speed|tests|all]" >&2
    exit 2
fi
DATA=$1
OUT=$2
WHAT=${3:-all}
PY=${PYTHON:-python}
case "$WHAT" in speed|tests|all) ;; *) echo "gpu_check.sh: '$WHAT': one of speed, tests, all" >&2; exit 2 ;; esac
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
rc=0
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
{
    date -u
    command -v nvidia-smi >/dev/null && nvidia-smi
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn',
torch.backends.cudnn.version(), [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])"
} > "$OUT/device.txt" 2>&1
echo "$GPUS CUDA device(s); details in $OUT/device.txt"

if [ "$WHAT" != tests ]; then
    # shellcheck disable=SC2086  # GPU_TRAIN_ARGS is a list of options
    "$PY" benchmarks/gpu_train.py "$DATA" --batch-sizes 32,128 --epochs 5 --seconds 5 --ablate \
        --layouts channels_last,nchw --json "$OUT/gpu_train.json" ${GPU_TRAIN_ARGS:-} 2>&1 \
        | tee "$OUT/gpu_train.txt" || rc=1
    if [ "$GPUS" -ge 2 ]; then
        counts=$(seq -s, 1 "$GPUS")
        # shellcheck disable=SC2086
        "$PY" benchmarks/gpu_train.py "$DATA" --batch-sizes 128 --epochs 5 --seconds 2 --gpus "$counts" \
            --json "$OUT/scaling.json" ${GPU_TRAIN_ARGS:-} 2>&1 | tee "$OUT/scaling.txt" || rc=1
    fi
    "$PY" benchmarks/fewshot.py "$DATA" --shots 10 --repeats 1 --json "$OUT/fewshot.json" 2>&1 \
        | tee "$OUT/fewshot.txt" || rc=1
fi

if [ "$WHAT" != speed ]; then
    workers=()
    if "$PY" -c "import xdist" 2>/dev/null; then
        workers=(-n "$(( $(nproc) / 2 > 1 ? $(nproc) / 2 : 1 ))")
    fi
    : > "$OUT/failures.txt"
    OMP_NUM_THREADS=2 LINESIDE_TEST_DEVICE=cuda LINESIDE_TEST_FAILURES="$OUT/failures.txt" \
        "$PY" -m pytest -q "${workers[@]}" 2>&1 | tee "$OUT/tests.txt" || rc=1
fi
exit $rc
