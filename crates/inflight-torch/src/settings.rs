//! Settings made before the first allocation: the release policy, the
//! limits, the backend, and what PyTorch's hooks said before then (the
//! device count, memory fractions). The first allocation freezes them
//! ([`freeze`]); `inflight_torch_configure` after that is refused.

use parking_lot::Mutex;

use inflight::Policy;

/// Which GPU the allocators run on.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) enum BackendChoice {
    /// NVIDIA GPUs through the driver API (the default).
    Cuda,
    /// inflight's simulated GPU: "device addresses" are simulated, streams
    /// any integers (tests and CI without CUDA).
    Sim,
}

impl BackendChoice {
    /// Parses a backend's name.
    pub(crate) fn parse(name: &str) -> Result<Self, String> {
        match name.trim().to_ascii_lowercase().as_str() {
            "cuda" => Ok(BackendChoice::Cuda),
            "sim" => Ok(BackendChoice::Sim),
            other => Err(format!(
                "unknown backend {other:?}: expected \"cuda\" or \"sim\""
            )),
        }
    }
}

/// The release policy asked for (resolved to an [`inflight::Policy`] when
/// the allocators are made).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) enum PolicyChoice {
    Deferred,
    Retained,
    Immediate,
}

impl PolicyChoice {
    /// Parses a policy's name.
    pub(crate) fn parse(name: &str) -> Result<Self, String> {
        match name.trim().to_ascii_lowercase().as_str() {
            "deferred" => Ok(PolicyChoice::Deferred),
            "retained" => Ok(PolicyChoice::Retained),
            "immediate" => Ok(PolicyChoice::Immediate),
            other => Err(format!(
                "unknown policy {other:?}: expected \"deferred\", \"retained\" or \"immediate\""
            )),
        }
    }

    /// The allocator's policy.
    pub(crate) fn policy(self) -> Policy {
        match self {
            PolicyChoice::Deferred => Policy::DEFERRED,
            PolicyChoice::Retained => Policy::RETAINED,
            // SAFETY: `Policy::immediate`'s promise 1 is that a release in
            // flight is acceptable: the program asked for this policy by
            // name through `inflight_torch_configure`, whose documentation
            // says it reproduces the defect (use after free, corrupted
            // results) and exists to demonstrate it, never for real work.
            PolicyChoice::Immediate => unsafe { Policy::immediate() },
        }
    }
}

/// Everything set before the first allocation.
#[derive(Clone, Debug)]
pub(crate) struct Settings {
    pub(crate) policy: PolicyChoice,
    /// Ready bytes are trimmed to this, per device (`None`: inflight's
    /// default, the memory limit).
    pub(crate) cache_limit: Option<u64>,
    /// Reserved bytes never pass this, per device (`None`: 95% of the
    /// device's memory).
    pub(crate) memory_limit: Option<u64>,
    /// `None`: `INFLIGHT_TORCH_BACKEND` from the environment, else CUDA.
    pub(crate) backend: Option<BackendChoice>,
    /// The device count PyTorch's init hook gave (0: none yet).
    pub(crate) device_count: usize,
    /// Memory fractions set per device before the first allocation.
    pub(crate) fractions: Vec<(usize, f64)>,
    /// Whether the first allocation has frozen these.
    pub(crate) frozen: bool,
}

/// The settings, until [`freeze`].
pub(crate) static SETTINGS: Mutex<Settings> = Mutex::new(Settings {
    policy: PolicyChoice::Deferred,
    cache_limit: None,
    memory_limit: None,
    backend: None,
    device_count: 0,
    fractions: Vec::new(),
    frozen: false,
});

/// Freezes the settings and returns them, the backend resolved (from the
/// environment where none was configured).
pub(crate) fn freeze() -> (Settings, Result<BackendChoice, String>) {
    let mut s = SETTINGS.lock();
    s.frozen = true;
    let backend = match s.backend {
        Some(b) => Ok(b),
        None => match std::env::var("INFLIGHT_TORCH_BACKEND") {
            Ok(name) if !name.trim().is_empty() => {
                BackendChoice::parse(&name).map_err(|e| format!("INFLIGHT_TORCH_BACKEND: {e}"))
            }
            _ => Ok(BackendChoice::Cuda),
        },
    };
    (s.clone(), backend)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse() {
        assert_eq!(PolicyChoice::parse("Deferred"), Ok(PolicyChoice::Deferred));
        assert_eq!(
            PolicyChoice::parse(" immediate "),
            Ok(PolicyChoice::Immediate)
        );
        assert!(PolicyChoice::parse("lazy").is_err());
        assert_eq!(BackendChoice::parse("SIM"), Ok(BackendChoice::Sim));
        assert!(BackendChoice::parse("metal").is_err());
    }
}
