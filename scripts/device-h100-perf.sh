#!/usr/bin/env bash
# Issue 6's figures from one H100 session: the fast path on the host CPU
# (criterion pairs, mixed, threads), `inflight bench` beside cuMemAllocAsync,
# cuMemAlloc and PyTorch, thread scaling to 16 threads, `repro` per policy on
# CUDA and on the simulated GPU (three seeds each), a CUDA `repro` trace
# replayed on CUDA under each policy, the CUDA conformance suite
# and a compute-sanitizer pass.
# Logs go to $OUT/h100-perf-logs.tar.gz, a summary to $OUT/summary.txt.
#
# Prepare here (x86-64, Debian 12), then carry .devbin:
#   export CARGO_PROFILE_RELEASE_DEBUG=0
#   cargo build --release -p inflight-cli --features cuda
#   cargo test --release -p inflight --features cuda --test cuda_conformance --no-run
#   cargo bench -p inflight --bench alloc --no-run
#   mkdir -p .devbin && cp target/release/inflight .devbin/
#   cp "$(ls -t target/release/deps/cuda_conformance-* | grep -v '\.d$' | head -1)" .devbin/cuda_conformance
#   cp "$(ls -t target/release/deps/alloc-* | grep -v '\.d$' | head -1)" .devbin/alloc_bench
#   strip .devbin/*
# Device call: run(command="bash scripts/device-h100-perf.sh", carry=[".devbin"])
set -u
B=./.devbin
L=$(mktemp -d /tmp/h100perf.XXXXXX)
S=$L/summary.txt
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
# shellcheck source=scripts/device-lib.sh
. "$(dirname "$0")/device-lib.sh"
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  nproc; grep -m1 "model name" /proc/cpuinfo; uptime
  # Whether membarrier's private expedited barrier registers (x86-64 syscall
  # 324): without it the front caches fall back to their spin locks.
  python3 -c "import ctypes; c=ctypes.CDLL(None); print('membarrier query', c.syscall(324,0,0,0), 'register', c.syscall(324,16,0,0))"
} > "$L/env.log" 2>&1
cp "$L/env.log" "$S"
step criterion 200 $B/alloc_bench --bench --warm-up-time 1 --measurement-time "${MEASURE:-3}" "pair|threads|baseline"
step threads 120 $B/inflight bench --backend sim --sizes 4KiB --pairs 1000000 --threads 1,2,4,8,16 --json "$L/threads.json"
step bench 300 $B/inflight bench --backend cuda --pairs "${PAIRS:-100000}" --repeat "${REPEAT:-3}" \
  --json "$L/bench.json"
# Policy rates move ±10% between runs here: `--repeat` runs the policies
# REPEAT times (default 3), taking turns, and prints medians and paired ratios.
for seed in 1 2 3; do
  step "repro-cuda-seed$seed" 300 $B/inflight repro --backend cuda --policy all \
    --allocations 500000 --streams 2 --seed "$seed" --repeat "${REPEAT:-3}" -q
  step "repro-sim-seed$seed" 300 $B/inflight repro --backend sim --policy all --seed "$seed" \
    --repeat "${REPEAT:-3}" -q
done
# One order of events for every policy (their live bytes equal): a CUDA
# trace of `repro` replayed on CUDA (docs/BENCHMARKS.md, *Replay of traces*).
step record-cuda 120 $B/inflight repro --backend cuda --policy deferred --allocations 300000 \
  --streams 2 -q --record "$L/trace.jsonl"
step replay-cuda 200 $B/inflight replay "$L/trace.jsonl" --backend cuda --cache-limit 256MiB \
  --memory-limit 4GiB
rm -f "$L/trace.jsonl"
step cuda-conformance 120 $B/cuda_conformance --test-threads=1
step memcheck 90 compute-sanitizer --tool memcheck $B/inflight repro --backend cuda \
  --policy deferred --allocations 20000 --streams 2 -q
(cd "$L" && grep -H -E "time:|test result|ERROR SUMMARY|^pair|^mixed|^ *[0-9]+ +[0-9]|^over |^  (deferred|retained|immediate) " \
  ./*.log) >> "$S" 2>/dev/null
grep -H -E "^(peak live|peak reserved|device allocations) " "$L/replay-cuda.log" >> "$S" 2>/dev/null
if [ -n "${OUT:-}" ]; then
  tar -czf "$OUT/h100-perf-logs.tar.gz" -C "$L" .
  cp "$S" "$OUT/summary.txt"
fi
cat "$S"
