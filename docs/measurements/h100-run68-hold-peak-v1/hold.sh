#!/usr/bin/env bash
# Run 68: Config::hold_peak on (default) vs off (--no-hold-peak), same binary,
# repro on CUDA and on the simulator, seeds 1-3, --repeat 3.
set -u
B=./.devbin
L=$OUT/logs; mkdir -p $L
S=$OUT/summary.txt
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
. scripts/device-lib.sh
{ date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; nproc; uptime; } > $S
for seed in 1 2 3; do
  for mode in hold nohold; do
    f=""; [ $mode = nohold ] && f="--no-hold-peak"
    step "cuda-$mode-seed$seed" 150 $B/inflight repro --backend cuda --policy all --allocations 500000 --streams 2 --seed $seed --repeat 3 -q $f
  done
done
for seed in 1 2; do
  for mode in hold nohold; do
    f=""; [ $mode = nohold ] && f="--no-hold-peak"
    step "sim-$mode-seed$seed" 150 $B/inflight repro --backend sim --policy all --seed $seed --repeat 3 -q $f
  done
done
(cd $L && grep -H -E "^  (deferred|retained|immediate) |peak holds|device allocations" *.log) >> $S
cat $S
