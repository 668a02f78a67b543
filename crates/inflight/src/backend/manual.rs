//! A backend whose timeline the caller drives: for tests, property tests and
//! model checking.
//!
//! Nothing executes. Submissions record which buffers they use; a queue's
//! work completes only when the caller says so ([`ManualGpu::complete`]).
//! Two checks stand in for a validation layer and count as violations:
//!
//! - a release of a buffer that an incomplete submission used (I1);
//! - a submission that uses a buffer which an incomplete submission of its
//!   *previous owner* also used, on another queue (or on any queue, where
//!   queues do not order memory) (I2). The caller marks each new owner with
//!   [`ManualGpu::note_new_owner`] right after `malloc`; uses by one owner
//!   are that owner's business.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::backend::{Backend, Binding, DeviceError, DeviceInfo, Harness, Span};

/// A driven device. Clones share it.
#[derive(Clone)]
pub struct ManualGpu {
    inner: Arc<Inner>,
}

struct Inner {
    capacity: u64,
    in_order: bool,
    state: Mutex<State>,
    cv: Condvar,
    violations: AtomicU64,
    lost: AtomicBool,
    fail_next_alloc: AtomicBool,
}

#[derive(Default)]
struct State {
    next_buffer: u64,
    allocated: u64,
    /// The highest `allocated` so far.
    peak_allocated: u64,
    /// Live raw buffers: id → uses (queue, value) still recorded, and the
    /// owner epoch of each use.
    buffers: HashMap<u64, RawState>,
    /// Per queue: (submitted, completed).
    queues: Vec<(u64, u64)>,
    messages: Vec<String>,
}

#[derive(Default)]
struct RawState {
    size: u64,
    owner: u64,
    uses: Vec<(u32, u64, u64)>,
}

/// A raw buffer of the driven device.
pub struct ManualBuffer {
    id: u64,
}

/// A queue of the driven device.
pub struct ManualQueue {
    id: u32,
}

/// Recorded buffers of one submission.
pub struct ManualCommands {
    uses: Vec<u64>,
    checksums: usize,
}

/// A submitted submission (its checksums all read 0).
pub struct ManualSubmission {
    checksums: usize,
}

impl ManualGpu {
    /// A device of `capacity` bytes whose queues order memory if `in_order`.
    pub fn new(capacity: u64, in_order: bool) -> Self {
        ManualGpu {
            inner: Arc::new(Inner {
                capacity,
                in_order,
                state: Mutex::new(State::default()),
                cv: Condvar::new(),
                violations: AtomicU64::new(0),
                lost: AtomicBool::new(false),
                fail_next_alloc: AtomicBool::new(false),
            }),
        }
    }

    /// Completes queue `queue`'s submissions up to `value` (clamped to what
    /// was submitted). Returns the new watermark.
    pub fn complete(&self, queue: u32, value: u64) -> u64 {
        let mut st = self.inner.state.lock();
        let Some(q) = st.queues.get_mut(queue as usize) else {
            return 0;
        };
        q.1 = q.1.max(value.min(q.0));
        let done = q.1;
        st.buffers
            .values_mut()
            .for_each(|b| b.uses.retain(|&(uq, v, _)| uq != queue || v > done));
        self.inner.cv.notify_all();
        done
    }

    /// Completes everything submitted on every queue.
    pub fn complete_all(&self) {
        let n = self.inner.state.lock().queues.len();
        for q in 0..n as u32 {
            self.complete(q, u64::MAX);
        }
    }

    /// (submitted, completed) of a queue.
    pub fn timeline(&self, queue: u32) -> (u64, u64) {
        self.inner
            .state
            .lock()
            .queues
            .get(queue as usize)
            .copied()
            .unwrap_or((0, 0))
    }

    /// Marks that raw buffer `raw` now belongs to a new owner: uses recorded
    /// from here on that overlap an incomplete use by an earlier owner on an
    /// unordered queue are violations.
    pub fn note_new_owner(&self, raw: &ManualBuffer) {
        if let Some(b) = self.inner.state.lock().buffers.get_mut(&raw.id) {
            b.owner += 1;
        }
    }

