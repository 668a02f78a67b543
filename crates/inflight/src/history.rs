//! Memory history and snapshots: what the allocator did, in the shape
//! PyTorch's memory viewer reads.
//!
//! A [`MemorySnapshot`] has two parts, as `torch.cuda.memory._snapshot()`
//! does: the segments the allocator holds now, each with its blocks in
//! address order (they add up to the segment), and the events recorded
//! since history recording was switched on. The command-line tool writes it
//! as JSON or as a pickle that `torch/utils/viz/MemoryViz.js` and
//! `python -m torch.cuda._memory_viz` open.
//!
//! inflight's one addition to PyTorch's vocabulary is when its entries
//! happen: a buffer dropped while submitted work still uses it is
//! [`MemoryAction::FreeRequested`] at the drop and
//! [`MemoryAction::FreeCompleted`] only once the block is back in its pool:
//! when that work completed, or at once where the only work left is its
//! own queue's and that queue reuses memory in order (the viewer draws the
//! span between as "freed but waiting"). PyTorch writes both at once unless
//! `record_stream` was called.

use crate::timeline::QueueId;

/// One recorded event (PyTorch: an entry of `device_traces`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryEvent {
    /// What happened.
    pub action: MemoryAction,
    /// The block's or segment's address.
    pub addr: u64,
    /// Its size in bytes (a block's rounded size, a segment's whole size,
    /// the pages mapped or unmapped; for [`MemoryAction::Oom`], the bytes
    /// requested).
    pub size: u64,
    /// The queue the block or segment belongs to.
    pub queue: QueueId,
    /// Microseconds since the allocator was created.
    pub time_us: u64,
}

/// The actions of [`MemoryEvent`], named as PyTorch names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum MemoryAction {
    /// A block handed to a new buffer (`alloc`).
    Alloc,
    /// The buffer's last handle was dropped (`free_requested`).
    FreeRequested,
    /// The freed block is back in its pool (`free_completed`): every
    /// recorded use completed, or the uses left are on its own queue, which
    /// reuses it in order.
    FreeCompleted,
    /// A device allocation (`segment_alloc`).
    SegmentAlloc,
    /// A device allocation given back (`segment_free`).
    SegmentFree,
    /// Pages mapped into a growable segment (`segment_map`).
    SegmentMap,
    /// Pages unmapped from a growable segment (`segment_unmap`).
    SegmentUnmap,
    /// An allocation failed for lack of memory (`oom`).
    Oom,
}

impl MemoryAction {
    /// PyTorch's name for the action.
    pub const fn name(self) -> &'static str {
        match self {
            MemoryAction::Alloc => "alloc",
            MemoryAction::FreeRequested => "free_requested",
            MemoryAction::FreeCompleted => "free_completed",
            MemoryAction::SegmentAlloc => "segment_alloc",
            MemoryAction::SegmentFree => "segment_free",
            MemoryAction::SegmentMap => "segment_map",
            MemoryAction::SegmentUnmap => "segment_unmap",
            MemoryAction::Oom => "oom",
        }
    }
}

/// The state of a block in a segment (PyTorch: a block's `state`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BlockState {
    /// Held by a live buffer (`active_allocated`).
    Allocated,
    /// Freed by the program, but submitted work still uses it
    /// (`active_pending_free`).
    PendingFree,
    /// Free (`inactive`).
    Inactive,
}

impl BlockState {
    /// PyTorch's name for the state.
    pub const fn name(self) -> &'static str {
        match self {
            BlockState::Allocated => "active_allocated",
            BlockState::PendingFree => "active_pending_free",
            BlockState::Inactive => "inactive",
        }
    }
}

/// One block of a segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockInfo {
    /// Its address.
    pub address: u64,
    /// Its size in bytes.
    pub size: u64,
    /// The bytes the program asked for (0 where not known or not held).
    pub requested_size: u64,
    /// Allocated, pending or free.
    pub state: BlockState,
}

/// The size class of a segment's pool (PyTorch: `segment_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PoolKind {
    /// Segments that serve small requests (`small`).
    Small,
    /// Segments that serve large requests (`large`).
    Large,
}

impl PoolKind {
    /// PyTorch's name for the pool.
    pub const fn name(self) -> &'static str {
        match self {
            PoolKind::Small => "small",
            PoolKind::Large => "large",
        }
    }
}

/// One segment: a device allocation, or the mapped part of a growable range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentInfo {
    /// Its first byte's address.
    pub address: u64,
    /// Its size in bytes: the sum of its blocks' sizes.
    pub total_size: u64,
    /// The queue whose pool it belongs to.
    pub queue: QueueId,
    /// The pool's size class.
    pub pool: PoolKind,
    /// Whether it is a growable range with pages mapped on demand.
    pub expandable: bool,
    /// Its blocks, in address order, covering it exactly.
    pub blocks: Vec<BlockInfo>,
}

/// The segments held now and the events recorded (see the module doc).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemorySnapshot {
    /// The backend's device index (0 for devices without one).
    pub device: u32,
    /// Every segment, by address.
    pub segments: Vec<SegmentInfo>,
    /// The events recorded, oldest first.
    pub events: Vec<MemoryEvent>,
}
