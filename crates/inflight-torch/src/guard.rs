//! The boundary: every `extern "C"` entry point runs its body through
//! [`call`], which catches a panic (it must never unwind into PyTorch's
//! C++ frames: Rust aborts the process if it tries) and turns it into a
//! one-line message on stderr and the entry point's fallback value (a null
//! pointer, an error code, nothing).
//!
//! Messages all go through [`report`]: one line each, prefixed
//! `inflight_torch:`, so that a program's log shows where they came from.
//!
//! For tests, [`arm`] makes the next call of one entry point panic inside
//! the boundary (`inflight_torch_debug_arm_panic`); an unarmed call pays one
//! relaxed atomic load for it.

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU32, Ordering};

/// The entry points, for messages and for arming a panic.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
#[repr(u32)]
pub(crate) enum Entry {
    Malloc = 1 << 0,
    Free = 1 << 1,
    RecordStream = 1 << 2,
    EmptyCache = 1 << 3,
    Init = 1 << 4,
    MemoryFraction = 1 << 5,
    Configure = 1 << 6,
    Stats = 1 << 7,
    ResetPeak = 1 << 8,
}

impl Entry {
    /// Every entry point, for looking one up by name.
    pub(crate) const ALL: [Entry; 9] = [
        Entry::Malloc,
        Entry::Free,
        Entry::RecordStream,
        Entry::EmptyCache,
        Entry::Init,
        Entry::MemoryFraction,
        Entry::Configure,
        Entry::Stats,
        Entry::ResetPeak,
    ];

    /// The C function's name.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Entry::Malloc => "inflight_torch_malloc",
            Entry::Free => "inflight_torch_free",
            Entry::RecordStream => "inflight_torch_record_stream",
            Entry::EmptyCache => "inflight_torch_empty_cache",
            Entry::Init => "inflight_torch_init",
            Entry::MemoryFraction => "inflight_torch_set_memory_fraction",
            Entry::Configure => "inflight_torch_configure",
            Entry::Stats => "inflight_torch_stats",
            Entry::ResetPeak => "inflight_torch_reset_peak",
        }
    }
}

/// Entry points whose next call panics (a bit each; tests only).
static ARMED: AtomicU32 = AtomicU32::new(0);

/// Makes the next call of `entry` panic inside the boundary.
pub(crate) fn arm(entry: Entry) {
    ARMED.fetch_or(entry as u32, Ordering::Relaxed);
}

/// Prints one line on stderr, prefixed `inflight_torch:` (newlines inside
/// `msg` are folded, so that it stays one line).
#[cold]
pub(crate) fn report(msg: &str) {
    let line = msg.replace('\n', "; ");
    eprintln!("inflight_torch: {line}");
}

/// Runs `body`; a panic inside it is reported and `fallback` returned.
#[inline(always)]
pub(crate) fn call<R>(entry: Entry, fallback: R, body: impl FnOnce() -> R) -> R {
    match catch_unwind(AssertUnwindSafe(|| {
        if ARMED.load(Ordering::Relaxed) != 0 {
            fire(entry);
        }
        body()
    })) {
        Ok(r) => r,
        Err(payload) => {
            caught(entry, payload);
            fallback
        }
    }
}

/// Panics if `entry` is armed, disarming it.
#[cold]
fn fire(entry: Entry) {
    let bit = entry as u32;
    if ARMED.fetch_and(!bit, Ordering::Relaxed) & bit != 0 {
        panic!("a test panic armed in {}", entry.name());
    }
}

/// Reports a panic caught at the boundary.
#[cold]
fn caught(entry: Entry, payload: Box<dyn Any + Send>) {
    let what = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic with no message".into());
    report(&format!(
        "internal error in {}: {what} (caught at the boundary; the call did nothing)",
        entry.name()
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_the_fallback() {
        assert_eq!(call(Entry::Stats, -3, || -> i32 { panic!("boom") }), -3);
        assert_eq!(call(Entry::Stats, -3, || 0), 0);
    }

    #[test]
    fn an_armed_entry_panics_once() {
        arm(Entry::ResetPeak);
        assert_eq!(call(Entry::ResetPeak, 1, || 0), 1);
        assert_eq!(call(Entry::ResetPeak, 1, || 0), 0);
    }
}