    /// Violations seen so far.
    pub fn violations(&self) -> u64 {
        self.inner.violations.load(Ordering::Relaxed)
    }

    /// Their messages.
    pub fn messages(&self) -> Vec<String> {
        self.inner.state.lock().messages.clone()
    }

    /// Raw bytes allocated now.
    pub fn allocated_bytes(&self) -> u64 {
        self.inner.state.lock().allocated
    }

    /// The most raw bytes ever allocated at once.
    pub fn peak_allocated_bytes(&self) -> u64 {
        self.inner.state.lock().peak_allocated
    }

    /// Raw buffers alive now.
    pub fn live_buffers(&self) -> usize {
        self.inner.state.lock().buffers.len()
    }

    /// Makes the device lost.
    pub fn lose_device(&self) {
        self.inner.lost.store(true, Ordering::Release);
        self.inner.cv.notify_all();
    }

    /// Makes the next raw allocation fail with out-of-memory.
    pub fn fail_next_allocation(&self) {
        self.inner.fail_next_alloc.store(true, Ordering::Release);
    }

    fn violation(&self, st: &mut State, msg: String) {
        self.inner.violations.fetch_add(1, Ordering::Relaxed);
        if st.messages.len() < 64 {
            st.messages.push(msg);
        }
    }

    fn check_lost(&self) -> Result<(), DeviceError> {
        if self.inner.lost.load(Ordering::Acquire) {
            Err(DeviceError::Lost("the driven device was lost".into()))
        } else {
            Ok(())
        }
    }
}

