#!/usr/bin/env bash
# Run 70: 02826ce (claim before release) hold vs --no-hold-peak, then peak composition.
set -u
L=$OUT/logs; mkdir -p $L
bash .devexp/hold.sh > $OUT/hold-summary.txt 2>&1
mkdir -p $OUT/comp; OUT=$OUT/comp bash .devexp/peak2.sh > $OUT/comp-summary.txt 2>&1
grep -E "^cuda|^sim" $OUT/hold-summary.txt | grep -E "  (deferred|retained|immediate) " 
tail -45 $OUT/comp-summary.txt
