//! A backend whose timeline the caller drives: for tests, property tests and
//! model checking.
//!
//! Nothing executes. Submissions record which buffers they use; a queue's
//! work completes only when the caller says so ([`ManualGpu::complete`]).
//! Two checks stand in for a validation layer and count as violations:
//!
//! - a release of a buffer that an incomplete submission used (I1);
//! - a submission that uses bytes of a raw buffer which an incomplete
//!   submission of their *previous owner* also used, on another queue (or on
//!   any queue, where queues do not order memory) (I2). Raw buffers are
//!   segments that several buffers share, so owners and uses are tracked by
//!   byte range. The caller marks each new owner with
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
    /// The last owner epoch handed out.
    next_owner: u64,
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
    /// Owners of byte ranges: (start, end, epoch), disjoint.
    owners: Vec<(u64, u64, u64)>,
    /// Incomplete uses: (queue, value, owner epoch, start, end).
    uses: Vec<Use>,
}

/// An incomplete use of a byte range of a raw buffer.
#[derive(Clone, Copy)]
struct Use {
    queue: u32,
    value: u64,
    owner: u64,
    start: u64,
    end: u64,
}

impl RawState {
    /// The owner epoch of the byte at `at` (0 if never owned).
    fn owner_at(&self, at: u64) -> u64 {
        self.owners
            .iter()
            .find(|&&(a, b, _)| a <= at && at < b)
            .map_or(0, |&(_, _, e)| e)
    }
}

/// A raw buffer of the driven device.
pub struct ManualBuffer {
    id: u64,
}

/// A queue of the driven device.
pub struct ManualQueue {
    id: u32,
}

/// Recorded buffers of one submission: (raw id, start, end).
pub struct ManualCommands {
    uses: Vec<(u64, u64, u64)>,
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
            .for_each(|b| b.uses.retain(|u| u.queue != queue || u.value > done));
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

    /// Marks that the bytes a buffer holds (`raw[offset..offset + len]`,
    /// as [`crate::Buffer::raw`], [`crate::Buffer::offset`] and
    /// [`crate::Buffer::capacity`] give them) now belong to a new owner:
    /// uses recorded from here on that overlap an incomplete use by an
    /// earlier owner on an unordered queue are violations.
    pub fn note_new_owner(&self, raw: &ManualBuffer, offset: u64, len: u64) {
        let mut st = self.inner.state.lock();
        st.next_owner += 1;
        let epoch = st.next_owner;
        if let Some(b) = st.buffers.get_mut(&raw.id) {
            let end = offset + len;
            let mut owners = Vec::with_capacity(b.owners.len() + 2);
            for &(a, z, e) in &b.owners {
                if z <= offset || end <= a {
                    owners.push((a, z, e));
                    continue;
                }
                if a < offset {
                    owners.push((a, offset, e));
                }
                if end < z {
                    owners.push((end, z, e));
                }
            }
            owners.push((offset, end, epoch));
            b.owners = owners;
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
        if let Some(u) = raw.uses.first() {
            let msg = format!(
                "buffer {} released while submission {} on queue {} uses it",
                buffer.id, u.value, u.queue
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

    fn address(&self, buffer: &ManualBuffer) -> u64 {
        buffer.id << 36
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
        for (id, start, end) in cmds.uses {
            let Some(raw) = st.buffers.get_mut(&id) else {
                bad.push(format!(
                    "submission {value} on queue {} uses released buffer {id}",
                    queue.id
                ));
                continue;
            };
            let owner = raw.owner_at(start);
            if let Some(u) = raw.uses.iter().find(|u| {
                u.start < end
                    && start < u.end
                    && u.owner != owner
                    && (u.queue != queue.id || !in_order)
            }) {
                bad.push(format!(
                    "submission {value} on queue {} reuses bytes [{start}, {end}) of buffer {id} while submission {} on queue {} of their previous owner is in flight",
                    queue.id, u.value, u.queue
                ));
            }
            raw.uses.push(Use {
                queue: queue.id,
                value,
                owner,
                start,
                end,
            });
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
        span: Span,
        _: u32,
    ) -> Result<(), DeviceError> {
        c.uses.push(range(dst, span)?);
        Ok(())
    }

    fn copy(
        &self,
        c: &mut ManualCommands,
        src: Binding<'_, ManualBuffer>,
        dst: Binding<'_, ManualBuffer>,
        span: Span,
    ) -> Result<(), DeviceError> {
        c.uses.extend([range(src, span)?, range(dst, span)?]);
        Ok(())
    }

    fn add(
        &self,
        c: &mut ManualCommands,
        a: Binding<'_, ManualBuffer>,
        b: Binding<'_, ManualBuffer>,
        out: Binding<'_, ManualBuffer>,
        span: Span,
    ) -> Result<(), DeviceError> {
        c.uses
            .extend([range(a, span)?, range(b, span)?, range(out, span)?]);
        Ok(())
    }

    fn checksum(
        &self,
        c: &mut ManualCommands,
        src: Binding<'_, ManualBuffer>,
        span: Span,
    ) -> Result<usize, DeviceError> {
        c.uses.push(range(src, span)?);
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

/// The raw buffer and absolute byte range an operation on `span` of `b` uses.
fn range(b: Binding<'_, ManualBuffer>, span: Span) -> Result<(u64, u64, u64), DeviceError> {
    b.check(span)?;
    let abs = b.absolute(span);
    Ok((b.raw.id, abs.offset, abs.end()))
}
