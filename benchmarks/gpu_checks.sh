#!/usr/bin/env bash
# Everything this project checks on a lent GPU machine, in one go (the device tool's `run`,
# at most 600 s a command): the steps in order of what is still unmeasured, each time-boxed
# and cut to what is left of GPU_CHECKS_S (default 570 s); a step with under 30 s left is
# skipped and says so. Each logs to $OUT as it goes.
# The machine's image has torch but not pydantic: wheels from .whl/ (see benchmarks/README.md).
set -u
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
END=$((SECONDS + ${GPU_CHECKS_S:-570}))
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1

step() {  # step LOG BOX_S COMMAND...: COMMAND under min(BOX_S, time left), tee'd to $OUT/LOG
  local log=$1 box=$2 left=$((END - SECONDS)); shift 2
  if [ "$left" -lt 30 ]; then echo "skipped (${left} s left): $*" | tee "$OUT/$log"; return; fi
  timeout $((box < left ? box : left)) "$@" 2>&1 | tee "$OUT/$log"
}

{ nvidia-smi -L; python3 -c 'import torch, torchvision, pydantic; print("torch", torch.__version__, "torchvision", torchvision.__version__, "pydantic", pydantic.__version__, "cpus", __import__("os").cpu_count())'; } 2>&1 | tee "$OUT/env.log"
step gpu_tests.log 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py
# Unmeasured: MobileNetV2's training rate. `--plan` prices every backbone at ResNet's measured
# 127 TFLOP/s (103 GFLOP per image at OS 16, crop 513: ~1,230 img/s if it held; depthwise
# convolutions are memory-bound, so expect fewer).
step gpu_mobilenet.log 90 python3 benchmarks/gpu_train.py --backbones mobilenet_v2 --iters 24 --variants bf16+cl+bench
# Unmeasured: data.device_augment (<= 2 CPU cores per GPU at crop 513, no loss of throughput).
step data_pipeline.log 150 python3 benchmarks/data_pipeline.py --images 200 --workers 0 1 2 4 8 --crops 513 --device cuda
# Unmeasured: train.compile (inductor; reduce-overhead adds CUDA graphs) against the same eager
# step, compile time printed. Goal: >= 20% MFU, ~530 img/s on an H100 for resnet50 at crop 513.
step gpu_compile.log 240 python3 benchmarks/gpu_train.py --backbones resnet50 --iters 24 \
  --variants bf16+cl+bench "bf16+cl compile" "bf16+cl compile-cg"
# The learning-curve table on the GPU (its own file: other numerics than the CPU table's);
# it resumes, so a later run goes on from $OUT's copy put back in benchmarks/learning_curves/.
step learning_curves.log 600 python3 benchmarks/learning_curves.py --device cuda \
  --table benchmarks/learning_curves/demo_space_cuda.csv --data /tmp/lc-data
cp benchmarks/learning_curves/demo_space_cuda.* "$OUT/" 2>/dev/null
# Measured on 2026-11-27 (benchmarks/README.md's GPU section): again when time is left.
step metric_update.log 60 python3 benchmarks/metric_update.py --repeat 50
step gpu_train.log 330 python3 benchmarks/gpu_train.py --variants fp32 bf16+cl+bench fp16+cl+bench "$@"
