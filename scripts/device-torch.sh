#!/usr/bin/env bash
# inflight as PyTorch's allocator on the GPU machine (H200, CUDA 13, PyTorch
# 2.11 in /opt/torch/.venv, transformers, torchvision; no Rust there, no
# internet): GPT-2 small training, a Llama-style model generating, ResNet-50
# training and the two-stream hazard, each under PyTorch's default
# allocator, expandable segments and inflight (deferred; the hazard also
# under immediate), each in a process of its own, then a short GPT-2 run
# under compute-sanitizer memcheck with inflight. scripts/torch/run_all.py
# does the runs and the comparisons; it must all end within 8 minutes.
#
# Prepare here (x86-64), then carry .torchbin:
#   cargo build --release -p inflight-torch
#   mkdir -p .torchbin && cp target/release/libinflight_torch.so .torchbin/
#   strip .torchbin/libinflight_torch.so
# Device call:
#   run(command="bash scripts/device-torch.sh", carry=[".torchbin"])
# Options: bash scripts/device-torch.sh [--quick] [--only gpt2,llama,...]
#   (passed to run_all.py); INFLIGHT_TORCH_LIB overrides the library's path.
#
# Back in $OUT: torch.log (every program's output), figures.json (every
# result, the comparisons, the verdicts), summary.txt (the comparisons).
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 2
O=${OUT:-/tmp/torch-out}
mkdir -p "$O"
if [ -z "${INFLIGHT_TORCH_LIB:-}" ]; then
  for f in "$ROOT/.torchbin/libinflight_torch.so" "$ROOT/target/release/libinflight_torch.so"; do
    if [ -f "$f" ]; then INFLIGHT_TORCH_LIB=$f; break; fi
  done
fi
if [ ! -f "${INFLIGHT_TORCH_LIB:-}" ]; then
  echo "libinflight_torch.so not found: carry .torchbin (see this script's header) or set INFLIGHT_TORCH_LIB" >&2
  exit 2
fi
PY=${PYTHON:-python3}
[ -x /opt/torch/.venv/bin/python3 ] && PY=${PYTHON:-/opt/torch/.venv/bin/python3}
export INFLIGHT_TORCH_LIB PYTHONUNBUFFERED=1 CUBLAS_WORKSPACE_CONFIG=:4096:8
export PYTHONPATH="$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"
# NVRTC (inflight's CUDA backend compiles its kernels at a device's first use).
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/lib64:/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
"$PY" scripts/torch/run_all.py "$O" "$@"
