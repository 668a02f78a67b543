//! The Metal backend, on objc2-metal: the incident's own API, made the way
//! MLX makes it. Apple targets only; elsewhere the `metal` feature builds
//! just the parts that need no Metal ([`errors`], and the crate-private
//! `residency` and `timeline`), which are unit-tested everywhere, and [`probe`] says why
//! the backend cannot run. See `docs/METAL.md`.
//!
//! - **Buffers** (`MetalBuffer`): `newBufferWithLength:options:` with
//!   `MTLResourceStorageModeShared | MTLResourceHazardTrackingModeUntracked`,
//!   MLX's options; release lets go of the last reference.
//! - **Command buffers**: `commandBufferWithUnretainedReferences` (MLX's
//!   setting, the incident's) unless [`MetalConfig::retained_references`]
//!   asks for `commandBuffer`, whose command buffers retain every object
//!   they use until they complete (the fix proposed for MLX). The CLI sets
//!   it from the release policy ([`MetalConfig::for_policy`]): retained for
//!   `Retained`, unretained for `Deferred` and `Immediate`.
//! - **Timeline**: one `MTLSharedEvent` per queue, signalled with each
//!   submission's value at the end of its command buffer
//!   (`encodeSignalEvent:value:`); `signaledValue` is the completed
//!   watermark. Waits use `waitUntilSignaledValue:timeoutMS:` (macOS 12+),
//!   else a condition variable that completed handlers notify. The queue
//!   module says how signals are kept in value order.
//! - **Memory ordering**: [`crate::Backend::orders_memory`] is `false`. With
//!   untracked hazards Metal does not order a later command buffer after an
//!   earlier one on the same queue for memory, so a freed block is reused
//!   only once its submissions completed, or, across queues, after a
//!   device-side wait (`encodeWaitForEvent:value:` on the other queue's
//!   event).
//! - **Operations**: fill, copy, add and checksum are Metal Shading Language
//!   kernels compiled at run time (`newLibraryWithSource:options:error:`);
//!   each operand is bound at its binding's offset plus its span's; the
//!   checksum is [`crate::backend::checksum_words`] exactly, into a small
//!   shared-storage result buffer per submission. `Backend::zero` is a blit
//!   `fillBuffer:range:value:`. Programs record their own work through
//!   `MetalCommands::compute_encoder` or `MetalCommands::command_buffer`.
//! - **Residency**: an `MTLResidencySet` (macOS 15+) attached to every
//!   queue; buffers join at allocation and leave at release, within a wired
//!   budget ([`MetalConfig::wired_limit`], MLX's wired limit); the set is
//!   committed before the next submission after additions, at once after a
//!   removal. Without residency sets the backend works without them.
//! - **Failures**: a command buffer that completes with status `error` is
//!   that submission's [`DeviceError::SubmissionFailed`] (through
//!   `take_failure`, `submission_failure` and `results`), with
//!   `MTLCommandBufferErrorInvalidResource` named as the incident's
//!   `kIOGPUCommandBufferCallbackErrorInvalidResource`; a removed device or
//!   revoked access is [`DeviceError::Lost`] from then on ([`errors`]).

#![cfg_attr(not(target_vendor = "apple"), allow(dead_code))]

pub mod errors;
pub(crate) mod residency;
mod shader;
pub(crate) mod timeline;

#[cfg(target_vendor = "apple")]
mod commands;
#[cfg(target_vendor = "apple")]
mod device;
#[cfg(target_vendor = "apple")]
mod gpu;
#[cfg(target_vendor = "apple")]
mod queue;

#[cfg(target_vendor = "apple")]
pub use self::commands::MetalCommands;
#[cfg(target_vendor = "apple")]
pub use self::gpu::{MetalBuffer, MetalGpu, MetalQueue, MetalSubmission};

use crate::backend::DeviceError;
use crate::PolicyKind;

/// Settings of the Metal backend.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct MetalConfig {
    /// Whether command buffers retain the objects they use
    /// (`commandBuffer`) or not (`commandBufferWithUnretainedReferences`,
    /// MLX's setting and the default). [`MetalConfig::for_policy`] turns it
    /// on for the `Retained` policy only.
    pub retained_references: bool,
    /// Whether to use a residency set where the OS has them (macOS 15+).
    pub residency_sets: bool,
    /// The wired budget: bytes of buffers the residency set may hold
    /// (MLX's wired limit). `None`: the device's recommended working set.
    /// Buffers past it work, unwired.
    pub wired_limit: Option<u64>,
}

impl Default for MetalConfig {
    fn default() -> Self {
        MetalConfig {
            retained_references: false,
            residency_sets: true,
            wired_limit: None,
        }
    }
}

impl MetalConfig {
    /// The settings for an allocator with `policy`: retained references
    /// for [`PolicyKind::Retained`] (the fix proposed for MLX), unretained
    /// ones, as MLX has them, for `Deferred` and `Immediate`.
    pub fn for_policy(policy: PolicyKind) -> Self {
        MetalConfig::default().with_retained_references(policy == PolicyKind::Retained)
    }

    /// With command buffers that retain (`true`) or do not retain the
    /// objects they use.
    pub fn with_retained_references(mut self, on: bool) -> Self {
        self.retained_references = on;
        self
    }

    /// With or without a residency set.
    pub fn with_residency_sets(mut self, on: bool) -> Self {
        self.residency_sets = on;
        self
    }

    /// With a wired budget of `bytes` (`None`: the recommended working set).
    pub fn with_wired_limit(mut self, bytes: Option<u64>) -> Self {
        self.wired_limit = bytes;
        self
    }
}

/// Whether a Metal device can be opened here; the error says why not (on
/// another platform: that Metal exists only on Apple's).
pub fn probe() -> Result<(), DeviceError> {
    #[cfg(target_vendor = "apple")]
    {
        match objc2_metal::MTLCreateSystemDefaultDevice() {
            Some(_) => Ok(()),
            None => Err(DeviceError::Unsupported(
                "no Metal device (MTLCreateSystemDefaultDevice returned nil)".into(),
            )),
        }
    }
    #[cfg(not(target_vendor = "apple"))]
    {
        Err(DeviceError::Unsupported(format!(
            "the Metal backend runs only on Apple platforms; this build is for {}",
            std::env::consts::OS
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_follows_the_policy() {
        assert!(MetalConfig::for_policy(PolicyKind::Retained).retained_references);
        assert!(!MetalConfig::for_policy(PolicyKind::Deferred).retained_references);
        assert!(!MetalConfig::for_policy(PolicyKind::Immediate).retained_references);
        let c = MetalConfig::default()
            .with_residency_sets(false)
            .with_wired_limit(Some(1 << 30));
        assert!(!c.residency_sets);
        assert_eq!(c.wired_limit, Some(1 << 30));
    }

    #[cfg(not(target_vendor = "apple"))]
    #[test]
    fn probing_elsewhere_says_why() {
        let e = probe().unwrap_err();
        assert!(e.to_string().contains("only on Apple platforms"), "{e}");
    }
}
