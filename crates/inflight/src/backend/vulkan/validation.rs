//! Validation mode: the Khronos validation layer is the referee, and this
//! module keeps its score.
//!
//! When validation is on, the instance enables `VK_LAYER_KHRONOS_validation`
//! and a `VK_EXT_debug_utils` messenger whose callback lands in
//! `ValidationLog::record`: every error- or warning-severity message from
//! the layer is counted, and the first [`KEPT_MESSAGES`] are kept in full.
//! The counts are the layer's own, never inferred from our bookkeeping.
//!
//! lavapipe really frees memory, so a release in flight may crash the process
//! right after the layer's message: `ValidationLog::record` also writes each
//! error to stderr at once (when [`ValidationLog::echo`] is set), so that a
//! parent process sees the message even if the child dies.

use std::ffi::{c_void, CStr};
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use ash::vk;
use parking_lot::Mutex;

/// How many messages are kept in full.
pub const KEPT_MESSAGES: usize = 64;

/// Whether to enable the validation layer.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub enum ValidationRequest {
    /// Never.
    #[default]
    Off,
    /// When the layer is installed; otherwise run without it.
    IfAvailable,
    /// Always; creating the backend fails if the layer is missing.
    Required,
}

/// One message from the validation layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerMessage {
    /// `ERROR` or `WARNING`.
    pub severity: &'static str,
    /// The VUID or message id name, e.g. `VUID-vkDestroyBuffer-buffer-00922`.
    pub id: String,
    /// The full text.
    pub text: String,
}

/// The layer's score: counts and the first messages.
#[derive(Default)]
pub struct ValidationLog {
    errors: AtomicU64,
    warnings: AtomicU64,
    kept: Mutex<Vec<LayerMessage>>,
    echo: AtomicBool,
}

impl ValidationLog {
    /// Error-severity messages so far.
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Acquire)
    }

    /// Warning-severity messages so far.
    pub fn warnings(&self) -> u64 {
        self.warnings.load(Ordering::Acquire)
    }

    /// The first messages, in full.
    pub fn kept(&self) -> Vec<LayerMessage> {
        self.kept.lock().clone()
    }

    /// Whether each error is also written to stderr as it arrives.
    pub fn echo(&self, on: bool) {
        self.echo.store(on, Ordering::Release);
    }

    fn record(&self, severity: &'static str, id: String, text: String) {
        let counter = if severity == "ERROR" {
            &self.errors
        } else {
            &self.warnings
        };
        counter.fetch_add(1, Ordering::AcqRel);
        if self.echo.load(Ordering::Acquire) {
            // Written and flushed before returning to the layer: the driver
            // may crash right after an error about a released buffer.
            let mut err = std::io::stderr().lock();
            let _ = writeln!(err, "inflight: vulkan validation {severity}: {text}");
            let _ = err.flush();
        }
        let mut kept = self.kept.lock();
        if kept.len() < KEPT_MESSAGES {
            kept.push(LayerMessage { severity, id, text });
        }
    }
}

/// The messenger's create info, pointing its user data at `log`.
///
/// The caller keeps `log` alive, at the same address, until the messenger
/// and the instance it was chained into are destroyed.
pub(crate) fn messenger_info(log: &ValidationLog) -> vk::DebugUtilsMessengerCreateInfoEXT<'static> {
    vk::DebugUtilsMessengerCreateInfoEXT::default()
        .message_severity(
            vk::DebugUtilsMessageSeverityFlagsEXT::ERROR
                | vk::DebugUtilsMessageSeverityFlagsEXT::WARNING,
        )
        .message_type(
            vk::DebugUtilsMessageTypeFlagsEXT::GENERAL
                | vk::DebugUtilsMessageTypeFlagsEXT::VALIDATION
                | vk::DebugUtilsMessageTypeFlagsEXT::PERFORMANCE,
        )
        .pfn_user_callback(Some(on_message))
        .user_data(log as *const ValidationLog as *mut c_void)
}

/// The debug-utils callback.
///
/// # Safety
///
/// 1. `user_data` is the `ValidationLog` given to [`messenger_info`], alive.
/// 2. `data`, when not null, points at a valid callback-data struct whose
///    strings, when not null, are NUL-terminated (the loader's promise).
unsafe extern "system" fn on_message(
    severity: vk::DebugUtilsMessageSeverityFlagsEXT,
    _types: vk::DebugUtilsMessageTypeFlagsEXT,
    data: *const vk::DebugUtilsMessengerCallbackDataEXT<'_>,
    user_data: *mut c_void,
) -> vk::Bool32 {
    // A panic must not unwind into the layer's C++ frames.
    let _ = std::panic::catch_unwind(|| {
        if user_data.is_null() || data.is_null() {
            return;
        }
        // SAFETY: by (1), `user_data` is a live `ValidationLog`.
        let log = unsafe { &*(user_data as *const ValidationLog) };
        // SAFETY: by (2), `data` is valid for the duration of the call.
        let data = unsafe { &*data };
        let text = |p: *const std::ffi::c_char| {
            if p.is_null() {
                return String::new();
            }
            // SAFETY: by (2), a non-null string is NUL-terminated and lives
            // for the duration of the call.
            unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
        };
        let sev = if severity.contains(vk::DebugUtilsMessageSeverityFlagsEXT::ERROR) {
            "ERROR"
        } else {
            "WARNING"
        };
        log.record(sev, text(data.p_message_id_name), text(data.p_message));
    });
    vk::FALSE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_counts_and_keeps_the_first_messages() {
        let log = ValidationLog::default();
        for i in 0..(KEPT_MESSAGES + 3) {
            log.record("ERROR", format!("VUID-{i}"), "text".into());
        }
        log.record("WARNING", "W".into(), "w".into());
        assert_eq!(log.errors(), KEPT_MESSAGES as u64 + 3);
        assert_eq!(log.warnings(), 1);
        let kept = log.kept();
        assert_eq!(kept.len(), KEPT_MESSAGES);
        assert_eq!(kept[0].id, "VUID-0");
    }
}
