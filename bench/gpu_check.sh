#!/usr/bin/env bash
# All GPU work in one command (for a lent H100/H200; see README "GPU checks"):
#   the kernels' CUDA tests (Triton + csrc backends against float64 references), then the op and step benchmarks.
# Writes JSON + logs to $OUT (or ./gpu-out). Carried wheels in .whl/ (open_clip_torch, ftfy, ...) are installed first.
set -uo pipefail
OUT=${OUT:-./gpu-out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export TRITON_INTERPRET=0 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 LEANCLIP_CUDA_JIT=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
python3 -m pytest tests/kernels -q -x -p no:cacheprovider 2>&1 | tee "$OUT/tests_kernels.log"
python3 -m bench.ops --output "$OUT" 2>&1 | tee "$OUT/bench_ops.log"
python3 -m engine bench step --models ViT-B-16,ViT-L-14 --methods ln,clipfit --batch-size 64 --output "$OUT" 2>&1 \
  | tee "$OUT/bench_step.log"
