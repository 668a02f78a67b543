//! The `inflight` command-line tool.
//!
//! - `repro`: the MLX incident as a harness, per release policy
//!   ([`repro`]), on any backend ([`backends`]); `--record` writes its
//!   allocation events as a trace ([`trace`]).
//! - `replay`: a trace through the allocator, per policy ([`replay`]).
//! - `bench`: inflight's allocation fast path beside CUDA's allocators and
//!   PyTorch's, over the same sequences in one run ([`mod@bench`]).
//! - `import-torch`: a PyTorch memory snapshot as a trace
//!   ([`import_torch`]); `plot`: a trace's memory over time per policy
//!   ([`plot`]); `snapshot-check`: a memory snapshot checked as PyTorch's
//!   viewer will use it ([`snapshot::check`]). `repro` and `replay` write
//!   such snapshots with `--snapshot` ([`snapshot`]).
//!
//! The arguments several commands share, the allocator's settings among
//! them, are in [`args`]; the per-policy tables in [`table`].
//!
//! Exit codes: 0 success; 1 a safe policy (`deferred`, `retained`) showed a
//! violation or a corrupted checksum; 2 bad arguments or a failed run.

mod args;
mod backends;
mod bench;
mod import_torch;
mod input;
mod model;
mod pickle;
mod plot;
mod progress;
mod pyvalue;
mod replay;
mod repro;
mod snapshot;
mod table;
mod trace;
mod trend;
mod units;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "inflight",
    version,
    about = "A GPU buffer cache that never releases or reuses a buffer in flight"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Reproduce the MLX incident: sustained allocation with cache trimming
    /// while command buffers are in flight, under each release policy.
    Repro(repro::ReproArgs),
    /// Replay an allocation trace (JSON Lines, see docs/TRACE.md) under each
    /// release policy and report throughput, peak memory and cache behaviour.
    Replay(replay::ReplayArgs),
    /// ns per alloc + free pair of inflight (each policy) beside
    /// cuMemAllocAsync, cuMemAlloc and PyTorch's caching allocator, over the
    /// same sequences in one run.
    Bench(bench::BenchArgs),
    /// Turn a PyTorch memory snapshot (torch.cuda.memory._dump_snapshot's
    /// pickle, or JSON) into a trace for replay and plot.
    ImportTorch(import_torch::ImportArgs),
    /// Plot a trace's live, reserved and pending bytes over time under
    /// each release policy, as SVG or PNG.
    Plot(plot::PlotArgs),
    /// Check a memory snapshot (pickle or JSON) the way PyTorch's viewer
    /// will read it: fields, sizes, and the history against the segments.
    SnapshotCheck(snapshot::check::CheckArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Repro(args) => repro::command(args),
        Command::Replay(args) => replay::command(args),
        Command::Bench(args) => bench::command(args),
        Command::ImportTorch(args) => import_torch::command(args),
        Command::Plot(args) => plot::command(args),
        Command::SnapshotCheck(args) => snapshot::check::command(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("inflight: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
