#!/usr/bin/env bash
# One GPU-machine session (H200, CUDA 13, PyTorch 2.11 in /opt/torch/.venv,
# 16 cores) for the CUDA figures of docs/BENCHMARKS.md and the checks of
# docs/SNAPSHOTS.md: the CUDA conformance suite; the shared traces replayed
# on CUDA with growable segments (scripts/trace_table.py); repro under every
# policy; compute-sanitizer memcheck over repro and a replay with growable
# segments; `inflight bench` beside cuMemAllocAsync, cuMemAlloc and
# PyTorch; the criterion thread-scaling benchmark on the machine's cores;
# snapshots of every trace opened by PyTorch's own memory_viz; a real
# PyTorch snapshot checked, imported and replayed. scripts/device-torch.sh
# (inflight as PyTorch's allocator) is a session of its own.
#
# Prepare here (x86-64), then carry .devbin:
#   cargo build --release -p inflight-cli --features cuda
#   cargo test --release -p inflight --features cuda,testing --test cuda_conformance --no-run
#   cargo bench -p inflight --bench alloc --no-run
#   mkdir -p .devbin && cp target/release/inflight .devbin/
#   cp "$(ls -t target/release/deps/cuda_conformance-* | grep -v '\.d$' | head -1)" .devbin/cuda_conformance
#   cp "$(ls -t target/release/deps/alloc-* | grep -v '\.d$' | head -1)" .devbin/alloc_bench
#   strip .devbin/*
# Device call: run(command="bash scripts/device-h200.sh", carry=[".devbin", ".traces"])
# Traces: TRACES, else the first of .traces (carry a copy of
# ../shared/traces there), shared/traces, ../shared/traces.
#
# Back in $OUT: summary.txt (exit codes and the lines that matter),
# tables.md (the trace tables on CUDA), logs.tar.gz (every log).
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 2
B=$ROOT/.devbin
L=$(mktemp -d /tmp/h200logs.XXXXXX)
# The summary goes straight to $OUT, so that a call cut short keeps it.
S=${OUT:+$OUT/summary.txt}
S=${S:-$L/summary.txt}
PY=python3
[ -x /opt/torch/.venv/bin/python3 ] && PY=/opt/torch/.venv/bin/python3
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/lib64:/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
T=${TRACES:-}
for d in .traces shared/traces ../shared/traces; do
  if [ -z "$T" ] && [ -f "$d/pytorch_stats.json" ]; then T=$d; fi
done
# shellcheck source=scripts/device-lib.sh
. "$(dirname "$0")/device-lib.sh"
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nproc; } > "$L/env.log" 2>&1
cat "$L/env.log" >> "$S"
step cuda-conformance 150 "$B/cuda_conformance" --test-threads=1
if [ -n "$T" ]; then
  step trace-table 240 "$PY" scripts/trace_table.py --inflight "$B/inflight" --backend cuda \
    --traces "$T" --json "$L/trace-table.json"
  cp "$L/trace-table.log" "$L/tables.md"
  # Every trace's snapshot (deferred), checked and drawn by PyTorch's viewer.
  for t in bert_train vit_infer_varbatch llama_train_varlen gpt2_generate_varlen; do
    step "snap-$t" 120 "$B/inflight" replay "$T/$t.jsonl.gz" --backend cuda --policy deferred \
      --snapshot "$L/$t.pickle" -q
    step "snapcheck-$t" 60 "$B/inflight" snapshot-check "$L/$t.pickle"
    step "viz-trace-$t" 120 "$PY" -m torch.cuda._memory_viz trace_plot "$L/$t.pickle" -o "$L/$t.trace.html"
    step "viz-segment-$t" 120 "$PY" -m torch.cuda._memory_viz segment_plot "$L/$t.pickle" -o "$L/$t.segment.html"
    ls -l "$L/$t.trace.html" "$L/$t.segment.html" >> "$S" 2>&1
    rm -f "$L/$t.pickle" "$L/$t.trace.html" "$L/$t.segment.html"
  done
  step memcheck-replay 200 compute-sanitizer --tool memcheck "$B/inflight" replay \
    "$T/vit_infer_varbatch.jsonl.gz" --backend cuda --policy deferred -q
fi
step bench 200 "$B/inflight" bench --backend cuda --repeat 3 --json "$L/bench.json"
step threads 150 "$B/alloc_bench" --bench "threads/" --warm-up-time 1 --measurement-time 2
step real-snapshot 120 "$PY" scripts/torch/record_snapshot.py "$L/real.pickle"
step real-check 60 "$B/inflight" snapshot-check "$L/real.pickle"
step real-import 60 "$B/inflight" import-torch "$L/real.pickle" -o "$L/real.jsonl"
step real-replay 120 "$B/inflight" replay "$L/real.jsonl" --backend cuda
step real-replay-sim 120 "$B/inflight" replay "$L/real.jsonl" --backend sim
step repro-all 200 "$B/inflight" repro --backend cuda --policy all --allocations 300000 --streams 2 -q
step memcheck-repro 150 compute-sanitizer --tool memcheck "$B/inflight" repro --backend cuda \
  --policy deferred --allocations 20000 --streams 2 -q
(cd "$L" && grep -H -E "test result|^(violations|corrupted checksums) |ERROR SUMMARY|^pair|^mixed|MISSED|met:|all targets|some targets|sound|problem|reserved / |threads/cache_hit/[0-9]+ +time|^ +thrpt|wrote " \
  ./*.log) >> "$S" 2>/dev/null
if [ -n "${OUT:-}" ]; then
  rm -f "$L"/*.pickle "$L/real.jsonl"
  [ -f "$L/tables.md" ] && cp "$L/tables.md" "$OUT/tables.md"
  tar -czf "$OUT/logs.tar.gz" -C "$L" .
fi
cat "$S"
