//! A block: the part of a segment one buffer holds, as it travels between
//! buffers, the front caches, the pending list and the arena.

use std::sync::Arc;

use crate::arena::NodeId;
use crate::timeline::Stamps;

/// A block out of the arena (see `arena/`): a live buffer's, a front
/// cache's, or one on the pending list.
#[derive(Debug)]
pub(crate) struct Block<R> {
    /// The raw buffer of its segment, shared with the segment's other
    /// blocks (the arena gives the segment back only once none is out).
    pub(crate) raw: Arc<R>,
    /// Where the block starts in `raw`.
    pub(crate) offset: u64,
    /// Its size in bytes.
    pub(crate) size: u64,
    /// A stable id of its memory (segment and offset).
    pub(crate) id: u64,
    /// Its node in the arena.
    pub(crate) node: NodeId,
    /// The last recorded use on each queue.
    pub(crate) stamps: Stamps,
}
