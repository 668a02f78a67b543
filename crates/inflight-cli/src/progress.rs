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

/// Progress over a known number of steps (events replayed, bytes or
/// entries read), for `replay`, `plot` and `import-torch`: nothing during
/// the first second, so that short runs print nothing; then an indicatif
/// bar on a terminal, or a plain line every five seconds elsewhere;
/// nothing at all when quiet.
pub struct Steps {
    label: String,
    unit: &'static str,
    total: u64,
    quiet: bool,
    start: Instant,
    bar: Option<ProgressBar>,
    last_line: Option<Instant>,
    calls: u64,
}

impl Steps {
    /// `unit` names what is counted ("events", "entries", "bytes").
    pub fn new(label: &str, unit: &'static str, total: u64, quiet: bool) -> Self {
        Steps {
            label: label.to_string(),
            unit,
            total: total.max(1),
            quiet,
            start: Instant::now(),
            bar: None,
            last_line: None,
            calls: 0,
        }
    }

    /// `done` steps of the total are done. Cheap enough to call per step:
    /// the clock is read every 1024 calls.
    pub fn set(&mut self, done: u64) {
        self.calls += 1;
        if self.calls % 1024 == 0 {
            self.show(done);
        }
    }

    /// As [`Steps::set`], reading the clock at every call: for callers
    /// that report seldom.
    pub fn show(&mut self, done: u64) {
        if self.quiet {
            return;
        }
        let elapsed = self.start.elapsed();
        if elapsed < Duration::from_secs(1) {
            return;
        }
        if let Some(bar) = &self.bar {
            bar.set_position(done.min(self.total));
            return;
        }
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::with_draw_target(Some(self.total), ProgressDrawTarget::stderr())
                .with_elapsed(elapsed);
            bar.set_style(
                ProgressStyle::with_template(&format!(
                    "{{prefix:>10}} [{{bar:30}}] {{percent:>3}}% {{human_pos}}/{{human_len}} {}  {{elapsed}}, {{eta}} left",
                    self.unit
                ))
                .expect("a valid template")
                .progress_chars("=> "),
            );
            bar.set_prefix(self.label.clone());
            bar.set_position(done.min(self.total));
            self.bar = Some(bar);
        } else if self
            .last_line
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(5))
        {
            self.last_line = Some(Instant::now());
            eprintln!(
                "{} {:>6.1}s  {} / {} {} ({:.0}%)",
                self.label,
                elapsed.as_secs_f64(),
                done,
                self.total,
                self.unit,
                100.0 * done as f64 / self.total as f64
            );
        }
    }

    /// Clears the bar, if one was shown.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
