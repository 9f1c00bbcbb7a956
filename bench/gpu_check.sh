#!/usr/bin/env bash
# All GPU work (for a lent H100/H200), in stages each sized for one 10-minute device command (not yet run on a GPU):
#   bench/gpu_check.sh [all|tests|ops|step|fit|bigg]   (default: all, in that order)
#   tests  the kernels' CUDA tests (Triton + csrc backends against float64 references) + the pytest-benchmark ops
#   ops    bench/ops.py (op throughput vs eager / torch.compile / Liger and device ceilings)
#   step   CLIPFit + LN train steps, ViT-B-16 and ViT-L-14, batch 64, bf16 (plain = AMP): time, saved bytes, peak
#   fit    largest ViT-L-14 CLIPFit batch under a 16 GiB cap, plain vs lean
#   bigg   does ViT-bigG-14 CLIPFit batch 32 train under a 40 GB cap
# Writes JSON + logs to $OUT (or ./gpu-out). Carried wheels in .whl/ (open_clip_torch, ftfy, ...) are installed first.
set -uo pipefail
OUT=${OUT:-./gpu-out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
# the repository's folders are the `leanclip` package only once installed (setup.py maps them); the CUDA extension is
# JIT-built at first use (LEANCLIP_CUDA_JIT=1), not at install
LEANCLIP_CUDA=0 python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . \
  || { echo "gpu_check: cannot install leanclip from $PWD"; exit 2; }
export TRITON_INTERPRET=0 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 LEANCLIP_CUDA_JIT=1
STAGE=${1:-all}
run() { [ "$STAGE" = all ] || [ "$STAGE" = "$1" ]; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
if run tests; then
  python3 -m pytest tests/kernels -q -p no:cacheprovider 2>&1 | tee "$OUT/tests_kernels.log"
  python3 -m pytest tests/bench --benchmark-only -q -p no:cacheprovider --benchmark-json="$OUT/pytest_bench_ops.json" \
    2>&1 | tee "$OUT/tests_bench.log"
fi
if run ops; then
  python3 -m leanclip.bench.ops --output "$OUT" 2>&1 | tee "$OUT/bench_ops.log"
fi
if run step; then
  python3 -m leanclip bench step --models ViT-B-16,ViT-L-14 --methods clipfit,ln --batch-size 64 \
    --policies none,mlp+qkv,block --reps 5 --output "$OUT" 2>&1 | tee "$OUT/bench_step.log"
fi
if run fit; then
  python3 -m leanclip bench fit --model ViT-L-14 --method clipfit --mem-cap 16GiB --output "$OUT" 2>&1 \
    | tee "$OUT/bench_fit.log"
fi
if run bigg; then
  python3 -m leanclip bench fit --model ViT-bigG-14 --method clipfit --batch 32 --mem-cap 40GB --output "$OUT" 2>&1 \
    | tee "$OUT/bench_bigg.log"
fi
