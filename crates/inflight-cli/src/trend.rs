//! The memory trend of a timed `repro` run (a soak): reserved, pending, ready
//! and active bytes sampled at every watcher tick, summarised per interval
//! (a minute, or a tenth of the run if shorter), and the first interval
//! compared with the last. Flat means the last interval's mean reserved bytes
//! are within [`FLAT_TOLERANCE`] of the first's: no growth of what the
//! allocator holds over the run.

use std::time::Duration;

use inflight::Stats;
use serde::Serialize;

use crate::units::fmt_bytes;

/// How far the last interval's mean reserved bytes may be from the first's.
pub const FLAT_TOLERANCE: f64 = 0.05;

/// One interval's figures: means and maxima of its samples.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TrendPoint {
    pub start_seconds: f64,
    pub end_seconds: f64,
    pub samples: u64,
    pub reserved_mean: u64,
    pub reserved_max: u64,
    pub pending_mean: u64,
    pub pending_max: u64,
    pub ready_mean: u64,
    pub active_mean: u64,
}

/// The whole trend, with its verdict.
#[derive(Clone, Debug, Serialize)]
pub struct Trend {
    pub interval_seconds: f64,
    pub points: Vec<TrendPoint>,
    pub memory_limit: u64,
    /// The highest reserved bytes sampled.
    pub reserved_max: u64,
    /// (last − first) / first of the interval means, for each figure.
    pub reserved_change: f64,
    pub pending_change: f64,
    pub ready_change: f64,
    /// The same for reserved bytes, second interval against the last: the
    /// change once the first interval's warm-up (an empty cache filling) is
    /// left out. Reported beside, never instead of, `reserved_change`.
    pub reserved_change_after_warmup: f64,
    /// Reserved stayed under the memory limit and its first and last
    /// interval means are within [`FLAT_TOLERANCE`].
    pub flat: bool,
}

/// Accumulates samples into intervals.
pub struct TrendRecorder {
    interval: Duration,
    points: Vec<TrendPoint>,
    sums: [u128; 4],
    current: TrendPoint,
}

impl TrendRecorder {
    /// Intervals of a minute, or a tenth of `duration` if that is shorter.
    pub fn new(duration: Duration) -> Self {
        let interval = (duration / 10).clamp(Duration::from_millis(500), Duration::from_secs(60));
        TrendRecorder {
            interval,
            points: Vec::new(),
            sums: [0; 4],
            current: TrendPoint::default(),
        }
    }

    /// Adds a sample taken `at` into the run; returns a finished interval.
    pub fn sample(&mut self, at: Duration, s: &Stats) -> Option<TrendPoint> {
        let mut done = None;
        let index = (at.as_nanos() / self.interval.as_nanos()) as f64;
        let start = index * self.interval.as_secs_f64();
        if self.current.samples > 0 && start > self.current.start_seconds {
            done = Some(self.close());
        }
        if self.current.samples == 0 {
            self.current.start_seconds = start;
        }
        let c = &mut self.current;
        c.samples += 1;
        c.end_seconds = at.as_secs_f64();
        c.reserved_max = c.reserved_max.max(s.reserved_bytes);
        c.pending_max = c.pending_max.max(s.pending_bytes);
        for (sum, v) in self.sums.iter_mut().zip([
            s.reserved_bytes,
            s.pending_bytes,
            s.ready_bytes,
            s.active_bytes,
        ]) {
            *sum += u128::from(v);
        }
        done
    }

    fn close(&mut self) -> TrendPoint {
        let mut p = std::mem::take(&mut self.current);
        let n = u128::from(p.samples.max(1));
        let mean = |x: u128| (x / n) as u64;
        p.reserved_mean = mean(self.sums[0]);
        p.pending_mean = mean(self.sums[1]);
        p.ready_mean = mean(self.sums[2]);
        p.active_mean = mean(self.sums[3]);
        self.sums = [0; 4];
        self.points.push(p.clone());
        p
    }

