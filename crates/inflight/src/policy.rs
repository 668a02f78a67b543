//! Release policies: three ways to decide when a freed block may be reused or
//! released, sharing one allocator so that they can be measured side by side.
//!
//! - [`Policy::DEFERRED`] (the default): a freed block whose recorded uses have
//!   not all completed waits on the pending list; it is reused or released only
//!   after the GPU timeline passes its stamps (I1, I2).
//! - [`Policy::RETAINED`]: each command buffer holds strong references to every
//!   buffer it bound until it completes, the "retained references" fix
//!   proposed for MLX. Safe, at the price of reference-count traffic per
//!   binding and of buffers kept live (so not reusable) until completion.
//!   The held references are let go lazily, at the next call on the
//!   allocator after the work completes; dropping the last `Allocator`
//!   handle waits for them (boundedly).
//! - `Immediate`, only through the `unsafe` [`Policy::immediate`]: a freed block
//!   goes straight to the ready list and trimming releases it whatever is in
//!   flight. This is the defect, kept to demonstrate and test it.

use std::fmt;

/// Which release policy an allocator follows.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct Policy(PolicyKind);

/// The name of a policy, for matching and printing.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyKind {
    /// Deferred release and ordered reuse keyed by GPU timelines.
    Deferred,
    /// Command buffers retain their bindings until completion.
    Retained,
    /// No tracking: the defect.
    Immediate,
}

impl Policy {
    /// Deferred release and ordered reuse (the default).
    pub const DEFERRED: Policy = Policy(PolicyKind::Deferred);
    /// Command buffers retain every binding until they complete.
    pub const RETAINED: Policy = Policy(PolicyKind::Retained);

    /// The defect: free blocks go to the cache at once, and trimming releases
    /// them even while submitted work still uses them.
    ///
    /// # Safety
    ///
    /// 1. On a real driver, releasing a buffer that in-flight work uses is
    ///    undefined behaviour (a crash, or silent corruption). Use this policy
    ///    only on the simulated GPU, or in a child process whose crash is the
    ///    expected outcome.
    pub const unsafe fn immediate() -> Policy {
        Policy(PolicyKind::Immediate)
    }

    /// The policy's name.
    pub const fn kind(self) -> PolicyKind {
        self.0
    }
}

impl Default for Policy {
    fn default() -> Self {
        Policy::DEFERRED
    }
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PolicyKind::Deferred => "deferred",
            PolicyKind::Retained => "retained",
            PolicyKind::Immediate => "immediate",
        })
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}
