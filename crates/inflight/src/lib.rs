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
//! 1. **Buffer** ([`Buffer`]): an RAII handle from [`Allocator::malloc`].
//!    Dropping the last clone frees its block into the cache through the
//!    freeing thread's front cache (a per-thread slot, which its thread
//!    enters with no atomic read-modify-write where the kernel offers
//!    asymmetric fences): an idle block waits there for that thread's next
//!    allocation of its size class; one still in flight joins a batch bound
//!    for the pending list.
//! 2. **Command buffer** ([`CommandBuffer`]): records operations and the
//!    buffers they bind, holding them until [`CommandBuffer::commit`], which
//!    assigns the queue's next timeline value and stamps each bound buffer.
//! 3. **Timeline** ([`timeline`]): each [`Queue`] has one; the backend's
//!    completion signal advances its watermark. A [`Ticket`] reports it.
//! 4. **Pending release** ([`pending`]): a block freed while a stamp is
//!    ahead of its watermark waits here, filed by stamp.
//! 5. **Cache** ([`cache`]): idle blocks by size (best fit, MLX's bound) and by
//!    age (trimming, least recently used first), behind the front caches.
//!    Trimming never sees a pending block.
//! 6. **Stats** ([`Stats`]): what is active, ready, pending and reserved; they
//!    add up at every quiet point.
//!
//! ## The invariants
//!
//! - **I1 No release in flight**: a device allocation is released only after
//!   every submission that recorded a use of it has completed.
//! - **I2 No reuse in flight**: a cached block goes to new work only once its
//!   recorded uses completed, or they were on the same queue and the backend
//!   declares that queue in-order for memory.
//! - **I3 Nothing lost**: every allocation is live, cached (ready or pending)
//!   or released; the statistics balance ([`Stats::balanced`]).
//! - **I4 Bounded memory, clear failure**: ready bytes (front caches
//!   included) stay under the cache limit; past the memory limit the allocator trims, waits boundedly, then
//!   returns [`Error::OutOfMemory`] with its statistics.
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