    /// Closes the last interval and judges the trend. The last interval is
    /// dropped if it is under half an interval long (a run's tail), unless
    /// it is the only one.
    pub fn finish(mut self, memory_limit: u64) -> Trend {
        if self.current.samples > 0 {
            self.close();
        }
        let half = self.interval.as_secs_f64() / 2.0;
        if self.points.len() > 2 {
            let last = self.points.last().expect("non-empty");
            if last.end_seconds - last.start_seconds < half {
                self.points.pop();
            }
        }
        let second = self.points.get(1).or(self.points.first());
        let reserved_change_after_warmup = match (second, self.points.last()) {
            (Some(a), Some(b)) if a.reserved_mean > 0 => {
                (b.reserved_mean as f64 - a.reserved_mean as f64) / a.reserved_mean as f64
            }
            _ => 0.0,
        };
        let change = |f: fn(&TrendPoint) -> u64| match (self.points.first(), self.points.last()) {
            (Some(a), Some(b)) if f(a) > 0 => (f(b) as f64 - f(a) as f64) / f(a) as f64,
            (Some(a), Some(b)) if f(a) == f(b) => 0.0,
            (Some(_), Some(_)) => f64::INFINITY,
            _ => 0.0,
        };
        let reserved_max = self
            .points
            .iter()
            .map(|p| p.reserved_max)
            .max()
            .unwrap_or(0);
        let reserved_change = change(|p| p.reserved_mean);
        Trend {
            interval_seconds: self.interval.as_secs_f64(),
            memory_limit,
            reserved_max,
            reserved_change,
            pending_change: change(|p| p.pending_mean),
            ready_change: change(|p| p.ready_mean),
            reserved_change_after_warmup,
            flat: reserved_max <= memory_limit && reserved_change.abs() <= FLAT_TOLERANCE,
            points: self.points,
        }
    }
}

/// One line of the trend, as printed.
pub fn line(p: &TrendPoint) -> String {
    format!(
        "{:>7.1}s..{:>7.1}s  reserved {:>10} (max {:>10})  pending {:>10} (max {:>10})  ready {:>10}  active {:>10}",
        p.start_seconds,
        p.end_seconds,
        fmt_bytes(p.reserved_mean),
        fmt_bytes(p.reserved_max),
        fmt_bytes(p.pending_mean),
        fmt_bytes(p.pending_max),
        fmt_bytes(p.ready_mean),
        fmt_bytes(p.active_mean),
    )
}

/// The summary lines, as printed.
pub fn summary(t: &Trend) -> String {
    let pct = |x: f64| format!("{:+.1}%", 100.0 * x);
    format!(
        "trend: first vs last interval: reserved {}, pending {}, ready {} (second vs last: reserved {}); max reserved {} of limit {}; {}",
        pct(t.reserved_change),
        pct(t.pending_change),
        pct(t.ready_change),
        pct(t.reserved_change_after_warmup),
        fmt_bytes(t.reserved_max),
        fmt_bytes(t.memory_limit),
        if t.flat {
            "flat (within 5%, under the limit)"
        } else {
            "NOT FLAT"
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(reserved: u64) -> Stats {
        Stats {
            reserved_bytes: reserved,
            ready_bytes: reserved / 2,
            pending_bytes: reserved / 4,
            ..Stats::default()
        }
    }

    #[test]
    fn a_steady_run_is_flat_and_a_growing_one_is_not() {
        let mut r = TrendRecorder::new(Duration::from_secs(10));
        for i in 0..100u64 {
            r.sample(Duration::from_millis(100 * i), &stats(1000 + i % 3));
        }
        let t = r.finish(2000);
        assert_eq!(t.points.len(), 10);
        assert!(t.flat, "{t:?}");

        let mut r = TrendRecorder::new(Duration::from_secs(10));
        for i in 0..100u64 {
            r.sample(Duration::from_millis(100 * i), &stats(1000 + 10 * i));
        }
        let t = r.finish(1 << 20);
        assert!(!t.flat && t.reserved_change > 0.5, "{t:?}");

        let mut r = TrendRecorder::new(Duration::from_secs(10));
        r.sample(Duration::ZERO, &stats(3000));
        assert!(!r.finish(2000).flat, "over the limit");
    }
}
