#!/usr/bin/env bash
# The NVIDIA GPU check of issue 31, one script for a machine with CUDA 13, torch and transformers but no MLX
# and no network: MLX's CUDA build from local wheels, then benchmarks/bench_gpu.py (AIMv2-L/14-224 at batch
# 1, 8 and 64 in float16 and bfloat16, aim-mlx on MLX's CUDA backend against transformers on torch CUDA,
# parity against float32 on the CPU, peak memory). About 5 minutes on an H100; it stops itself at 13.
#
#   benchmarks/gpu_check.sh WHEELS_DIR [OUT_DIR]
#
# WHEELS_DIR holds the two wheels of `mlx[cuda13]` for the machine's Python, fetched where there is a network:
#   pip download --no-deps --python-version 3.X --only-binary :all: --platform manylinux_2_35_x86_64 \
#       mlx==V mlx-cuda-13==V -d WHEELS_DIR
# They are installed with --no-deps: the CUDA libraries they would pull are already there (torch's).
# OUT_DIR (default $OUT, else ./gpu-check-out) receives bench_gpu.txt, bench_gpu.json and the environment.
set -euo pipefail
wheels=$(cd "${1:?usage: benchmarks/gpu_check.sh WHEELS_DIR [OUT_DIR]}" && pwd)
out=${2:-${OUT:-gpu-check-out}}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."

# A venv over the machine's packages (torch, transformers, numpy), with MLX added to it alone.
python -m venv --system-site-packages .venv-gpu
. .venv-gpu/bin/activate
pip install --no-index --no-deps "$wheels"/mlx-[0-9]*.whl "$wheels"/mlx_cuda_13-*.whl
export PYTHONPATH=$PWD  # aim_mlx from this tree, with no install step that could reach for the network
python - <<'PY'
import importlib.util, sys
need = ["mlx", "numpy", "safetensors", "huggingface_hub", "PIL", "torch", "transformers"]
missing = [m for m in need if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_check: missing on this machine: {', '.join(missing)} (carry their wheels as for MLX)")
PY
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python -c "import mlx.core as mx, torch; print('mlx', mx.__version__, mx.default_device(), '| torch', torch.__version__, torch.version.cuda)"
  pip freeze | grep -iE '^(mlx|torch|transformers|numpy)'
} 2>&1 | tee "$out/environment.txt"

AIM_MLX_DEVICE=gpu timeout 780 python benchmarks/bench_gpu.py --json "$out/bench_gpu.json" 2>&1 \
  | tee "$out/bench_gpu.txt"
