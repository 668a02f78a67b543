#!/usr/bin/env bash
# Run 75: FRONT_BLOCKS 16 against 64 (0ce8e92's only change), criterion
# pair/mixed, pair/cache_hit/1MiB and the baseline, alternating three times.
for r in 1 2 3; do for v in 16 64; do
  echo "FRONT_BLOCKS=$v round $r"
  ./.devexp/fb$v --bench --warm-up-time 1 --measurement-time 3 "pair/mixed|pair/cache_hit/1MiB|baseline" 2>&1 | grep -E "^(pair|baseline)|time:" | grep -v "%"
done; done
