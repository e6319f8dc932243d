#!/usr/bin/env bash
# One prepared check for a lent GPU machine (no internet there): the CUDA tests, the five
# benchmarks at their GPU settings, and k-Same at N = 100,000; then one summary table. It needs
# the project's requirements (a machine with torch, timm and scikit-learn but no medmnist or
# opacus: install their wheels first).
#
#   bash benchmarks/gpu_check.sh            # from the repository root; logs under $OUT (or a temp folder)
#
# Each step has its own time limit, so one hang cannot lose the rest; the limits add up to
# 555 s, under 10 minutes. Without a CUDA GPU every CUDA step is skipped with a line saying so, and
# the script exits 0. The create_db benchmark builds its backbone with random weights
# (pretrained=False), so no download is needed.
set -u
cd "$(dirname "$0")/.."
PYTHON=python
[ -x .venv/bin/python ] && PYTHON=.venv/bin/python
LOGS="${OUT:-$(mktemp -d)}/gpu_check"
mkdir -p "$LOGS"

if "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    HAVE_CUDA=1
    "$PYTHON" -c "import torch; print('GPU:', torch.cuda.get_device_name(0), '| torch', torch.__version__)"
else
    HAVE_CUDA=0
    echo "No CUDA GPU here: every CUDA step below is skipped."
fi

SUMMARY=()
# step NAME LIMIT_SECONDS COMMAND...: run with a time limit, log to $LOGS/NAME.log, remember the outcome.
step() {
    local name=$1 limit=$2
    shift 2
    if [ "$HAVE_CUDA" = 0 ]; then
        echo "SKIP $name: needs a CUDA GPU (none found)"
        SUMMARY+=("$(printf '%-16s %-9s %8s  %s' "$name" skipped - 'no CUDA GPU')")
        return
    fi
    echo "=== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$LOGS/$name.log"
    local rc=${PIPESTATUS[0]} outcome=ok
    [ "$rc" != 0 ] && outcome="failed($rc)"
    { [ "$rc" = 124 ] || [ "$rc" = 137 ]; } && outcome=TIMEOUT
    SUMMARY+=("$(printf '%-16s %-9s %8s  %s' "$name" "$outcome" "$((SECONDS - start))s" "$LOGS/$name.log")")
}

step cuda_tests 75 "$PYTHON" -m pytest -q -m cuda tests/test_cuda.py
step bench_ksame 60 "$PYTHON" benchmarks/bench_ksame.py --device cuda --sizes 5000 20000 --k 5 \
    --skip-reference-above 5000
step ksame_100k 90 "$PYTHON" benchmarks/bench_ksame.py --device cuda --sizes 100000 --k 5 --skip-reference-above 0
step bench_create_db 90 "$PYTHON" benchmarks/bench_create_db.py --backbone vit_base_patch14_dinov2 --img_size 518 \
    --num_images 4096 --reference_images 512 --device cuda
step bench_cvae 120 "$PYTHON" benchmarks/bench_cvae.py --device cuda --skip-reference-above 5000
step bench_probe 60 "$PYTHON" benchmarks/bench_probe.py --device cuda
step bench_dp_cvae 60 "$PYTHON" benchmarks/bench_dp_cvae.py --size 10000 --epochs 3 --device cuda

echo
echo "Summary (logs in $LOGS)"
printf '%-16s %-9s %8s  %s\n' step outcome seconds log
printf '%s\n' "${SUMMARY[@]}"
# The key lines of each benchmark, so that the numbers sit beside the summary.
for log in "$LOGS"/bench_*.log "$LOGS"/ksame_100k.log; do
    [ -f "$log" ] && { echo "--- $(basename "$log")"; tail -n 12 "$log"; }
done
exit 0
