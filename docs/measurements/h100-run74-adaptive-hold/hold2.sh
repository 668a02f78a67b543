#!/usr/bin/env bash
# Run 74: adaptive hold_peak (trims at most active - its moving average),
# --hold-peak against the default (off), one binary; then criterion's mixed
# pair with the rule on (ab_on) and off (ab_off), alternating.
set -u
B=./.devbin
L=$OUT/logs; mkdir -p $L
S=$OUT/summary.txt
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
. scripts/device-lib.sh
{ date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; nproc; uptime; } > $S
for seed in 1 2 3; do
  for mode in hold nohold; do
    f=""; [ $mode = hold ] && f="--hold-peak"
    step "cuda-$mode-seed$seed" 150 $B/inflight repro --backend cuda --policy all --allocations 500000 --streams 2 --seed $seed --repeat 3 -q $f
  done
done
for seed in 1 2; do
  for mode in hold nohold; do
    f=""; [ $mode = hold ] && f="--hold-peak"
    step "sim-$mode-seed$seed" 150 $B/inflight repro --backend sim --policy all --seed $seed --repeat 3 -q $f
  done
done
for r in 1 2; do for v in on off; do
  echo "criterion $v:" >> $L/criterion.log
  ./.devexp/ab_$v --bench --warm-up-time 1 --measurement-time 3 "pair/mixed|baseline" 2>&1 | grep -E "time:" >> $L/criterion.log
done; done
(cd $L && grep -H -E "^  (deferred|retained|immediate) |peak holds|device allocations|cache hit" *.log) >> $S
cat $L/criterion.log >> $S
tar -czf $OUT/logs.tar.gz -C $L . && rm -rf $L
cat $S
