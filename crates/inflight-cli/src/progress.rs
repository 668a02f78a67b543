//! Progress on long runs: an indicatif bar on a terminal, a plain line every
//! five seconds elsewhere (CI logs), nothing with `--quiet`.

use std::io::IsTerminal;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use inflight::Stats;

use crate::repro::Live;
use crate::units::fmt_bytes;

/// What the run is measured against: a count of allocations or a duration.
pub enum Goal {
    Allocations(u64),
    Duration(Duration),
}

pub struct Progress {
    bar: Option<ProgressBar>,
    plain: bool,
    label: String,
    goal: Goal,
    start: Instant,
    last_line: Instant,
}

impl Progress {
    pub fn new(label: &str, goal: Goal, quiet: bool) -> Self {
        let terminal = std::io::stderr().is_terminal();
        let bar = (!quiet && terminal).then(|| {
            let len = match goal {
                Goal::Allocations(n) => n,
                Goal::Duration(d) => d.as_millis() as u64,
            };
            let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template("{prefix:>10} [{bar:30}] {percent:>3}% {msg}")
                    .expect("a valid template")
                    .progress_chars("=> "),
            );
            bar.set_prefix(label.to_string());
            bar
        });
        Progress {
            bar,
            plain: !quiet && !terminal,
            label: label.to_string(),
            goal,
            start: Instant::now(),
            last_line: Instant::now(),
        }
    }

    pub fn update(&mut self, live: &Live, stats: &Stats, violations: u64) {
        let elapsed = self.start.elapsed().as_secs_f64().max(1e-9);
        let rounds = live.rounds.load(Ordering::Relaxed);
        let allocs = live.allocations.load(Ordering::Relaxed);
        let msg = format!(
            "{:.0} rounds/s  {} allocs  violations {}  corrupt {}  active {}  reserved {}",
            rounds as f64 / elapsed,
            allocs,
            violations,
            live.corruptions.load(Ordering::Relaxed),
            fmt_bytes(stats.active_bytes),
            fmt_bytes(stats.reserved_bytes),
        );
        if let Some(bar) = &self.bar {
            bar.set_position(match self.goal {
                Goal::Allocations(_) => allocs,
                Goal::Duration(_) => self.start.elapsed().as_millis() as u64,
            });
            bar.set_message(msg);
        } else if self.plain && self.last_line.elapsed() >= Duration::from_secs(5) {
            self.last_line = Instant::now();
            eprintln!("{} {:>6.1}s  {msg}", self.label, elapsed);
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
