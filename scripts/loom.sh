#!/usr/bin/env bash
# Model-checks the allocator's shared state with loom (crates/inflight/tests/loom.rs)
# and the front caches' biased lock (crates/inflight/src/biased.rs).
# The cfg swaps the core's mutexes and atomics for loom's (src/sync.rs); a
# separate target directory keeps that build from invalidating the normal one.
# Lint the models with: RUSTFLAGS="--cfg inflight_loom" CARGO_TARGET_DIR=target/loom \
#   cargo clippy -p inflight --release --test loom -- -D warnings
set -euo pipefail
cd "$(dirname "$0")/.."
export RUSTFLAGS="--cfg inflight_loom ${RUSTFLAGS:-}"
export LOOM_MAX_PREEMPTIONS="${LOOM_MAX_PREEMPTIONS:-2}"
# A miss that grows visits every front-cache slot (one lock each): more
# branches in one execution than loom's default allows.
export LOOM_MAX_BRANCHES="${LOOM_MAX_BRANCHES:-20000}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/loom}"
# The biased lock's own models (src/biased.rs) and rule S2's handshake
# (src/buffer.rs), then the allocator's.
cargo test -p inflight --release --lib -- --nocapture biased:: buffer::loom_models
exec cargo test -p inflight --release --test loom "$@"
