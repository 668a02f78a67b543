//! Fault injection for the simulated GPU: what a real device does wrong.
//!
//! Three kinds, all off by default ([`Faults::default`]) and all drawn from
//! their own seed, so that a run with faults is as reproducible as one
//! without:
//!
//! - **Refused allocations**: a raw allocation fails with
//!   [`DeviceError::OutOfMemory`] at [`Faults::alloc_failure_rate`].
//! - **Failed submissions**: a submission completes *with an error* at
//!   [`Faults::submit_failure_rate`]. The executor runs a seeded prefix of its
//!   operations (a fault part-way through, as a real kernel fault), then
//!   finishes it: its in-flight marks drop and the watermark advances, because
//!   its work is over. The error is reported twice: on the queue, through
//!   [`crate::Backend::take_failure`], and on the submission itself, through
//!   [`crate::Backend::submission_failure`] and [`crate::Harness::results`].
//! - **Device loss**: after [`Faults::lose_after_submissions`] accepted
//!   submissions or [`Faults::lose_after`] of device time, whichever comes
//!   first. A lost device completes nothing more and refuses every call but
//!   `release`; work in flight stays in flight for ever (its memory must never
//!   be released: the allocator leaks it rather than break I1).
//!
//! [`Injected`] counts what was injected, for the harness to compare with
//! what the allocator reported.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::backend::DeviceError;

/// Which faults the simulated GPU injects (see the module documentation).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Faults {
    /// Share of raw allocations refused with out-of-memory, 0.0 to 1.0.
    pub alloc_failure_rate: f64,
    /// Share of submissions that complete with an error, 0.0 to 1.0.
    pub submit_failure_rate: f64,
    /// Lose the device once this many submissions were accepted.
    pub lose_after_submissions: Option<u64>,
    /// Lose the device this long after it was created.
    pub lose_after: Option<Duration>,
    /// Seed of every draw (independent of the timing jitter's seed).
    pub seed: u64,
}

impl Faults {
    /// Refused allocations and failed submissions, both at `rate`.
    pub fn at_rate(rate: f64, seed: u64) -> Self {
        Faults {
            alloc_failure_rate: rate,
            submit_failure_rate: rate,
            seed,
            ..Faults::default()
        }
    }

    /// Whether any fault is configured.
    pub fn any(&self) -> bool {
        self.alloc_failure_rate > 0.0
            || self.submit_failure_rate > 0.0
            || self.lose_after_submissions.is_some()
            || self.lose_after.is_some()
    }
}

/// What the simulated GPU has injected so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Injected {
    /// Raw allocations refused.
    pub alloc_failures: u64,
    /// Submissions completed with an error.
    pub submission_failures: u64,
    /// Whether the device was lost.
    pub device_lost: bool,
}

/// The injector's counters and draws.
#[derive(Default)]
pub(crate) struct Injector {
    pub(crate) faults: Faults,
    allocs_drawn: AtomicU64,
    pub(crate) alloc_failures: AtomicU64,
    pub(crate) submission_failures: AtomicU64,
    pub(crate) submissions: AtomicU64,
}

/// Stream ids, so that the three draws never share values.
const ALLOC_STREAM: u64 = 0xA110_C000;
const SUBMIT_STREAM: u64 = 0x5B17_0000;

impl Injector {
    pub(crate) fn new(faults: Faults) -> Self {
        Injector {
            faults,
            ..Injector::default()
        }
    }

    /// Whether this raw allocation is refused (counts it if so).
    pub(crate) fn refuse_allocation(&self) -> bool {
        let rate = self.faults.alloc_failure_rate;
        if rate <= 0.0 {
            return false;
        }
        let n = self.allocs_drawn.fetch_add(1, Ordering::Relaxed);
        let refused = unit(mix(self.faults.seed ^ ALLOC_STREAM, n)) < rate;
        if refused {
            self.alloc_failures.fetch_add(1, Ordering::Relaxed);
        }
        refused
    }

    /// If submission `value` on queue `queue` fails: after how many of its
    /// `ops` operations. A pure function of the seed, queue and value.
    pub(crate) fn submission_fault(&self, queue: u32, value: u64, ops: usize) -> Option<usize> {
        let rate = self.faults.submit_failure_rate;
        if rate <= 0.0 {
            return None;
        }
        let h = mix(
            self.faults.seed ^ SUBMIT_STREAM ^ (u64::from(queue) << 48),
            value,
        );
        (unit(h) < rate).then(|| (mix(h, 1) % (ops as u64 + 1)) as usize)
    }

    /// Counts an accepted submission; true if the device is lost by it.
    pub(crate) fn count_submission(&self) -> bool {
        let n = self.submissions.fetch_add(1, Ordering::Relaxed) + 1;
        self.faults
            .lose_after_submissions
            .is_some_and(|max| n >= max)
    }

    /// The error a failed submission reports.
    pub(crate) fn submission_error(queue: u32, value: u64, ran: usize, ops: usize) -> DeviceError {
        DeviceError::SubmissionFailed {
            value,
            reason: format!(
                "injected fault on simulated queue {queue} after {ran} of {ops} operations"
            ),
        }
    }
}

/// SplitMix64's finaliser over `seed + n`: a seeded, stateless draw.
fn mix(seed: u64, n: u64) -> u64 {
    let mut z = seed.wrapping_add(n.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A draw in [0, 1).
fn unit(h: u64) -> f64 {
    (h >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_met_within_tolerance_and_draws_are_reproducible() {
        let inj = Injector::new(Faults::at_rate(0.01, 3));
        let refused = (0..100_000).filter(|_| inj.refuse_allocation()).count();
        assert!((800..1200).contains(&refused), "{refused} of 100000");
        assert_eq!(inj.alloc_failures.load(Ordering::Relaxed), refused as u64);
        let failed: Vec<u64> = (1..100_000)
            .filter(|&v| inj.submission_fault(1, v, 5).is_some())
            .collect();
        assert!((800..1200).contains(&failed.len()), "{}", failed.len());
        let again: Vec<u64> = (1..100_000)
            .filter(|&v| inj.submission_fault(1, v, 5).is_some())
            .collect();
        assert_eq!(failed, again);
        assert!(failed
            .iter()
            .all(|&v| inj.submission_fault(1, v, 5).is_some_and(|k| k <= 5)));
    }

    #[test]
    fn no_faults_by_default() {
        let inj = Injector::new(Faults::default());
        assert!(!Faults::default().any());
        assert!((0..10_000).all(|_| !inj.refuse_allocation()));
        assert!((1..10_000).all(|v| inj.submission_fault(0, v, 3).is_none()));
        assert!((0..10_000).all(|_| !inj.count_submission()));
    }
}
