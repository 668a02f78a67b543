//! Logical queues: a timeline semaphore each, submitting to the device's one
//! hardware queue, with the encoders of their submissions.
//!
//! # Timeline
//!
//! Each submission signals the queue's timeline semaphore with its value;
//! the completed watermark is the semaphore's counter value, and waiting is
//! `vkWaitSemaphores`. A timeline semaphore's counter only grows, and values
//! are signalled in submission order, so the counter is the watermark the
//! trait asks for.
//!
//! # Encoder recycling
//!
//! Submitted encoders wait on `in_flight`, in value order. [`QueueInner::reclaim`]
//! (called from `begin`, `completed` and `results`) pops those whose value
//! the counter has passed, copies their checksums into their submissions'
//! result cells, resets them, and puts them on the free list. No encoder is
//! reset or destroyed before its value completes.
//!
//! Lock order: `state`, then the device's `queue`.

use std::collections::VecDeque;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ash::vk;
use parking_lot::Mutex;

use super::device::DeviceShared;
use super::encoder::Encoder;
use super::raw::{self, VkError};

/// Idle encoders kept per queue; more are destroyed.
const MAX_FREE_ENCODERS: usize = 32;
/// How long dropping a queue waits for its submissions before leaking them.
const TEARDOWN_WAIT: Duration = Duration::from_secs(60);

/// The checksums of one submission, filled when it is reclaimed.
pub(crate) type ResultCell = Arc<OnceLock<Vec<u64>>>;

/// A submitted encoder waiting for its value.
struct EncoderInFlight {
    value: u64,
    encoder: Encoder,
    results: ResultCell,
}

#[derive(Default)]
struct QueueState {
    free: Vec<Encoder>,
    in_flight: VecDeque<EncoderInFlight>,
    last_submitted: u64,
}

/// One logical queue.
pub(crate) struct QueueInner {
    pub(crate) dev: Arc<DeviceShared>,
    timeline: vk::Semaphore,
    state: Mutex<QueueState>,
}

impl QueueInner {
    pub(crate) fn new(dev: Arc<DeviceShared>) -> Result<QueueInner, VkError> {
        // SAFETY: the device is live and has timeline semaphores enabled.
        let timeline = unsafe { raw::create_timeline(&dev.device) }?;
        Ok(QueueInner {
            dev,
            timeline,
            state: Mutex::new(QueueState::default()),
        })
    }

    /// The timeline's counter value.
    pub(crate) fn counter(&self) -> Result<u64, VkError> {
        // SAFETY: `timeline` is ours and live until `Drop`.
        unsafe { raw::counter_value(&self.dev.device, self.timeline) }
    }

    /// Waits for `value`; whether it was reached.
    pub(crate) fn wait(&self, value: u64, timeout: Duration) -> Result<bool, VkError> {
        let ns = u64::try_from(timeout.as_nanos()).unwrap_or(u64::MAX);
        // SAFETY: as in `counter`.
        unsafe { raw::wait_timeline(&self.dev.device, self.timeline, value, ns) }
    }

    /// An encoder ready to record: a reclaimed one, else a new one.
    pub(crate) fn take_encoder(&self) -> Result<Encoder, VkError> {
        let done = self.counter()?;
        let recycled = {
            let mut st = self.state.lock();
            self.reclaim_locked(&mut st, done)?;
            st.free.pop()
        };
        let mut enc = match recycled {
            Some(e) => e,
            None => Encoder::new(&self.dev)?,
        };
        enc.zero_results();
        if let Err(e) = enc.begin(&self.dev) {
            // SAFETY: the encoder is not pending.
            unsafe { enc.destroy(&self.dev) };
            return Err(e);
        }
        Ok(enc)
    }

    /// Takes back an encoder that was recorded into but never submitted.
    pub(crate) fn give_back(&self, mut enc: Encoder) {
        // SAFETY: it was never submitted, so nothing pending uses it.
        match unsafe { enc.reset(&self.dev) } {
            Ok(()) => self.state.lock().free.push(enc),
            // SAFETY: as above.
            Err(_) => unsafe { enc.destroy(&self.dev) },
        }
    }

