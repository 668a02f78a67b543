#!/usr/bin/env bash
# Run 76: (a) repro traces recorded on CUDA, replayed on CUDA under each
# policy (equal live bytes); (b) INFLIGHT_STRETCH experiment (0 = main's code).
set -u
B=./.devexp
L=$OUT/logs; mkdir -p $L
S=$OUT/summary.txt
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
. scripts/device-lib.sh
{ date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; nproc; uptime; } > $S
T=/tmp/traces; mkdir -p $T
for seed in 1 2 3; do
  step "record-seed$seed" 120 $B/inflight repro --backend cuda --policy deferred --allocations 300000 --streams 2 --seed $seed -q --record $T/t$seed.jsonl
  ls -la $T/t$seed.jsonl >> $S
  for r in 1 2; do
    step "replay-seed$seed-r$r" 200 $B/inflight replay $T/t$seed.jsonl --backend cuda --cache-limit 256MiB --memory-limit 4GiB
  done
  step "replay-hold-seed$seed" 200 $B/inflight replay $T/t$seed.jsonl --backend cuda --cache-limit 256MiB --memory-limit 4GiB --hold-peak
done
for seed in 1 2 3; do
  for st in 0 4; do
    INFLIGHT_STRETCH=$st step "cuda-stretch$st-seed$seed" 150 $B/inflight repro --backend cuda --policy all --allocations 500000 --streams 2 --seed $seed --repeat 3 -q
  done
done
for r in 1 2; do for st in 0 4; do
  echo "criterion stretch $st:" >> $L/criterion.log
  INFLIGHT_STRETCH=$st $B/alloc_bench --bench --warm-up-time 1 --measurement-time 3 "pair/mixed|baseline" 2>&1 | grep -E "time:|^pair|^baseline" >> $L/criterion.log
done; done
(cd $L && grep -H -E "^  (deferred|retained|immediate) |device allocations|cache hit|peak reserved|peak live|peak holds|^ *(deferred|retained|immediate) " *.log) >> $S
cat $L/criterion.log >> $S
tar -czf $OUT/logs.tar.gz -C $L . && rm -rf $L
cat $S
