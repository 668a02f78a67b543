#!/usr/bin/env bash
# Run 77: peak composition in CUDA replays (INFLIGHT_PEAKLOG), and filing a
# slot's completed kept shells at a miss (INFLIGHT_FILEKEPT), same binary.
set -u
B=./.devexp
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
T=/tmp/traces; mkdir -p $T
ls -la $T
for seed in 1 2 3; do
  [ -s $T/t$seed.jsonl ] || $B/inflight repro --backend cuda --policy deferred --allocations 300000 --streams 2 --seed $seed -q --record $T/t$seed.jsonl > /dev/null 2>&1
  for fk in 0 1; do
    echo "== seed $seed filekept $fk"
    if [ $fk = 1 ]; then export INFLIGHT_FILEKEPT=1; else unset INFLIGHT_FILEKEPT; fi
    INFLIGHT_PEAKLOG=1 $B/inflight replay $T/t$seed.jsonl --backend cuda --cache-limit 256MiB --memory-limit 4GiB 2>&1 | grep -E "^\[|peak reserved|device alloc|cache hit rate"
  done
done 2>&1 | tee $OUT/run77.log
