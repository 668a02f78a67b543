//! Freeing: the last handle's drop files its block in the freeing thread's
//! front cache (idle), gathers it there for the pending list (in flight),
//! or, under `Immediate`, puts it on the ready list regardless; promotion
//! moves pending blocks whose work completed to the ready list; trimming
//! and release give blocks back to the device (I1: ready blocks only).

use std::sync::Arc;

use crate::backend::Backend;
use crate::buffer::Shell;
use crate::cache::Block;
use crate::front::{Deferred, Home};
use crate::policy::PolicyKind;
use crate::sync::lock_spinning;
use crate::timeline::QueueId;

use super::state::State;
use super::{BackendTime, FreeThrough, Shared, StateGuard};

impl<B: Backend> Shared<B> {
    /// The free path (see the module documentation): `shell` is the buffer's,
    /// still filled, with no handle left. Returns the home slot's reference
    /// to this allocator if the slot lets it go (K1): the caller drops it
    /// after its last use of `self`, since it may be the last one.
    #[must_use]
    #[inline]
    pub(crate) fn free(&self, shell: Shell<B>) -> Option<Arc<Shared<B>>> {
        // SAFETY: S1: the caller dropped the last handle; the shell is ours.
        if unsafe { shell.owned_stamps() }.is_empty() {
            self.free_idle(shell)
        } else {
            self.free_bound(shell)
        }
    }

    /// Frees a block with no use in flight (stamps cleared) to the calling
    /// thread's slot: the fast path, on a thread's own slot without a lock.
    #[inline]
    pub(super) fn free_idle(&self, shell: Shell<B>) -> Option<Arc<Shared<B>>> {
        // SAFETY: S1: the shell has no handle and is ours (the free path's).
        let (size, home) = {
            let live = unsafe { shell.owned_live() };
            (live.held.get_mut().size, live.home)
        };
        let (mut slot, keep, me) = self.free_through(home);
        let cap = self.fronts.cap_for(me);
        if let Err(shell) = slot.try_push(size, shell, cap) {
            let evicted = slot.push(size, shell, cap);
            drop(slot);
            // A slot takes its share of the cache limit at its first idle
            // block that fits (see `Fronts::claim`).
            let claim = (cap == 0 && size <= self.fronts.cap()).then_some(me);
            self.file_evicted(evicted, claim);
        }
        keep
    }

