#!/usr/bin/env bash
# Everything this project checks on a lent GPU machine, in one go (the device tool's `run`):
# the GPU tests, then the GPU benchmarks. Each step is time-boxed and logs to $OUT as it goes.
# The machine's image has torch but not pydantic: wheels from .whl/ (see benchmarks/README.md).
set -u
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1
{ nvidia-smi -L; python3 -c 'import torch, torchvision, pydantic; print("torch", torch.__version__, "torchvision", torchvision.__version__, "pydantic", pydantic.__version__, "cpus", __import__("os").cpu_count())'; } 2>&1 | tee "$OUT/env.log"
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -25 | tee "$OUT/gpu_tests.log"
timeout 60 python3 benchmarks/metric_update.py --repeat 50 2>&1 | tee "$OUT/metric_update.log"
timeout 330 python3 benchmarks/gpu_train.py --variants fp32 bf16+cl+bench fp16+cl+bench "$@" 2>&1 | tee "$OUT/gpu_train.log"
# train.compile (inductor; reduce-overhead adds CUDA graphs) against the same eager step; the
# compile time is printed. Goal: >= 20% MFU, ~530 img/s on an H100 for resnet50 at crop 513.
timeout 300 python3 benchmarks/gpu_train.py --backbones resnet50 --iters 24 \
  --variants bf16+cl+bench "bf16+cl compile" "bf16+cl compile-cg" 2>&1 | tee "$OUT/gpu_compile.log"
timeout 150 python3 benchmarks/data_pipeline.py --images 200 --workers 0 1 2 4 8 --crops 513 --device cuda 2>&1 | tee "$OUT/data_pipeline.log"
