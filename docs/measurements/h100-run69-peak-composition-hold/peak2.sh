#!/usr/bin/env bash
# Run 69: peak composition under hold_peak (instrumented build of fe70d2e).
set -u
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
for seed in 1 2 3; do
  ./.devexp/peak2 repro --backend cuda --policy all --allocations 500000 --streams 2 --seed $seed -q > $OUT/seed$seed.log 2>&1
  for p in deferred retained immediate; do grep "exp peak $p" $OUT/seed$seed.log | tail -4; done
  grep -E "peak (active|reserved)|allocations/s" $OUT/seed$seed.log
done
