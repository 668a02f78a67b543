//! Building a backend by name, with its validation layer, for the commands.
//!
//! Each backend is one arm of [`with_backend`]; everything else in the CLI is
//! generic over [`inflight::Harness`], and reads the backend's validation
//! layer through [`Validator`].

use std::time::Duration;

use inflight::backend::sim::faults::Faults;
use inflight::backend::sim::validation::ValidationMode;
use inflight::backend::sim::{Backing, SimConfig, SimGpu};

use serde::Serialize;

/// The backends this build knows.
#[derive(Copy, Clone, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendName {
    /// The simulated GPU with its validation layer (needs nothing installed).
    Sim,
    /// An NVIDIA GPU through the CUDA driver (device 0); no validation layer,
    /// so hazards show as corrupted checksums.
    #[cfg(feature = "cuda")]
    Cuda,
    /// Vulkan (lavapipe without a GPU): the Khronos validation layer when
    /// installed (`INFLIGHT_VULKAN_VALIDATION=0` turns it off, `=1` requires
    /// it); `INFLIGHT_VULKAN_DEVICE` chooses the device.
    #[cfg(feature = "vulkan")]
    Vulkan,
    /// Metal (macOS): buffers and command buffers made as MLX makes them,
    /// command buffers with retained references under `--policy retained`
    /// only; no validation layer the harness reads (`MTL_DEBUG_LAYER=1`
    /// asserts instead: docs/METAL.md).
    #[cfg(feature = "metal")]
    Metal,
}

/// What a backend injected (see `--faults`).
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct InjectedFaults {
    pub alloc_failures: u64,
    pub submission_failures: u64,
    pub device_lost: bool,
}

/// A backend's validation layer, as the harness sees it.
pub trait Validator: Send + Sync {
    /// Violations (validation messages) so far.
    fn violations(&self) -> u64;
    /// The first messages, in full.
    fn messages(&self) -> Vec<String>;
    /// When the layer saw its first violation, since the backend was made,
    /// if it keeps time; the harness's own 100 ms watcher is the fallback.
    fn first_seen(&self) -> Option<Duration> {
        None
    }
    /// Faults the backend injected, if it injects any.
    fn injected(&self) -> Option<InjectedFaults> {
        None
    }
    /// Where the queues spent their time so far, summed over queues: (busy,
    /// stalled in device-side waits), if the backend keeps it.
    fn queue_time(&self) -> Option<(Duration, Duration)> {
        None
    }
}

/// CUDA has no validation layer the harness can read: a reuse in flight shows
/// as a corrupted checksum, a release in flight as one too (the memory pool
/// keeps freed memory mapped) or as a device fault, reported as an error.
#[cfg(any(feature = "cuda", all(feature = "metal", target_vendor = "apple")))]
struct NoValidation;

#[cfg(any(feature = "cuda", all(feature = "metal", target_vendor = "apple")))]
impl Validator for NoValidation {
    fn violations(&self) -> u64 {
        0
    }

    fn messages(&self) -> Vec<String> {
        Vec::new()
    }
}

/// Backend options the commands share.
#[derive(Clone, Debug, Default)]
pub struct BackendOptions {
    pub seed: u64,
    pub abort_on_violation: bool,
    /// Settings only the simulated GPU reads.
    pub sim: SimOptions,
}

/// Changes to the simulated GPU's defaults.
#[derive(Clone, Debug, Default)]
pub struct SimOptions {
    /// No host memory behind buffers: sizes accounted, uses validated.
    pub accounting: bool,
    /// Device memory (and the largest buffer), if not the default.
    pub memory_capacity: Option<u64>,
    /// Jitter of simulated costs, if not the default.
    pub jitter: Option<f64>,
    /// Refused allocations and failed submissions, each at this rate.
    pub fault_rate: f64,
    /// Lose the device after this many submissions.
    pub lose_device_after: Option<u64>,
    /// Host time of each device allocation, if not the default.
    pub alloc_cost: Option<std::time::Duration>,
}

/// The simulated GPU's settings for these options.
pub fn sim_config(opts: &BackendOptions) -> SimConfig {
    let d = SimConfig::default();
    let capacity = opts.sim.memory_capacity.unwrap_or(d.memory_capacity);
    SimConfig {
        seed: opts.seed,
        validation: if opts.abort_on_violation {
            ValidationMode::Abort
        } else {
            ValidationMode::Record
        },
        backing: if opts.sim.accounting {
            Backing::Accounting
        } else {
            Backing::Host
        },
        memory_capacity: capacity,
        max_buffer_size: if opts.sim.memory_capacity.is_some() {
            capacity
        } else {
            d.max_buffer_size
        },
        jitter: opts.sim.jitter.unwrap_or(d.jitter),
        alloc_cost: opts.sim.alloc_cost.unwrap_or(d.alloc_cost),
        faults: Faults {
            lose_after_submissions: opts.sim.lose_device_after,
            ..Faults::at_rate(opts.sim.fault_rate, opts.seed)
        },
        ..d
    }
}