    /// Ends `enc` and submits it as `value`; returns its result cell.
    pub(crate) fn submit(&self, mut enc: Encoder, value: u64) -> Result<ResultCell, VkError> {
        if let Err(e) = enc.finish(&self.dev) {
            self.give_back(enc);
            return Err(e);
        }
        let mut st = self.state.lock();
        let submitted = {
            let q = self.dev.queue.lock();
            // SAFETY: we hold the queue's lock; `enc.cmd` is executable (just
            // ended) and not pending; the allocator submits values in
            // increasing order, one call at a time, so `value` is above every
            // value signalled or pending on our timeline.
            unsafe { raw::submit_signal(&self.dev.device, *q, enc.cmd, self.timeline, value) }
        };
        if let Err(e) = submitted {
            drop(st);
            self.give_back(enc);
            return Err(e);
        }
        st.last_submitted = value;
        let results = ResultCell::default();
        st.in_flight.push_back(EncoderInFlight {
            value,
            encoder: enc,
            results: results.clone(),
        });
        Ok(results)
    }

    /// Reclaims every encoder whose value `done` has passed.
    pub(crate) fn reclaim(&self, done: u64) -> Result<(), VkError> {
        if let Some(mut st) = self.state.try_lock() {
            self.reclaim_locked(&mut st, done)?;
        }
        Ok(())
    }

    /// Reclaims, waiting for the lock.
    pub(crate) fn reclaim_blocking(&self, done: u64) -> Result<(), VkError> {
        let mut st = self.state.lock();
        self.reclaim_locked(&mut st, done)
    }

    fn reclaim_locked(&self, st: &mut QueueState, done: u64) -> Result<(), VkError> {
        while st.in_flight.front().is_some_and(|e| e.value <= done) {
            let mut e = st.in_flight.pop_front().expect("front exists");
            let _ = e.results.set(e.encoder.read_results());
            if st.free.len() >= MAX_FREE_ENCODERS {
                // SAFETY: its value completed, so nothing pending uses it.
                unsafe { e.encoder.destroy(&self.dev) };
                continue;
            }
            // SAFETY: as above.
            match unsafe { e.encoder.reset(&self.dev) } {
                Ok(()) => st.free.push(e.encoder),
                Err(err) => {
                    // SAFETY: as above.
                    unsafe { e.encoder.destroy(&self.dev) };
                    return Err(err);
                }
            }
        }
        Ok(())
    }
}

impl Drop for QueueInner {
    fn drop(&mut self) {
        let st = self.state.get_mut();
        let last = st.last_submitted;
        let reached = match teardown_wait(&self.dev, self.timeline, last) {
            Ok(r) => r,
            // A lost device runs nothing more: destroying is allowed.
            Err(e) => e.code == vk::Result::ERROR_DEVICE_LOST,
        };
        if !reached {
            eprintln!(
                "inflight: a Vulkan queue was dropped with submissions unfinished after {TEARDOWN_WAIT:?}; its encoders are leaked"
            );
            std::mem::forget(std::mem::take(&mut st.in_flight));
            return;
        }
        let encoders = st
            .free
            .drain(..)
            .chain(st.in_flight.drain(..).map(|e| e.encoder));
        for enc in encoders {
            // SAFETY: every submission of this queue completed.
            unsafe { enc.destroy(&self.dev) };
        }
        // SAFETY: no pending submission signals the semaphore any more.
        unsafe { self.dev.device.destroy_semaphore(self.timeline, None) };
    }
}

fn teardown_wait(dev: &DeviceShared, sem: vk::Semaphore, value: u64) -> Result<bool, VkError> {
    // SAFETY: `sem` is a live timeline semaphore of the live device.
    unsafe { raw::wait_timeline(&dev.device, sem, value, TEARDOWN_WAIT.as_nanos() as u64) }
}
