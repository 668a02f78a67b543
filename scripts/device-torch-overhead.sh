#!/usr/bin/env bash
# Where inflight as PyTorch's allocator spends host time: the per-call cost
# from Python (scripts/torch/alloc_loop.py) and Llama generation (the
# workload most bound by host time) under PyTorch's default allocator,
# expandable segments, and inflight with growable segments on and off
# (INFLIGHT_TORCH_GROWABLE=0). Carry .torchbin as for scripts/device-torch.sh.
# Device call: run(command="bash scripts/device-torch-overhead.sh", carry=[".torchbin"])
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 2
O=${OUT:-/tmp/torch-overhead}
mkdir -p "$O"
PY=python3
[ -x /opt/torch/.venv/bin/python3 ] && PY=/opt/torch/.venv/bin/python3
export INFLIGHT_TORCH_LIB=${INFLIGHT_TORCH_LIB:-$ROOT/.torchbin/libinflight_torch.so}
export PYTHONUNBUFFERED=1 CUBLAS_WORKSPACE_CONFIG=:4096:8 PYTHONPATH="$ROOT/python"
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/lib64:/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
run() {
  local name=$1; shift
  echo "== $name" | tee -a "$O/overhead.log"
  timeout 120 "$@" 2>&1 | tail -3 | tee -a "$O/overhead.log"
}
for a in default expandable inflight; do
  run "loop/$a" "$PY" scripts/torch/alloc_loop.py --allocator "$a"
done
INFLIGHT_TORCH_GROWABLE=0 run "loop/inflight-fixed" "$PY" scripts/torch/alloc_loop.py --allocator inflight
for a in default expandable inflight; do
  run "llama/$a" "$PY" scripts/torch/llama_generate.py --allocator "$a" --steps 3
done
INFLIGHT_TORCH_GROWABLE=0 run "llama/inflight-fixed" "$PY" scripts/torch/llama_generate.py --allocator inflight --steps 3
