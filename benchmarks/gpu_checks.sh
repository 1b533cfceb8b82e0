#!/usr/bin/env bash
# Every GPU check in one run, for a lent NVIDIA H100/H200 (about 5 minutes): the GPU benchmarks whose
# figures the README reports, the CUDA tests, and the training benchmark. Run from the repository root:
#     bash benchmarks/gpu_checks.sh
# Where the machine lacks our pure-Python dependencies, put their wheels in .whl/ first.
set -euo pipefail
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:.
else
    export PYTHONPATH=.
fi
nvidia-smi --query-gpu=name --format=csv,noheader
export PYTHONUNBUFFERED=1
# Benchmarks first, so that their figures come back even if the run is cut short.
python3 benchmarks/bench_losses.py --device cuda
python3 benchmarks/bench_fused.py
python3 benchmarks/bench_sparse_head.py --device cuda --classes 10000 100000 1000000 10000000 --repeats 10 --profile 100000
python3 -m pytest -o addopts="" -p no:cacheprovider -q tests/test_cuda.py tests/test_fused.py tests/test_engines.py tests/test_sparse_head.py
python3 benchmarks/bench_training.py --device cuda