/// Something to do with a freshly built backend, whatever its type.
pub trait BackendJob {
    type Output;
    fn run<B: inflight::Harness>(
        self,
        backend: B,
        validator: &dyn Validator,
    ) -> anyhow::Result<Self::Output>;

    /// The release policy the job's allocator follows, for backends whose
    /// settings follow it (Metal's command-buffer references): read only
    /// where Metal is built.
    #[cfg_attr(not(all(feature = "metal", target_vendor = "apple")), allow(dead_code))]
    fn policy(&self) -> Option<inflight::PolicyKind> {
        None
    }
}

impl Validator for SimGpu {
    fn violations(&self) -> u64 {
        SimGpu::violations(self)
    }

    fn messages(&self) -> Vec<String> {
        self.violation_log()
            .into_iter()
            .map(|v| v.message)
            .collect()
    }

    fn first_seen(&self) -> Option<std::time::Duration> {
        self.violation_log().first().map(|v| v.seen_at)
    }

    fn queue_time(&self) -> Option<(std::time::Duration, std::time::Duration)> {
        let t = SimGpu::queue_time(self);
        Some((t.busy, t.stalled))
    }

    fn injected(&self) -> Option<InjectedFaults> {
        self.config().faults.any().then(|| {
            let i = SimGpu::injected(self);
            InjectedFaults {
                alloc_failures: i.alloc_failures,
                submission_failures: i.submission_failures,
                device_lost: i.device_lost,
            }
        })
    }
}

#[cfg(feature = "vulkan")]
impl Validator for inflight::backend::vulkan::VulkanGpu {
    /// Every error and warning the Khronos layer sent our messenger.
    fn violations(&self) -> u64 {
        inflight::backend::vulkan::VulkanGpu::violations(self) + self.warnings()
    }

    fn messages(&self) -> Vec<String> {
        self.violation_log()
            .into_iter()
            .map(|m| format!("{}: {}", m.severity, m.text))
            .collect()
    }
}

/// Builds the named backend and runs `job` on it.
pub fn with_backend<J: BackendJob>(
    name: BackendName,
    opts: &BackendOptions,
    job: J,
) -> anyhow::Result<J::Output> {
    match name {
        BackendName::Sim => {
            let gpu = SimGpu::new(sim_config(opts));
            job.run(gpu.clone(), &gpu)
        }
        #[cfg(feature = "cuda")]
        BackendName::Cuda => {
            use inflight::backend::cuda::{CudaConfig, CudaGpu};
            let gpu = CudaGpu::new(CudaConfig::default())?;
            job.run(gpu, &NoValidation)
        }
        #[cfg(feature = "vulkan")]
        BackendName::Vulkan => {
            use inflight::backend::vulkan::{ValidationRequest, VulkanConfig, VulkanGpu};
            let explicit = std::env::var_os(inflight::backend::vulkan::VALIDATION_ENV).is_some();
            let gpu = VulkanGpu::new(VulkanConfig {
                // The environment variable decides when set; else the layer
                // is used when installed.
                validation: (!explicit).then_some(ValidationRequest::IfAvailable),
                // Each error goes to stderr at once: lavapipe may crash right
                // after a release in flight, before the report is printed.
                echo_errors: true,
                ..VulkanConfig::default()
            })?;
            eprintln!(
                "vulkan: {}, validation layer {}",
                inflight::Backend::info(&gpu).name,
                if gpu.validation_enabled() {
                    "on"
                } else {
                    "OFF"
                }
            );
            job.run(gpu.clone(), &gpu)
        }
        #[cfg(feature = "metal")]
        BackendName::Metal => with_metal(job),
    }
}

/// Metal, with command-buffer references as the job's policy wants them
/// (retained for `retained`, MLX's unretained otherwise).
#[cfg(all(feature = "metal", target_vendor = "apple"))]
fn with_metal<J: BackendJob>(job: J) -> anyhow::Result<J::Output> {
    use inflight::backend::metal::{MetalConfig, MetalGpu};
    let policy = job.policy().unwrap_or(inflight::PolicyKind::Deferred);
    let gpu = MetalGpu::new(MetalConfig::for_policy(policy))?;
    eprintln!(
        "metal: {}, {} command-buffer references, residency set {}, validation layer {}",
        inflight::Backend::info(&gpu).name,
        if gpu.config().retained_references {
            "retained"
        } else {
            "unretained"
        },
        if gpu.has_residency_set() { "on" } else { "off" },
        if std::env::var("MTL_DEBUG_LAYER").is_ok_and(|v| v == "1") {
            "on (MTL_DEBUG_LAYER=1)"
        } else {
            "off"
        }
    );
    job.run(gpu, &NoValidation)
}

/// Metal runs only on Apple platforms: a clear error elsewhere.
#[cfg(all(feature = "metal", not(target_vendor = "apple")))]
fn with_metal<J: BackendJob>(_job: J) -> anyhow::Result<J::Output> {
    inflight::backend::metal::probe()?;
    anyhow::bail!("the Metal backend is not built for this platform")
}
