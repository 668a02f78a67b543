#!/usr/bin/env bash
# One H100 session for every GPU figure: CUDA conformance, `repro` per policy,
# the cross-stream hazard, `inflight bench` beside cuMemAlloc(Async) and
# PyTorch, alloc+free pairs, compute-sanitizer, then the Vulkan run
# (scripts/device-vulkan.sh). Logs go to $OUT/h100-logs.tar.gz, a summary to
# $OUT/summary.txt (the device tool brings back at most 8 files).
#
# Prepare here (x86-64, Debian 12), then carry .devbin, .vkbin and .vkdebs:
#   export CARGO_PROFILE_RELEASE_DEBUG=0
#   cargo build --release -p inflight-cli --features vulkan,cuda
#   cargo test --release -p inflight --features vulkan,cuda \
#     --test vulkan_conformance --test cuda_conformance --no-run
#   cargo build --release -p inflight --features cuda --example cuda_pairs
#   mkdir -p .devbin .vkbin
#   cp target/release/inflight target/release/examples/cuda_pairs .devbin/
#   cp "$(ls -t target/release/deps/cuda_conformance-* | grep -v '\.d$' | head -1)" .devbin/cuda_conformance
#   cp target/release/inflight .vkbin/
#   cp "$(ls -t target/release/deps/vulkan_conformance-* | grep -v '\.d$' | head -1)" .vkbin/vulkan_conformance
#   strip .devbin/* .vkbin/*
#   (.vkdebs: see scripts/device-vulkan.sh)
# Device call: run(command="bash scripts/device-h100.sh", carry=[".devbin", ".vkbin", ".vkdebs"])
set -u
B=./.devbin
L=$(mktemp -d /tmp/h100logs.XXXXXX)
S=$L/summary.txt
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
# shellcheck source=scripts/device-lib.sh
. "$(dirname "$0")/device-lib.sh"
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nproc; } > "$L/env.log" 2>&1
step cuda-conformance 150 $B/cuda_conformance --test-threads=1
step repro-all 200 $B/inflight repro --backend cuda --policy all --allocations 1000000 --streams 2 -q
H="--allocations 100000 --min-size 16MiB --max-size 32MiB --window 16MiB --memory-limit 40GiB --cache-limit 1GiB -q"
# shellcheck disable=SC2086
step hazard-2streams 150 $B/inflight repro --backend cuda --policy all --streams 2 $H
step bench 200 $B/inflight bench --backend cuda --json "$L/bench.json"
step pairs 90 $B/cuda_pairs
step memcheck 120 compute-sanitizer --tool memcheck $B/inflight repro --backend cuda \
  --policy deferred --allocations 20000 --streams 2 -q
OUT_SAVED=${OUT:-}
OUT=$L/vulkan IMMEDIATE=1 bash scripts/device-vulkan.sh > "$L/vulkan.log" 2>&1
echo "== vulkan: exit $?" >> "$S"
(cd "$L" && grep -H -E "test result|^(violations|corrupted checksums|allocations/s|seconds) |ERROR SUMMARY|^pair|^mixed" \
  ./*.log ./vulkan/*.log) >> "$S" 2>/dev/null
if [ -n "$OUT_SAVED" ]; then
  tar -czf "$OUT_SAVED/h100-logs.tar.gz" -C "$L" .
  cp "$S" "$OUT_SAVED/summary.txt"
fi
cat "$S"