    /// Uncounts a freed buffer from its home slot (K1) and enters the
    /// calling thread's slot, where the block goes. Returns the section, the
    /// home slot's reference to this allocator if it goes now (the caller
    /// drops it last, after the section), and the calling thread's home.
    #[inline]
    pub(super) fn free_through(&self, home: u32) -> FreeThrough<'_, B> {
        let me = self.fronts.me();
        // Another thread's buffer: uncounted there first (no lock may be
        // taken inside the section).
        let remote = (me.slot() != home).then(|| self.fronts.uncount_remote(home));
        let mut slot = self.fronts.enter(me);
        slot.frees += 1;
        let keep = match remote {
            Some(keep) => keep,
            None => slot.remove_live(self.fronts.closing()),
        };
        (slot, keep, me)
    }

    /// Moves shells evicted from a full slot (its older half, or a shell
    /// over the slot's cap) to the ready list; claims slot `claim`'s share
    /// of the cache limit, if given, taking it from the ready list's.
    #[inline(never)]
    pub(super) fn file_evicted(&self, evicted: Vec<Shell<B>>, claim: Option<Home>) {
        if evicted.is_empty() {
            return;
        }
        let mut st = lock_spinning(&self.state);
        let mut spare = Vec::new();
        for shell in evicted {
            self.file_shell(&mut st, shell, &mut spare);
        }
        let mut made_room = Vec::new();
        if let Some(me) = claim {
            self.fronts.claim(me, |reserve| {
                st.ready_cap = st.limits.cache - reserve;
                let ready_cap = st.ready_cap;
                st.trim_ready_to(ready_cap, &mut made_room);
            });
        }
        self.trim_to_cap(st);
        drop(spare); // after the lock
        self.release_blocks(made_room);
    }

    /// Frees a block that was bound. Where it goes: if the cached watermarks
    /// show its every use complete, to the slot like an idle one; else to
    /// the pending list, gathered in the slot first. The free path never
    /// asks the backend: a block whose work completed since the last
    /// refresh waits on the pending list for the next one. Under
    /// `Immediate`, to the ready list, its uses ignored.
    #[inline(never)]
    pub(super) fn free_bound(&self, shell: Shell<B>) -> Option<Arc<Shared<B>>> {
        // SAFETY: S1: the shell has no handle and is ours (the free path's).
        let (stamps, live) = unsafe { (shell.owned_stamps(), shell.owned_live()) };
        let (home, size) = (live.home, live.held.get_mut().size);
        if stamps.has_uses_at_free() {
            // Stream-ordered: the program's work on those streams up to now.
            stamps.resolve_at_free(|q| self.queues.get(q).mark_use());
        }
        if self.config.policy.kind() == PolicyKind::Immediate {
            let (slot, keep, _) = self.free_through(home);
            drop(slot);
            self.free_to_lists(shell);
            return keep;
        }
        if self.first_incomplete_cached(stamps).is_none() {
            stamps.clear();
            return self.free_idle(shell);
        }
        // In flight: gathered in the slot, filed in a batch (see `front.rs`).
        let (mut slot, keep, _) = self.free_through(home);
        let batch = slot.defer(size, shell);
        drop(slot);
        if let Some(batch) = batch {
            let mut st = lock_spinning(&self.state);
            let mut spare = Vec::new();
            self.file_deferred(&mut st, batch, &mut spare);
            self.trim_to_cap(st);
            drop(spare); // after the lock
        }
        keep
    }

    /// Files a batch of shells freed in flight (from a slot): on the pending
    /// list under its first incomplete stamp, or, if the cached watermarks
    /// show that its work has completed since (the GPU is often ahead), on
    /// the ready list at once, with no round trip through the pending list.
    /// The caller trims the ready list after.
    pub(super) fn file_deferred(
        &self,
        st: &mut State<B>,
        batch: Deferred<B>,
        spare: &mut Vec<Shell<B>>,
    ) {
        for shell in batch {
            // SAFETY: S1: a shell in a slot has no handle and is ours.
            let block = unsafe { shell.unfill() };
            st.stats.active_bytes -= block.size;
            st.stats.active_count -= 1;
            st.stats.deferred_frees += 1;
            self.file_block(st, block);
            st.park(shell, spare);
        }
    }

    /// Files a block that left a buffer with its stamps: on the pending
    /// list under its first incomplete stamp, or on the ready list if the
    /// cached watermarks show every use complete.
    pub(super) fn file_block(&self, st: &mut State<B>, mut block: Block<B::Buffer>) {
        match self.first_incomplete_cached(&block.stamps) {
            Some(due) => st.pending.insert(block, due),
            None => {
                block.stamps.clear();
                st.ready.insert(block);
            }
        }
    }

    /// Under `Immediate`: files a freed block that was bound on the ready
    /// list, its uses ignored (the defect).
    pub(super) fn free_to_lists(&self, shell: Shell<B>) {
        // SAFETY: S1: the shell has no handle and is ours (the free path's).
        let mut block = unsafe { shell.unfill() };
        let mut st = lock_spinning(&self.state);
        st.stats.active_bytes -= block.size;
        st.stats.active_count -= 1;
        block.stamps.clear();
        st.ready.insert(block);
        let mut spare = Vec::new();
        st.park(shell, &mut spare);
        self.trim_to_cap(st);
        drop(spare); // after the lock
    }

    /// Moves an idle filled shell out of a slot (evicted or drained) to the
    /// ready list.
    pub(super) fn file_shell(&self, st: &mut State<B>, shell: Shell<B>, spare: &mut Vec<Shell<B>>) {
        // SAFETY: S1: a shell out of a slot has no handle and is ours.
        let block = unsafe { shell.unfill() };
        debug_assert!(block.stamps.is_empty(), "slots hold idle blocks only");
        st.stats.active_bytes -= block.size;
        st.stats.active_count -= 1;
        st.ready.insert(block);
        st.park(shell, spare);
    }

    /// Trims the ready list to its cap, releasing after the lock.
    pub(super) fn trim_to_cap(&self, mut st: StateGuard<'_, B>) {
        let ready_cap = st.ready_cap;
        if st.ready.bytes() > ready_cap {
            let mut release = Vec::new();
            st.trim_ready_to(ready_cap, &mut release);
            drop(st);
            self.release_blocks(release);
        }
    }

    /// Moves every slot's blocks to the lists (for trims, clears, limit
    /// changes and memory pressure). The caller trims after.
    pub(super) fn drain_fronts(&self, st: &mut State<B>) {
        let mut spare = Vec::new();
        let (idle, deferred) = self.fronts.drain_all();
        for shell in idle {
            self.file_shell(st, shell, &mut spare);
        }
        self.file_deferred(st, deferred, &mut spare);
    }

    /// Moves pending blocks whose stamps have all passed by the cached
    /// watermarks to the ready list, then trims ready bytes to the cache
    /// limit; returns the blocks to release (trimmed, or marked for release
    /// by `clear_cache`). Asks the backend nothing: callers refresh first
    /// ([`Shared::refresh_all`], without the state lock) where it matters.
    #[must_use]
    pub(super) fn promote(&self, st: &mut State<B>) -> Vec<Block<B::Buffer>> {
        let mut release = Vec::new();
        if st.pending.is_empty() {
            return release;
        }
        for qid in 0..st.pending.queue_slots() as QueueId {
            if !st.pending.has_queue(qid) {
                continue;
            }
            let completed = self.queues.get(qid).watermark.get();
            for mut block in st.pending.take_due(qid, completed) {
                match self.first_incomplete_cached(&block.stamps) {
                    Some(next) => st.pending.insert(block, next),
                    None if block.release_when_idle => {
                        st.account_release(&block);
                        release.push(block);
                    }
                    None => {
                        block.stamps.clear();
                        st.ready.insert(block);
                    }
                }
            }
        }
        // Promoted blocks count against the cache limit like freed ones (I4).
        let ready_cap = st.ready_cap;
        st.trim_ready_to(ready_cap, &mut release);
        release
    }

    /// Gives blocks back to the device; returns the bytes released.
    #[inline]
    pub(super) fn release_blocks(&self, blocks: Vec<Block<B::Buffer>>) -> u64 {
        if blocks.is_empty() {
            return 0;
        }
        let mut bytes = 0;
        BackendTime::timed(&self.backend_time.release, || {
            for b in blocks {
                bytes += b.size;
                // SAFETY: (1) every block came from `self.backend.allocate`.
                // (2) It came off the ready list, or was promoted with every
                // stamp passed: no submission that recorded a use is
                // incomplete. The exception is the `Immediate` policy, whose
                // `unsafe` constructor makes the caller accept releasing in
                // flight.
                unsafe { self.backend.release(b.raw) };
            }
        });
        bytes
    }
}
