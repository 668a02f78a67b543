//! Timelines and stamps: how the allocator knows what the GPU has finished.
//!
//! Each queue has a timeline. Commit assigns the values 1, 2, 3, … and the
//! backend's completion signal advances a *completed watermark*. A buffer
//! carries a [`Stamp`] — (queue, value) — of its last recorded use on each
//! queue that used it, in a [`Stamps`] set. A block is idle when every stamp is
//! at or below its queue's watermark.
//!
//! # Ordering
//!
//! Watermarks only move forward (`fetch_max`). A stamp is written at commit,
//! while the command buffer still holds a strong reference to the buffer, so a
//! free can never read a set of stamps that misses a submitted use.

use crate::sync::{AtomicU64, Ordering};

/// A queue's index inside its allocator.
pub type QueueId = u32;

/// The last recorded use of a buffer on one queue.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct Stamp {
    /// The queue.
    pub queue: QueueId,
    /// The submission's timeline value on that queue.
    pub value: u64,
}

/// The value of a use the program records on a queue's native stream
/// itself (a stream-ordered queue's allocations, [`crate::Buffer::record_stream`]):
/// the allocator does not see that work, so the use is fixed at the
/// buffer's free, as the value of the next submission on that queue, which
/// the stream runs after everything enqueued before the free.
pub const AT_FREE: u64 = u64::MAX;

/// The stamps of one buffer: at most one per queue, almost always one in all.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stamps {
    // Inline for the common single-queue case; spills to `more` for others.
    first: Option<Stamp>,
    more: Vec<Stamp>,
}

impl Stamps {
    /// Records a use on `queue` at `value`, keeping the larger value if the
    /// queue already has a stamp.
    pub fn record(&mut self, queue: QueueId, value: u64) {
        for s in self.iter_mut() {
            if s.queue == queue {
                s.value = s.value.max(value);
                return;
            }
        }
        let stamp = Stamp { queue, value };
        if self.first.is_none() {
            self.first = Some(stamp);
        } else {
            self.more.push(stamp);
        }
    }

    /// Every stamp.
    pub fn iter(&self) -> impl Iterator<Item = &Stamp> {
        self.first.iter().chain(self.more.iter())
    }

    fn iter_mut(&mut self) -> impl Iterator<Item = &mut Stamp> {
        self.first.iter_mut().chain(self.more.iter_mut())
    }

    /// Whether no use was ever recorded.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.first.is_none()
    }

    /// The stamp when there is exactly one.
    pub fn single(&self) -> Option<Stamp> {
        if self.more.is_empty() {
            self.first
        } else {
            None
        }
    }

    /// The first stamp not yet passed by `completed(queue)`, if any.
    pub fn first_incomplete(&self, mut completed: impl FnMut(QueueId) -> u64) -> Option<Stamp> {
        self.iter().copied().find(|s| s.value > completed(s.queue))
    }

    /// Whether a use is still to be fixed at the free ([`AT_FREE`]).
    #[inline]
    pub fn has_uses_at_free(&self) -> bool {
        self.iter().any(|s| s.value == AT_FREE)
    }

    /// Fixes every use recorded [`AT_FREE`] to `value(queue)`.
    pub fn resolve_at_free(&mut self, mut value: impl FnMut(QueueId) -> u64) {
        for s in self.iter_mut() {
            if s.value == AT_FREE {
                s.value = value(s.queue);
            }
        }
    }

    /// Takes the uses recorded [`AT_FREE`] out of these stamps.
    pub fn take_uses_at_free(&mut self) -> Stamps {
        let mut taken = Stamps::default();
        let kept: Vec<Stamp> = self
            .iter()
            .copied()
            .filter(|s| {
                if s.value == AT_FREE {
                    taken.record(s.queue, AT_FREE);
                    false
                } else {
                    true
                }
            })
            .collect();
        self.clear();
        for s in kept {
            self.record(s.queue, s.value);
        }
        taken
    }

    /// Forgets every stamp (after all of them completed).
    pub fn clear(&mut self) {
        self.first = None;
        self.more.clear();
    }
}

/// A queue's completed watermark, cached from the backend's signal.
#[derive(Debug, Default)]
pub struct Watermark(AtomicU64);

impl Watermark {
    /// The last value seen completed.
    #[inline]
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }

    /// Moves the watermark forward to `value` (never back); returns the new one.
    pub fn advance(&self, value: u64) -> u64 {
        self.0.fetch_max(value, Ordering::AcqRel).max(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_keeps_one_stamp_per_queue_with_the_max_value() {
        let mut s = Stamps::default();
        assert!(s.is_empty());
        s.record(0, 5);
        s.record(0, 3);
        assert_eq!(s.single(), Some(Stamp { queue: 0, value: 5 }));
        s.record(2, 1);
        assert_eq!(s.single(), None);
        assert_eq!(s.iter().count(), 2);
        let wm = [5, 0, 0];
        assert_eq!(
            s.first_incomplete(|q| wm[q as usize]),
            Some(Stamp { queue: 2, value: 1 })
        );
        let wm = [5, 0, 1];
        assert_eq!(s.first_incomplete(|q| wm[q as usize]), None);
    }

    #[test]
    fn watermark_never_goes_back() {
        let w = Watermark::default();
        assert_eq!(w.advance(4), 4);
        assert_eq!(w.advance(2), 4);
        assert_eq!(w.get(), 4);
    }
}
