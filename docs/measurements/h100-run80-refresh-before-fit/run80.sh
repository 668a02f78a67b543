#!/usr/bin/env bash
# Run 80: INFLIGHT_EXACT_REFRESH (with no ready block of the exact size and
# blocks pending: refresh the watermarks and promote before best fit)
# against the committed order, one binary.
set -u
B=./.devexp
L=$OUT/logs; mkdir -p $L
S=$OUT/summary.txt
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
. scripts/device-lib.sh
{ date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; nproc; grep -m1 "model name" /proc/cpuinfo; } > $S
for seed in 1 2 3; do
  for v in 0 1; do
    if [ $v = 1 ]; then export INFLIGHT_EXACT_REFRESH=1; else unset INFLIGHT_EXACT_REFRESH; fi
    step "cuda-refresh$v-seed$seed" 150 $B/inflight repro --backend cuda --policy all --allocations 500000 --streams 2 --seed $seed --repeat 3 -q
  done
done
(cd $L && grep -H -E "^  (deferred|retained|immediate) |/ |device allocations|cache hit rate|^µs/round|^  in device alloc" *.log) >> $S
tar -czf $OUT/logs.tar.gz -C $L . && rm -rf $L
grep -E "/ |^==|model|device allocations" $S