impl Backend for ManualGpu {
    type Buffer = ManualBuffer;
    type Queue = ManualQueue;
    type Commands = ManualCommands;
    type Submission = ManualSubmission;

    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            backend: "manual",
            name: "driven test device".into(),
            memory_capacity: self.inner.capacity,
            max_buffer_size: self.inner.capacity,
            max_op_span: self.inner.capacity,
        }
    }

    fn allocate(&self, bytes: u64) -> Result<ManualBuffer, DeviceError> {
        self.check_lost()?;
        if self.inner.fail_next_alloc.swap(false, Ordering::AcqRel) {
            return Err(DeviceError::OutOfMemory);
        }
        let mut st = self.inner.state.lock();
        if st.allocated + bytes > self.inner.capacity {
            return Err(DeviceError::OutOfMemory);
        }
        st.next_buffer += 1;
        let id = st.next_buffer;
        st.allocated += bytes;
        st.peak_allocated = st.peak_allocated.max(st.allocated);
        st.buffers.insert(
            id,
            RawState {
                size: bytes,
                ..RawState::default()
            },
        );
        Ok(ManualBuffer { id })
    }

    unsafe fn release(&self, buffer: ManualBuffer) {
        let mut st = self.inner.state.lock();
        let Some(raw) = st.buffers.remove(&buffer.id) else {
            self.violation(&mut st, format!("buffer {} released twice", buffer.id));
            return;
        };
        st.allocated -= raw.size;
        if let Some(&(q, v, _)) = raw.uses.first() {
            let msg = format!(
                "buffer {} released while submission {v} on queue {q} uses it",
                buffer.id
            );
            self.violation(&mut st, msg);
        }
    }

    fn create_queue(&self) -> Result<ManualQueue, DeviceError> {
        self.check_lost()?;
        let mut st = self.inner.state.lock();
        st.queues.push((0, 0));
        Ok(ManualQueue {
            id: st.queues.len() as u32 - 1,
        })
    }

    fn orders_memory(&self, _queue: &ManualQueue) -> bool {
        self.inner.in_order
    }

    fn begin(&self, _queue: &ManualQueue) -> Result<ManualCommands, DeviceError> {
        self.check_lost()?;
        Ok(ManualCommands {
            uses: Vec::new(),
            checksums: 0,
        })
    }

    fn zero(
        &self,
        cmds: &mut Self::Commands,
        dst: Binding<'_, Self::Buffer>,
        span: Span,
    ) -> Result<(), DeviceError> {
        Harness::fill(self, cmds, dst, span, 0)
    }

    fn submit(
        &self,
        queue: &ManualQueue,
        cmds: ManualCommands,
        value: u64,
    ) -> Result<ManualSubmission, DeviceError> {
        self.check_lost()?;
        let in_order = self.inner.in_order;
        let mut st = self.inner.state.lock();
        let q = &mut st.queues[queue.id as usize];
        if value != q.0 + 1 {
            return Err(DeviceError::Other(format!(
                "value {value} submitted after {}",
                q.0
            )));
        }
        q.0 = value;
        let mut bad = Vec::new();
        for id in cmds.uses {
            let Some(raw) = st.buffers.get_mut(&id) else {
                bad.push(format!(
                    "submission {value} on queue {} uses released buffer {id}",
                    queue.id
                ));
                continue;
            };
            let owner = raw.owner;
            if let Some(&(q, v, _)) = raw
                .uses
                .iter()
                .find(|&&(uq, _, o)| o != owner && (uq != queue.id || !in_order))
            {
                bad.push(format!(
                    "submission {value} on queue {} reuses buffer {id} while submission {v} on queue {q} of its previous owner is in flight",
                    queue.id
                ));
            }
            raw.uses.push((queue.id, value, owner));
        }
        for msg in bad {
            self.violation(&mut st, msg);
        }
        Ok(ManualSubmission {
            checksums: cmds.checksums,
        })
    }

    fn completed(&self, queue: &ManualQueue) -> Result<u64, DeviceError> {
        self.check_lost()?;
        Ok(self.inner.state.lock().queues[queue.id as usize].1)
    }

    fn wait(
        &self,
        queue: &ManualQueue,
        value: u64,
        timeout: Duration,
    ) -> Result<bool, DeviceError> {
        let deadline = Instant::now().checked_add(timeout);
        let mut st = self.inner.state.lock();
        loop {
            self.check_lost()?;
            if st.queues[queue.id as usize].1 >= value {
                return Ok(true);
            }
            match deadline {
                Some(d) if Instant::now() >= d => return Ok(false),
                Some(d) => {
                    self.inner.cv.wait_until(&mut st, d);
                }
                None => self.inner.cv.wait(&mut st),
            }
        }
    }
}

impl Harness for ManualGpu {
    fn fill(
        &self,
        c: &mut ManualCommands,
        dst: Binding<'_, ManualBuffer>,
        _: Span,
        _: u32,
    ) -> Result<(), DeviceError> {
        c.uses.push(dst.raw.id);
        Ok(())
    }

    fn copy(
        &self,
        c: &mut ManualCommands,
        src: Binding<'_, ManualBuffer>,
        dst: Binding<'_, ManualBuffer>,
        _: Span,
    ) -> Result<(), DeviceError> {
        c.uses.extend([src.raw.id, dst.raw.id]);
        Ok(())
    }

    fn add(
        &self,
        c: &mut ManualCommands,
        a: Binding<'_, ManualBuffer>,
        b: Binding<'_, ManualBuffer>,
        out: Binding<'_, ManualBuffer>,
        _: Span,
    ) -> Result<(), DeviceError> {
        c.uses.extend([a.raw.id, b.raw.id, out.raw.id]);
        Ok(())
    }

    fn checksum(
        &self,
        c: &mut ManualCommands,
        src: Binding<'_, ManualBuffer>,
        _: Span,
    ) -> Result<usize, DeviceError> {
        c.uses.push(src.raw.id);
        c.checksums += 1;
        Ok(c.checksums - 1)
    }

    fn slots(&self, s: &ManualSubmission) -> usize {
        s.checksums
    }

    fn results(&self, s: &ManualSubmission) -> Result<Vec<u64>, DeviceError> {
        Ok(vec![0; s.checksums])
    }
}
