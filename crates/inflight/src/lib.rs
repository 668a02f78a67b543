//! # inflight
//!
//! A GPU buffer caching allocator that is as fast as a cache can be and never
//! releases or reuses a buffer that submitted GPU work still uses.
//!
//! GPU runtimes cache freed device buffers because creating them is slow. But
//! the GPU runs asynchronously: when the host drops its last handle, a command
//! buffer committed earlier may still read or write the buffer. Releasing it
//! then (MLX's Metal allocator did, aborting an inference server with
//! `kIOGPUCommandBufferCallbackErrorInvalidResource`) or handing it to
//! unordered new work (silent corruption) are the two hazards. inflight keys
//! every release and every reuse to the GPU's own timelines.
//!
//! ## A tour, in the order data flows
//!
//! 1. **Buffer** ([`Buffer`], `buffer.rs`): an RAII handle from
//!    [`Allocator::malloc`], an `Arc`'d *shell* recycled so that a cache hit
//!    allocates nothing on the host. Dropping the last handle frees the
//!    block (`allocator/free.rs`).
//! 2. **Front caches** (`front.rs`, `biased.rs`): one slot per thread, which
//!    the thread enters as the owner of a biased lock (no atomic
//!    read-modify-write where the kernel offers `membarrier`). A slot keeps
//!    idle small blocks for its thread's next allocation of their size
//!    class, and gathers blocks freed in flight (*deferred*) to file in a
//!    batch at its thread's next miss.
//! 3. **Command buffer** ([`CommandBuffer`], [`Queue`], `command.rs`):
//!    binds buffers and records work (the harness operations, or the
//!    program's own through [`CommandBuffer::native`]);
//!    [`CommandBuffer::commit`] takes the queue's next timeline value and
//!    stamps each bound buffer with it.
//! 4. **Timeline** ([`timeline`]): stamps (queue, value) and each queue's
//!    completed watermark, advanced from the backend's completion signal;
//!    a [`Ticket`] reports it. Queues adopted from the program
//!    ([`Allocator::adopt_queue`]) are stream-ordered: a free fixes its use
//!    as the queue's next submission.
//! 5. **Pending list** (`pending.rs`): blocks freed while work on another
//!    queue may still use them, filed by stamp until their watermark passes.
//! 6. **Arena** (`arena/`): device memory as segments (fixed, or growable
//!    with pages mapped on demand), split into blocks by best fit and merged
//!    back, in pools per queue and size class. Idle memory waits here; only
//!    complete free memory is ever given back to the device.
//! 7. **The allocator** ([`Allocator`], `allocator/`): the malloc path
//!    (`malloc.rs`: fast path, miss, growth, memory pressure), reuse across
//!    queues (`reuse.rs`), free, filing, promotion and trimming (`free.rs`),
//!    queues and faults (`queues.rs`), the state behind its lock
//!    (`state.rs`), memory history (`history.rs`, [`history`]) and teardown
//!    (`teardown.rs`).
//! 8. **Stats** ([`Stats`]): active, ready, pending and reserved bytes; they
//!    add up at every quiet point.
//! 9. **Backends** ([`backend`]): the [`Backend`] and [`Harness`] traits and
//!    one module per GPU API (`sim`, the default; `cuda`, `vulkan`, `metal`
//!    behind their features). Settings: [`Config`], [`Policy`]; errors:
//!    [`Error`].
//!
//! `docs/ARCHITECTURE.md` in the repository is the longer guide.
//!
//! ## The invariants
//!
//! - **I1 No release in flight**: a device allocation is released only after
//!   every submission that recorded a use of it has completed (`arena/`:
//!   trimming sees complete free memory only; `teardown.rs` leaks rather
//!   than release in flight).
//! - **I2 No reuse in flight**: a cached block goes to new work only once its
//!   recorded uses completed, or they were on the same queue and the backend
//!   declares that queue in-order for memory, or the new work was made to
//!   wait for them (`free.rs`: `file_block`; `reuse.rs`: `order_reuse`).
//! - **I3 Nothing lost**: every allocation is live, cached (ready or pending)
//!   or released; the statistics balance ([`Stats::balanced`]).
//! - **I4 Bounded memory, clear failure**: releasable bytes (front caches
//!   included) stay under the cache limit; past the memory limit the
//!   allocator trims, waits boundedly, then returns [`Error::OutOfMemory`]
//!   with its statistics (`malloc.rs`: `grow`; `free.rs`: `trim_to_cap`).
//!
//! ## The ownership rules
//!
//! - **K1 A free uncounts its buffer last**: a live buffer's home slot counts
//!   it and holds a strong reference to the allocator, so the free's uncount
//!   must be its last touch of the allocator (`front.rs`: `remove_live`;
//!   `free.rs`: `uncount`).
//! - **S1 A shell in a slot is the allocator's**: a shell's fields are
//!   written only by its sole owner while no handle exists, and read only
//!   through a live handle (`buffer.rs`: `Drop for Buffer`, `unfill`).
//! - **S2 Rebinding**: the block a live buffer holds may be replaced once,
//!   by a rebinding, until anyone sees it; the buffer's `pin` says whether
//!   anyone has (`buffer.rs`: `try_rebind`, `pinned`; `reuse.rs`: `rebind`).
//!
//! ## Lock order
//!
//! The state lock (allocator) → front-cache slots, in index order →
//! a queue's submit lock → a buffer's stamps. Dropping a buffer enters a
//! slot and may take the state lock, so no buffer is dropped under any of
//! them; slow backend calls (device allocation, release, completion
//! queries, waits) are made with the state lock let go.
//!
//! ## Example
//!
//! ```
//! # #[cfg(feature = "sim")] {
//! use inflight::{Allocator, Config};
//! use inflight::backend::sim::{SimConfig, SimGpu};
//! use std::time::Duration;
//!
//! let alloc = Allocator::new(SimGpu::new(SimConfig::default()), Config::default())?;
//! let queue = alloc.create_queue()?;
//! let a = alloc.malloc(1 << 20, &queue)?;
//! let b = alloc.malloc(1 << 20, &queue)?;
//! let mut cb = queue.command_buffer()?;
//! cb.fill(&a, 7)?;
//! cb.copy(&a, &b)?;
//! let slot = cb.checksum(&b)?;
//! let ticket = cb.commit()?;
//! drop(a); // still in flight: it waits on the pending list, not in the cache
//! assert!(ticket.wait(Duration::from_secs(5))?);
//! let words = (1 << 20) / 4;
//! assert_eq!(ticket.checksum(slot)?, inflight::backend::checksum_uniform(7, words));
//! assert!(alloc.stats().balanced());
//! # }
//! # Ok::<(), inflight::Error>(())
//! ```

#![warn(missing_docs)]

mod allocator;
mod arena;
pub mod backend;
mod biased;
mod block;
mod buffer;
mod command;
mod config;
#[cfg(feature = "testing")]
pub mod conformance;
mod error;
mod front;
mod harness;
pub mod history;
mod pending;
mod policy;
mod stats;
mod sync;
pub mod timeline;

pub use allocator::{Allocator, MAX_QUEUES};
pub use backend::{Backend, Binding, DeviceError, DeviceInfo, Harness, Span};
pub use buffer::Buffer;
pub use command::{CommandBuffer, Queue, Ticket};
pub use config::{
    Config, Limits, ReuseWait, DEFAULT_PAGE_SIZE, DEFAULT_PRESSURE_TIMEOUT, DEFAULT_SIZE_CLASSES,
    DEFAULT_SMALL_ALIGN,
};
pub use error::{Error, Result};
pub use policy::{Policy, PolicyKind};
pub use stats::Stats;
