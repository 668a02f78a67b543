//! A Metal queue's timeline bookkeeping, in plain Rust: which values were
//! submitted, which finished (and how), and the watermark the allocator
//! reads. The Metal side feeds it; it knows nothing of Metal, so it is
//! unit-tested on any platform.
//!
//! # Two completion signals
//!
//! Each submission's command buffer ends by signalling the queue's
//! `MTLSharedEvent` with its value; the event's `signaledValue` is read by
//! [`TimelineBook::watermark`]. Each command buffer also has a completed
//! handler, which reports how it finished ([`TimelineBook::finish`]): that
//! is where failures come from, and where the watermark still advances when
//! a failed command buffer never reached its signal: the handler then
//! raises the event from the host, but only to [`TimelineBook::finished`],
//! so the event never claims a value whose predecessors may still run.
//!
//! # Watermark
//!
//! `watermark = max(finished, min(signalled, submitted))`, where `finished`
//! is the highest value whose handler, and every earlier value's, has run.
//! The event's value counts only up to the last submitted value (nothing
//! else signals it). Both terms only grow, so the watermark never goes
//! back. That `signalled >= v` means every value `<= v` is done rests on
//! the Metal side's ordering: each command buffer waits, just before its own
//! signal, for the previous value's signal (see `queue.rs`), so signals land
//! in value order even where untracked command buffers overlap on the GPU.
//!
//! # Failures
//!
//! Failures are kept in the order their handlers ran (value order on one
//! queue) for [`TimelineBook::take_failure`], at most [`KEPT_FAILURES`];
//! each submission's own [`Outcome`] keeps its failure regardless. A
//! failure that loses the device makes every later call report
//! [`DeviceError::Lost`].

use std::collections::{BTreeSet, VecDeque};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::backend::DeviceError;

/// Failures kept for `take_failure`; older ones are dropped past this (each
/// submission's own outcome still reports it).
pub const KEPT_FAILURES: usize = 1024;

/// One queue's submitted and finished values (see the module doc).
#[derive(Debug, Default)]
pub struct TimelineBook {
    /// The last value submitted; written by the submitting thread.
    submitted: u64,
    /// Every value `<= finished` has had its completed handler run.
    finished: u64,
    /// Values above `finished + 1` whose handlers ran early.
    finished_above: BTreeSet<u64>,
    /// Failures not yet taken, oldest first.
    failures: VecDeque<DeviceError>,
    /// Set by a failure that lost the device.
    lost: Option<String>,
}

impl TimelineBook {
    /// Checks that `value` may be submitted next: the device is not lost and
    /// `value` is above every value submitted so far. Returns the value
    /// submitted before it (0 for the first), the one its signal must wait
    /// for.
    pub fn check_next(&self, value: u64) -> Result<u64, DeviceError> {
        if let Some(e) = self.lost() {
            return Err(e);
        }
        if value <= self.submitted {
            return Err(DeviceError::Other(format!(
                "timeline value {value} submitted after {}: values must increase",
                self.submitted
            )));
        }
        Ok(self.submitted)
    }

    /// Records that `value` was committed (after [`Self::check_next`]).
    pub fn submitted(&mut self, value: u64) {
        debug_assert!(value > self.submitted, "checked by check_next");
        self.submitted = self.submitted.max(value);
    }

    /// Records that `value`'s completed handler ran, with the error it
    /// finished with, if any. A value reported twice, or never submitted,
    /// is ignored (returns `false`).
    pub fn finish(&mut self, value: u64, failure: Option<DeviceError>) -> bool {
        if value == 0
            || value > self.submitted
            || value <= self.finished
            || !self.finished_above.insert(value)
        {
            return false;
        }
        while self.finished_above.remove(&(self.finished + 1)) {
            self.finished += 1;
        }
        if let Some(e) = failure {
            if let DeviceError::Lost(why) = &e {
                self.lost.get_or_insert_with(|| why.clone());
            }
            if self.failures.len() == KEPT_FAILURES {
                self.failures.pop_front();
            }
            self.failures.push_back(e);
        }
        true
    }

    /// The highest value whose handler, and every earlier one's, has run.
    pub fn finished(&self) -> u64 {
        self.finished
    }

    /// The completed watermark, given the shared event's `signaledValue`
    /// (see the module doc).
    pub fn watermark(&self, signalled: u64) -> u64 {
        self.finished.max(signalled.min(self.submitted))
    }

