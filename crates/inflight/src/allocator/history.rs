//! Memory history: the events a snapshot's timeline shows, recorded under
//! the state lock while recording is on ([`crate::Allocator::record_history`]),
//! and the snapshot itself ([`crate::Allocator::memory_snapshot`]).
//!
//! While recording, allocations and frees skip the front caches, so that
//! every one is seen here: a free is `free_requested` at the drop and
//! `free_completed` when its block may go to any new work (at once for a
//! block whose uses completed or that its own in-order queue may reuse, as
//! PyTorch's same-stream frees; when promoted for a block on the pending
//! list, which the viewer draws as freed but waiting).

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use crate::backend::Backend;
use crate::buffer::Shell;
use crate::history::{MemoryAction, MemoryEvent, MemorySnapshot};
use crate::sync::{lock_spinning, Ordering};
use crate::timeline::QueueId;

use super::state::State;
use super::Shared;

/// The events recorded, and how many may be kept (the oldest go first).
pub(super) struct History {
    pub(super) events: VecDeque<MemoryEvent>,
    pub(super) max: usize,
}

impl<B: Backend> Shared<B> {
    /// The device address of byte `offset` of `raw`.
    pub(super) fn address_of(&self, raw: &B::Buffer, offset: u64) -> u64 {
        self.backend.address(raw) + offset
    }

    /// Records an event, if recording is on.
    #[inline]
    pub(super) fn record(
        &self,
        st: &mut State<B>,
        action: MemoryAction,
        addr: u64,
        size: u64,
        queue: QueueId,
    ) {
        if let Some(h) = st.history.as_mut() {
            if h.events.len() == h.max {
                h.events.pop_front();
            }
            h.events.push_back(MemoryEvent {
                action,
                addr,
                size,
                queue,
                time_us: self.born.elapsed().as_micros() as u64,
            });
        }
    }

    /// The free path while recording: the block is filed under the state
    /// lock at once (no front cache), with its events.
    #[inline(never)]
    pub(super) fn free_recorded(&self, shell: Shell<B>) -> Option<Arc<Shared<B>>> {
        // SAFETY: S1: the caller dropped the last handle; the shell is ours.
        let (stamps, live) = unsafe { (shell.owned_stamps(), shell.owned_live()) };
        let (home, queue) = (live.home, live.queue);
        if stamps.has_uses_at_free() {
            stamps.resolve_at_free(|q| self.queues.get(q).mark_use());
        }
        let me = self.fronts.me();
        self.count_free(me);
        // SAFETY: S1: as above; the shell leaves with its block.
        let mut block = unsafe { shell.unfill() };
        let mut st = lock_spinning(&self.state);
        st.stats.active_bytes -= block.size;
        st.stats.active_count -= 1;
        if self.config.policy.kind() == crate::PolicyKind::Immediate {
            block.stamps.clear();
        } else if !block.stamps.is_empty() {
            st.stats.deferred_frees += 1;
        }
        let (addr, size) = (self.address_of(&block.raw, block.offset), block.size);
        self.record(&mut st, MemoryAction::FreeRequested, addr, size, queue);
        if self.file_block(&mut st, block) {
            self.record(&mut st, MemoryAction::FreeCompleted, addr, size, queue);
        }
        let mut spare = Vec::new();
        st.park(shell, &mut spare);
        self.trim_to_cap(st);
        drop(spare); // after the lock
        self.uncount(home, me)
    }

    /// Whether history is being recorded (the fast paths then step aside).
    #[inline]
    pub(super) fn recording(&self) -> bool {
        self.history_on.load(Ordering::Relaxed)
    }

    /// Starts recording (keeping at most `max_entries` events, the oldest
    /// dropped first) or, with `None`, stops and forgets the events.
    pub(super) fn set_history(&self, max_entries: Option<usize>) {
        let mut st = self.state.lock();
        match max_entries {
            Some(max) => {
                // The front caches' blocks go back, so that every later
                // allocation and free is seen.
                self.drain_fronts(&mut st);
                st.history = Some(History {
                    events: VecDeque::new(),
                    max: max.max(1),
                });
                self.history_on.store(true, Ordering::Relaxed);
            }
            None => {
                st.history = None;
                self.history_on.store(false, Ordering::Relaxed);
            }
        }
        self.trim_to_cap(st);
    }

    /// The segments held and the events recorded (see
    /// [`crate::Allocator::memory_snapshot`]).
    pub(super) fn snapshot_memory(&self) -> MemorySnapshot {
        self.flush_markers();
        self.refresh_all();
        let mut st = self.state.lock();
        self.drain_fronts(&mut st);
        let (segments, _) = self.promote(&mut st);
        let pending: HashSet<u32> = st.pending.nodes().collect();
        let snap = MemorySnapshot {
            device: 0,
            segments: st.arena.describe(
                |raw| self.backend.address(raw),
                |_| None,
                |n| pending.contains(&n),
            ),
            events: st
                .history
                .as_ref()
                .map(|h| h.events.iter().copied().collect())
                .unwrap_or_default(),
        };
        drop(st);
        self.release_segments(segments);
        snap
    }
}
