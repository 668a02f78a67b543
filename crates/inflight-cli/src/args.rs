//! The arguments several commands share, each written once: the release
//! policy ([`PolicyArg`]), the allocator's settings ([`ConfigArgs`], which
//! builds the [`inflight::Config`] of every command that makes an
//! allocator), and `--snapshot` ([`SnapshotArgs`]). Sizes and durations
//! are parsed by [`crate::units`]; the backend is chosen by
//! [`crate::backends::BackendName`].

use std::path::PathBuf;
use std::time::Duration;

use clap::builder::RangedU64ValueParser;
use inflight::{Config, Policy, PolicyKind};

use crate::snapshot::{SnapshotFormat, SnapshotRequest};
use crate::units::{parse_bytes, parse_duration};

/// `--policy`: one release policy, or the three side by side.
#[derive(Copy, Clone, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PolicyArg {
    Deferred,
    Retained,
    Immediate,
    All,
}

/// The policies `p` names, in the tables' order.
pub fn policies(p: PolicyArg) -> Vec<Policy> {
    match p {
        PolicyArg::Deferred => vec![Policy::DEFERRED],
        PolicyArg::Retained => vec![Policy::RETAINED],
        // SAFETY: `Policy::immediate`'s contract (1): releasing in flight is
        // the defect this harness exists to show; on the simulated GPU it is
        // caught by the validation layer, and other backends run it only
        // where their validation layer or a child process contains it.
        PolicyArg::Immediate => vec![unsafe { Policy::immediate() }],
        // SAFETY: as above.
        PolicyArg::All => vec![Policy::DEFERRED, Policy::RETAINED, unsafe {
            Policy::immediate()
        }],
    }
}

/// `--faults`: a rate from 0 to 1.
pub fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("{s:?} is not a rate from 0 to 1")),
    }
}

/// The allocator's settings, for every command that builds an
/// [`inflight::Config`] (`repro`, `replay`, `plot`, `bench`). A setting
/// left out keeps the command's default, else the library's.
#[derive(clap::Args, Clone, Debug, Default)]
#[command(next_help_heading = "Allocator settings")]
pub struct ConfigArgs {
    /// Memory limit: reserved bytes never pass it [default: repro 4 GiB,
    /// at most 3/4 of the device's memory (lavapipe has a 2 GiB heap);
    /// replay and plot 64 GiB, which the simulated GPU then has; bench 95%
    /// of the device's memory].
    #[arg(long, value_parser = parse_bytes)]
    pub memory_limit: Option<u64>,
    /// Cache limit: releasable free bytes are trimmed to it [default: repro
    /// 256 MiB, small so that trimming fires constantly; elsewhere the
    /// memory limit].
    #[arg(long, value_parser = parse_bytes)]
    pub cache_limit: Option<u64>,
    /// GC limit: idle blocks are trimmed before growing past it [default:
    /// 95% of the memory limit].
    #[arg(long, value_parser = parse_bytes)]
    pub gc_limit: Option<u64>,
    /// The longest an allocation under memory pressure waits for in-flight
    /// work before failing (e.g. 500ms, 10s) [default: 10s].
    #[arg(long, value_parser = parse_duration)]
    pub pressure_timeout: Option<Duration>,
    /// Zero every recycled buffer for its new owner (multi-tenant
    /// scrubbing, `Config::scrub`).
    #[arg(long)]
    pub scrub: bool,
    /// Grow pools by fixed segments only, never by mapping pages into a
    /// growable one (`Config::growable = false`).
    #[arg(long)]
    pub no_growable: bool,
    #[cfg(feature = "experimental")]
    #[command(flatten)]
    pub experiments: ExperimentArgs,
}

impl ConfigArgs {
    /// The allocator's configuration under `policy`: the library's defaults
    /// with every setting given here. Commands fill in their own defaults
    /// for limits left out.
    pub fn config(&self, policy: Policy) -> Config {
        let mut c = Config::default()
            .with_policy(policy)
            .with_scrub(self.scrub)
            .with_growable(!self.no_growable);
        if let Some(b) = self.memory_limit {
            c = c.with_memory_limit(b);
        }
        if let Some(b) = self.cache_limit {
            c = c.with_cache_limit(b);
        }
        if let Some(b) = self.gc_limit {
            c = c.with_gc_limit(b);
        }
        if let Some(t) = self.pressure_timeout {
            c = c.with_pressure_timeout(t);
        }
        #[cfg(feature = "experimental")]
        {
            c = self.experiments.apply(c);
        }
        c
    }
}

/// Refuses limits that contradict each other, naming the flags, before
/// anything runs (the library would refuse them too, less plainly).
pub fn check_limits(c: &Config) -> anyhow::Result<()> {
    if let Some(m) = c.memory_limit {
        if m == 0 {
            anyhow::bail!("--memory-limit must be above 0");
        }
        if c.cache_limit.is_some_and(|x| x > m) {
            anyhow::bail!("--cache-limit must be at most --memory-limit");
        }
        if c.gc_limit.is_some_and(|x| x > m) {
            anyhow::bail!("--gc-limit must be at most --memory-limit");
        }
    }
    if c.gc_limit == Some(0) {
        anyhow::bail!("--gc-limit must be above 0");
    }
    Ok(())
}

