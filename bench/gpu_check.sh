#!/usr/bin/env bash
# The GPU check: one prepared run for a machine with an NVIDIA GPU and
# TensorFlow built with CUDA (pip install "tensorflow[and-cuda]==2.21.*").
#
#     bash bench/gpu_check.sh [OUT_DIR]        (default bench/results/gpu)
#
# 1. the GPU's name, memory and driver (nvidia-smi) -> OUT_DIR/gpu.txt
# 2. the layer benchmark at E = 16, 64, 256, 1024 against the dense FFN and
#    the per-expert dispatcher, with peak GPU memory -> OUT_DIR/layer.json
# 3. the hierarchical benchmark at 64 and 65,536 experts -> hierarchical.json
# 4. the layer tests on the GPU, float32 and mixed_bfloat16 (the suite's own
#    tests: every layer kind, masks, losses, XLA, mixed precision, fit)
#    -> OUT_DIR/tests.log
#
# The figures come first and the tests last, so that a short lease yields
# the numbers; GPU_CHECK_TEST_SECONDS bounds the tests (pytest is
# interrupted and prints what passed so far). GPU_CHECK_STEPS and
# GPU_CHECK_WARMUP set the benchmarks' timed and warm-up steps.
# Everything runs even if a step fails; the exit status is the first
# failure's.
set -u
cd "$(dirname "$0")/.."
OUT_DIR=${1:-bench/results/gpu}
mkdir -p "$OUT_DIR"
PYTHON=${PYTHON:-python3}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2} PYTHONUNBUFFERED=1
# The benchmark runs the dense FFN and each MoE configuration in processes
# side by side: each must take GPU memory as it needs it, not all at start.
export TF_FORCE_GPU_ALLOW_GROWTH=true
STEPS=${GPU_CHECK_STEPS:-10} WARMUP=${GPU_CHECK_WARMUP:-3}
TEST_SECONDS=${GPU_CHECK_TEST_SECONDS:-0}
status=0
step() {  # step NAME COMMAND...: runs it, remembers the first failure.
    echo "== $1"
    shift
    "$@" || { rc=$?; echo "(failed: exit $rc)"; [ $status -eq 0 ] && status=$rc; }
}

if ! "$PYTHON" -c "import tensorflow as tf, sys; sys.exit(0 if tf.config.list_physical_devices('GPU') else 1)" 2>/dev/null; then
    echo "error: $PYTHON has no TensorFlow that sees a GPU; install" \
         "tensorflow[and-cuda]==2.21.* and this repo (pip install -e .[dev])." >&2
    exit 3
fi

step "GPU" bash -o pipefail -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee '$OUT_DIR/gpu.txt'"
step "layer benchmark" "$PYTHON" bench/bench_layer.py --experts=16,64,256,1024 \
    --steps="$STEPS" --warmup="$WARMUP" --malloc=system \
    --output="$OUT_DIR/layer.json"
step "hierarchical benchmark" "$PYTHON" bench/bench_hierarchical.py \
    --sizes=8x8,256x256 --steps="$STEPS" --warmup="$WARMUP" --malloc=system \
    --output="$OUT_DIR/hierarchical.json"
step "layer tests (float32 and mixed_bfloat16)" bash -o pipefail -c \
    "timeout -s INT $TEST_SECONDS $PYTHON -m pytest -q -p no:cacheprovider tests/test_moe.py tests/test_hierarchical.py tests/test_routers.py tests/test_keras_integration.py -k 'not fresh_process' 2>&1 | tee '$OUT_DIR/tests.log' | tail -5"
exit $status
