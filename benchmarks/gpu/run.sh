#!/usr/bin/env bash
# The GPU checks of ldct-node, as one prepared run for the lent GPU machine (the
# `device` tool: JAX and PyTorch there, no TensorFlow, no package registry, no DCMTK).
#
#   bash benchmarks/gpu/run.sh fetch     here: the wheels that machine lacks -> .whl/
#                                        (at the versions of the project's .venv)
#   bash benchmarks/gpu/run.sh check     here, on the CPU: the same run, small and short
#   bash benchmarks/gpu/run.sh           there: run(command="bash benchmarks/gpu/run.sh",
#                                        carry=[".whl"], timeout_s=570)
#
# It installs the wheels (benchmarks/gpu/wheels.txt) beside the machine's own packages,
# runs the Keras networks under KERAS_BACKEND=jax, and writes each step's log and JSON
# to $OUT (the tool brings that folder back; ./out/gpu when unset):
#   1. inference.py: fused cascade, 512x512, batch 16 and 64, float32 and bfloat16,
#      slices/s and the fraction of the bf16 peak (--peak-tflops, H200: 989 dense);
#   2. e2e.py with pynetdicom's storescu / storescp: C-STORE in -> denoised series out,
#      the node on the GPU (bfloat16, batch 64, a 32 GB host budget: that machine has
#      128 GB, and a CUDA process holds GBs before its first call).
# Each step has its own time limit, so one that hangs still leaves the others' figures.
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cd "$repo" || exit 1
mode="${1:-run}"

fetch() {
    # cp312 manylinux wheels, as the GPU machine's Python 3.12 takes them.
    local py=.venv/bin/python  # the project's venv (README), else the PATH's
    [ -x "$py" ] || py=python3
    mkdir -p .whl
    rm -f .whl/*.whl  # one version of each: two would stop the install there
    # name==version as installed in that venv (a name missing there stops the fetch)
    "$py" -c "import sys; from importlib.metadata import version as v; \
print('\n'.join(f'{n}=={v(n)}' for n in sys.stdin.read().split() if n))" \
        < <(grep -v '^#' "$here/wheels.txt") > .whl/pins.txt || exit 1
    xargs "$py" -m pip download -q --no-deps < .whl/pins.txt \
        --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux1_x86_64 -d .whl || exit 1
    # A real CT slice for the bfloat16 accuracy line (pydicom-data's; the machine has
    # neither pydicom-data nor a network to fetch it).
    "$py" -c "from pydicom.data import get_testdata_file as g; \
import shutil; shutil.copy(g('693_UNCR.dcm'), '.whl/ct-slice.dcm')" ||
        echo "no pydicom-data here: the accuracy line will be skipped there"
    du -sh .whl
}

step() {
    # step NAME SECONDS COMMAND...: log to $OUT/NAME.log, go on after a failure.
    local name="$1" seconds="$2"
    shift 2
    echo "== $name (at most ${seconds}s): $*"
    local start=$SECONDS
    timeout --kill-after=10 "$seconds" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - start))s"
    return 0
}

run() {
    local device="$1" size="$2" batches="$3" slices="$4" scale="$5"
    OUT="${OUT:-$repo/out/gpu}"
    mkdir -p "$OUT"
    if [ -d .whl ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --upgrade --target /tmp/ldct-site .whl/*.whl || exit 1
        export PYTHONPATH="/tmp/ldct-site:$repo${PYTHONPATH:+:$PYTHONPATH}"
    else
        export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
    fi
    export KERAS_BACKEND=jax PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
    # The node's own processes (e2e's `serve`) find ldct-node through PYTHONPATH.
    {
        date -u
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm \
            --format=csv 2>/dev/null || echo "no nvidia-smi"
        python3 -c "import jax, keras; print('jax', jax.__version__, jax.devices()); \
print('keras', keras.__version__, keras.backend.backend())"
        grep -m1 'model name' /proc/cpuinfo
        nproc
    } 2>&1 | tee "$OUT/machine.log"
    local ct=()
    [ -f .whl/ct-slice.dcm ] && ct=(--ct-slice .whl/ct-slice.dcm)
    step inference $((240 / scale)) python3 benchmarks/inference.py --device "$device" \
        --size "$size" --batch-sizes "$batches" --precisions float32,bfloat16 \
        --engines fused --repeats 3 --peak-tflops 989 "${ct[@]}" --json "$OUT/inference.json"
    local batch="${batches##*,}"
    step e2e $((240 / scale)) python3 benchmarks/e2e.py --peers python --device "$device" \
        --size "$size" --slices "$slices" --batch-size "$batch" --precision bfloat16 \
        --stable-seconds 2 --timeout $((200 / scale)) --memory-budget-mb 32768 \
        --json "$OUT/e2e.json"
    ls -l "$OUT"
}

case "$mode" in
    fetch) fetch ;;
    run) run gpu 512 16,64 256 1 ;;
    # On this CPU: the same steps on small slices, to see the run works before it
    # spends device time (the limits are halved: it must be quick here too).
    check) run cpu 64 1,2 4 2 ;;
    *) echo "usage: $0 [fetch|check|run]" >&2; exit 2 ;;
esac