/// The switches that measure one mechanism against its absence (the
/// library's `experimental` settings; this crate's `experimental` feature).
#[cfg(feature = "experimental")]
#[derive(clap::Args, Clone, Debug)]
#[command(next_help_heading = "Experiments (feature `experimental`)")]
pub struct ExperimentArgs {
    /// Keep no idle blocks in per-thread front caches: every allocation and
    /// free goes through the shared lists (`Config::front_cache = false`).
    #[arg(long)]
    pub no_front_cache: bool,
    /// Never hand a block still in flight to a new buffer, even on its own
    /// in-order queue (`Config::in_order_reuse = false`).
    #[arg(long)]
    pub no_in_order_reuse: bool,
    /// Who waits when a buffer reused in order is bound on another queue
    /// before the previous owner's work is done (`Config::reuse_wait`).
    #[arg(long, value_enum, default_value_t = ReuseWaitArg::Adaptive)]
    pub reuse_wait: ReuseWaitArg,
    /// Never give such a buffer another block instead of waiting, even if
    /// nothing has seen its block yet (`Config::rebind_unseen = false`).
    #[arg(long)]
    pub no_rebind: bool,
    /// Size classes per doubling (`Config::size_classes`; 0: whole pages).
    #[arg(long, default_value_t = inflight::DEFAULT_SIZE_CLASSES, value_parser = parse_size_classes)]
    pub size_classes: u64,
}

#[cfg(feature = "experimental")]
impl Default for ExperimentArgs {
    fn default() -> Self {
        ExperimentArgs {
            no_front_cache: false,
            no_in_order_reuse: false,
            reuse_wait: ReuseWaitArg::Adaptive,
            no_rebind: false,
            size_classes: inflight::DEFAULT_SIZE_CLASSES,
        }
    }
}

#[cfg(feature = "experimental")]
impl ExperimentArgs {
    fn apply(&self, c: Config) -> Config {
        c.with_front_cache(!self.no_front_cache)
            .with_in_order_reuse(!self.no_in_order_reuse)
            .with_reuse_wait(match self.reuse_wait {
                ReuseWaitArg::Adaptive => inflight::ReuseWait::Adaptive,
                ReuseWaitArg::Host => inflight::ReuseWait::Host,
                ReuseWaitArg::Device => inflight::ReuseWait::Device,
            })
            .with_rebind_unseen(!self.no_rebind)
            .with_size_classes(self.size_classes)
    }
}

/// `--reuse-wait`.
#[cfg(feature = "experimental")]
#[derive(Copy, Clone, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ReuseWaitArg {
    /// The thread waits until the other queue has enough work queued ahead,
    /// then that queue waits for the rest (the default).
    Adaptive,
    /// The binding thread waits for all of it.
    Host,
    /// The other queue waits, on the device where the backend can.
    Device,
}

/// `--size-classes`: 0 or a power of two up to 1024.
#[cfg(feature = "experimental")]
fn parse_size_classes(s: &str) -> Result<u64, String> {
    let n: u64 = s.parse().map_err(|e| format!("{e}"))?;
    if Config::valid_size_classes(n) {
        Ok(n)
    } else {
        Err("must be 0 or a power of two up to 1024".into())
    }
}

/// History events a snapshot keeps by default (the oldest are dropped
/// first): about 32 MiB of history, and room for the whole of a run of a
/// few hundred thousand allocations (each takes three or four events).
pub const DEFAULT_SNAPSHOT_EVENTS: usize = 1_000_000;

/// `--snapshot FILE` and `--snapshot-events N`, for `repro` and `replay`.
#[derive(clap::Args, Clone, Debug)]
#[command(next_help_heading = "Memory snapshot")]
pub struct SnapshotArgs {
    /// At the end of each policy's run, write a memory snapshot in
    /// PyTorch's format (docs/SNAPSHOTS.md) to FILE: a pickle for
    /// pytorch.org/memory_viz if it ends in .pickle, JSON if in .json.
    /// With several policies, one file each, the policy's name put before
    /// the extension (x.pickle: x.deferred.pickle, x.retained.pickle,
    /// x.immediate.pickle). Recording the history makes allocations and
    /// frees skip the per-thread front caches: runs are slower.
    #[arg(long, value_name = "FILE")]
    pub snapshot: Option<PathBuf>,
    /// The most history events a snapshot keeps; the oldest are dropped
    /// first (`snapshot-check` then counts frees whose earlier events
    /// were dropped).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_SNAPSHOT_EVENTS,
          value_parser = RangedU64ValueParser::<usize>::new().range(1..))]
    pub snapshot_events: usize,
}

impl SnapshotArgs {
    /// What to write for `policy`'s run, of the `all` policies run: `None`
    /// without `--snapshot`. Checks the file's extension, so that a bad
    /// name fails before the run.
    pub fn request(
        &self,
        policy: PolicyKind,
        all: &[Policy],
    ) -> anyhow::Result<Option<SnapshotRequest>> {
        let Some(path) = &self.snapshot else {
            return Ok(None);
        };
        SnapshotFormat::of(path)?;
        let path = if all.len() > 1 {
            crate::snapshot::path_for_policy(path, policy)
        } else {
            path.clone()
        };
        Ok(Some(SnapshotRequest {
            path,
            max_events: self.snapshot_events,
        }))
    }

    /// With `--snapshot`: checks the name and says on stderr that
    /// recording slows the run.
    pub fn announce(&self) -> anyhow::Result<()> {
        if let Some(path) = &self.snapshot {
            SnapshotFormat::of(path)?;
            eprintln!(
                "inflight: --snapshot records the allocator's history: allocations and frees skip the per-thread front caches, so the run is slower"
            );
        }
        Ok(())
    }
}