    /// The oldest failure not yet taken.
    pub fn take_failure(&mut self) -> Option<DeviceError> {
        self.failures.pop_front()
    }

    /// [`DeviceError::Lost`] once a failure lost the device.
    pub fn lost(&self) -> Option<DeviceError> {
        self.lost.as_ref().map(|why| DeviceError::Lost(why.clone()))
    }
}

/// A timeline book with a condition variable that completed handlers
/// notify: the host-side wait where `waitUntilSignaledValue:timeoutMS:` is
/// missing (before macOS 12), and for tests.
#[derive(Debug, Default)]
pub struct Timeline {
    book: Mutex<TimelineBook>,
    cv: Condvar,
}

impl Timeline {
    /// A timeline with nothing submitted.
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs `f` on the book, under its lock.
    pub fn with<R>(&self, f: impl FnOnce(&mut TimelineBook) -> R) -> R {
        let mut book = self.book.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut book)
    }

    /// [`TimelineBook::finish`], then wakes every waiter. Returns the
    /// highest value whose handler, and every earlier one's, has run: the
    /// value the event may be raised to from the host.
    pub fn finish(&self, value: u64, failure: Option<DeviceError>) -> u64 {
        let mut book = self.book.lock().unwrap_or_else(|e| e.into_inner());
        book.finish(value, failure);
        let finished = book.finished();
        drop(book);
        self.cv.notify_all();
        finished
    }

    /// Blocks until every value `<= value` has finished (handlers only), the
    /// device is lost, or `timeout` passes; returns whether the value was
    /// reached.
    pub fn wait_finished(&self, value: u64, timeout: Duration) -> Result<bool, DeviceError> {
        let deadline = Instant::now().checked_add(timeout);
        let mut book = self.book.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if book.finished >= value {
                return Ok(true);
            }
            if let Some(e) = book.lost() {
                return Err(e);
            }
            let left = match deadline {
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => left,
                    _ => return Ok(false),
                },
                None => Duration::from_secs(3600),
            };
            book = self
                .cv
                .wait_timeout(book, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// How one submission ended: its checksums, or its error. Set once, by its
/// completed handler; read by the submission's owner.
#[derive(Debug, Default)]
pub struct Outcome {
    cell: Mutex<Option<Result<Vec<u64>, DeviceError>>>,
    cv: Condvar,
}

impl Outcome {
    /// An outcome not yet known.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records how the submission ended; the first call wins.
    pub fn set(&self, result: Result<Vec<u64>, DeviceError>) {
        let mut cell = self.cell.lock().unwrap_or_else(|e| e.into_inner());
        if cell.is_none() {
            *cell = Some(result);
        }
        drop(cell);
        self.cv.notify_all();
    }

    /// The outcome, if known.
    pub fn get(&self) -> Option<Result<Vec<u64>, DeviceError>> {
        self.cell.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The outcome, waiting for it at most `timeout`.
    pub fn wait(&self, timeout: Duration) -> Option<Result<Vec<u64>, DeviceError>> {
        let cell = self.cell.lock().unwrap_or_else(|e| e.into_inner());
        let (cell, _) = self
            .cv
            .wait_timeout_while(cell, timeout, |c| c.is_none())
            .unwrap_or_else(|e| e.into_inner());
        cell.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn failed(value: u64) -> DeviceError {
        DeviceError::SubmissionFailed {
            value,
            reason: "test".into(),
        }
    }

    #[test]
    fn values_must_increase() {
        let mut b = TimelineBook::default();
        assert_eq!(b.check_next(1), Ok(0));
        b.submitted(1);
        assert_eq!(b.check_next(2), Ok(1));
        assert!(b.check_next(1).is_err());
        b.submitted(2);
        // A gap is allowed: the signal waits for the last value submitted.
        assert_eq!(b.check_next(5), Ok(2));
    }

    #[test]
    fn the_watermark_is_the_event_up_to_the_last_submitted_value() {
        let mut b = TimelineBook::default();
        assert_eq!(b.watermark(0), 0);
        b.submitted(1);
        b.submitted(2);
        b.submitted(3);
        assert_eq!(b.watermark(2), 2);
        // Nothing else signals the event, but a stray value is clamped.
        assert_eq!(b.watermark(9), 3);
        // A handler ahead of the event (a failed buffer that never reached
        // its signal) carries the watermark.
        assert!(b.finish(1, None));
        assert!(b.finish(2, Some(failed(2))));
        assert_eq!(b.watermark(1), 2);
    }

    #[test]
    fn handlers_out_of_order_advance_only_a_contiguous_prefix() {
        let mut b = TimelineBook::default();
        for v in 1..=4 {
            b.submitted(v);
        }
        assert!(b.finish(2, None));
        assert!(b.finish(4, None));
        assert_eq!(b.finished(), 0);
        assert!(b.finish(1, None));
        assert_eq!(b.finished(), 2);
        assert!(b.finish(3, None));
        assert_eq!(b.finished(), 4);
    }

    #[test]
    fn duplicate_and_unsubmitted_values_are_ignored() {
        let mut b = TimelineBook::default();
        b.submitted(1);
        assert!(!b.finish(0, None));
        assert!(!b.finish(2, Some(failed(2))));
        assert!(b.finish(1, None));
        assert!(!b.finish(1, Some(failed(1))));
        assert_eq!(b.take_failure(), None);
    }

    #[test]
    fn failures_are_taken_in_order_and_counted_as_completed() {
        let mut b = TimelineBook::default();
        for v in 1..=3 {
            b.submitted(v);
        }
        b.finish(1, Some(failed(1)));
        b.finish(2, None);
        b.finish(3, Some(failed(3)));
        assert_eq!(b.watermark(0), 3);
        assert_eq!(b.take_failure(), Some(failed(1)));
        assert_eq!(b.take_failure(), Some(failed(3)));
        assert_eq!(b.take_failure(), None);
    }

    #[test]
    fn kept_failures_are_bounded() {
        let mut b = TimelineBook::default();
        let n = KEPT_FAILURES as u64 + 5;
        for v in 1..=n {
            b.submitted(v);
            b.finish(v, Some(failed(v)));
        }
        assert_eq!(b.take_failure(), Some(failed(6)));
    }

    #[test]
    fn a_lost_device_refuses_submissions() {
        let mut b = TimelineBook::default();
        b.submitted(1);
        b.finish(1, Some(DeviceError::Lost("removed".into())));
        assert_eq!(b.lost(), Some(DeviceError::Lost("removed".into())));
        assert!(matches!(b.check_next(2), Err(DeviceError::Lost(_))));
        // The failure is also reported once through take_failure.
        assert!(matches!(b.take_failure(), Some(DeviceError::Lost(_))));
    }

    #[test]
    fn waiters_wake_when_a_handler_finishes_the_value() {
        let t = Arc::new(Timeline::new());
        t.with(|b| {
            b.submitted(1);
            b.submitted(2)
        });
        assert_eq!(t.wait_finished(1, Duration::ZERO), Ok(false));
        let t2 = t.clone();
        let h = std::thread::spawn(move || t2.wait_finished(2, Duration::from_secs(30)));
        assert_eq!(t.finish(2, None), 0, "1 has not finished");
        assert_eq!(t.finish(1, None), 2);
        assert_eq!(h.join().unwrap(), Ok(true));
        // Unsubmitted values time out.
        assert_eq!(t.wait_finished(3, Duration::from_millis(20)), Ok(false));
    }

    #[test]
    fn waiters_learn_of_a_lost_device() {
        let t = Arc::new(Timeline::new());
        t.with(|b| {
            b.submitted(1);
            b.submitted(2)
        });
        let t2 = t.clone();
        let h = std::thread::spawn(move || t2.wait_finished(2, Duration::MAX));
        t.finish(1, Some(DeviceError::Lost("gone".into())));
        assert!(matches!(h.join().unwrap(), Err(DeviceError::Lost(_))));
    }

    #[test]
    fn an_outcome_is_set_once_and_waited_for() {
        let o = Arc::new(Outcome::new());
        assert_eq!(o.get(), None);
        assert_eq!(o.wait(Duration::from_millis(5)), None);
        let o2 = o.clone();
        let h = std::thread::spawn(move || o2.wait(Duration::from_secs(30)));
        o.set(Ok(vec![1, 2]));
        o.set(Err(failed(1)));
        assert_eq!(h.join().unwrap(), Some(Ok(vec![1, 2])));
        assert_eq!(o.get(), Some(Ok(vec![1, 2])));
    }
}
