#!/usr/bin/env bash
# GPU checks in one go, for a machine with an NVIDIA GPU and PyTorch (CUDA build) already on it:
# the CUDA tests (tests/models/test_cuda.py and the model/callback suites with CUDA visible),
# encoder throughput (bench_encode.py: CPU and CUDA), and the callback benchmark with the model
# on the GPU and Tiled as a server process (bench_callback.py --device cuda --server).
#
# Packages the machine lacks can come as wheels in .whl/ (no network needed there), made here:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#       ... -d .whl -r <(pip freeze)        # minus what the GPU image already has
# Output goes to $OUT (default: ./gpu-check-out).
set -u
OUT=${OUT:-gpu-check-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
nvidia-smi -L; nproc
if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD/.whl/stub:$PWD
else
    export PYTHONPATH=$PWD
fi
$PY -c "import torch, numpy, tiled, bluesky; print('torch', torch.__version__, 'cuda',
torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '',
'numpy', numpy.__version__, 'tiled', tiled.__version__, 'bluesky', bluesky.__version__)"
timeout "${TEST_TIMEOUT:-200}" $PY -m pytest -q -p no:cacheprovider -m "not slow" \
    tests/models/test_cuda.py tests/models/test_models.py tests/callbacks tests/test_pipeline.py \
    2>&1 | tee "$OUT/tests.txt" | tail -25
timeout "${ENCODE_TIMEOUT:-120}" $PY benchmarks/bench_encode.py --frames 256 2>&1 | tee "$OUT/encode.txt"
timeout "${CALLBACK_TIMEOUT:-240}" $PY benchmarks/bench_callback.py --device cuda --server \
    --frames "${FRAMES:-256}" --repeats 1 2>&1 | grep -v Retrying | tee "$OUT/callback.txt"
