#!/bin/bash
# inflight bench on the device machine (copied here from branch bench).
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/lib64:$LD_LIBRARY_PATH
B=.devcarry/bench-inflight
chmod +x $B
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv; nproc; lscpu | grep -i "model name"; python3 -c 'import torch; print("torch", torch.__version__, torch.version.cuda)'; c++ --version | head -1; ls -d /usr/local/cuda*; } > $OUT/env.log 2>&1
cat $OUT/env.log
for run in 1 2; do
  $B bench --backend cuda --json $OUT/bench-cuda-run$run.json > $OUT/bench-cuda-run$run.log 2>&1
  echo "== cuda run $run rc=$?"; cat $OUT/bench-cuda-run$run.log
done
$B bench --backend sim --json $OUT/bench-sim.json > $OUT/bench-sim.log 2>&1
echo "== sim rc=$?"; cat $OUT/bench-sim.log
