//! Building a backend by name, with its validation layer, for the commands.
//!
//! Each backend is one arm of [`with_backend`]; everything else in the CLI is
//! generic over [`inflight::Backend`].

use inflight::backend::sim::validation::ValidationMode;
use inflight::backend::sim::{Backing, SimConfig, SimGpu};

use crate::repro::Validator;

/// The backends this build knows.
#[derive(Copy, Clone, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendName {
    /// The simulated GPU with its validation layer (needs nothing installed).
    Sim,
    /// An NVIDIA GPU through the CUDA driver (device 0); no validation layer,
    /// so hazards show as corrupted checksums.
    #[cfg(feature = "cuda")]
    Cuda,
}

/// CUDA has no validation layer the harness can read: a reuse in flight shows
/// as a corrupted checksum, a release in flight as one too (the memory pool
/// keeps freed memory mapped) or as a device fault, reported as an error.
#[cfg(feature = "cuda")]
struct NoValidation;

#[cfg(feature = "cuda")]
impl Validator for NoValidation {
    fn violations(&self) -> u64 {
        0
    }

    fn messages(&self) -> Vec<String> {
        Vec::new()
    }
}

/// Backend options the commands share.
#[derive(Clone, Debug)]
pub struct BackendOptions {
    pub seed: u64,
    pub abort_on_violation: bool,
    /// Simulate an accounting-only GPU of an H100's 80 GiB (no host memory
    /// behind buffers), for measuring the allocator alone.
    pub accounting: bool,
}

/// Something to do with a freshly built backend, whatever its type.
pub trait BackendJob {
    type Output;
    fn run<B: inflight::Backend>(
        self,
        backend: B,
        validator: &dyn Validator,
    ) -> anyhow::Result<Self::Output>;
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
}

/// Builds the named backend and runs `job` on it.
pub fn with_backend<J: BackendJob>(
    name: BackendName,
    opts: &BackendOptions,
    job: J,
) -> anyhow::Result<J::Output> {
    match name {
        BackendName::Sim => {
            let gpu = SimGpu::new(SimConfig {
                seed: opts.seed,
                validation: if opts.abort_on_violation {
                    ValidationMode::Abort
                } else {
                    ValidationMode::Record
                },
                ..if opts.accounting {
                    SimConfig {
                        backing: Backing::Accounting,
                        memory_capacity: 80 << 30,
                        ..SimConfig::default()
                    }
                } else {
                    SimConfig::default()
                }
            });
            job.run(gpu.clone(), &gpu)
        }
        #[cfg(feature = "cuda")]
        BackendName::Cuda => {
            use inflight::backend::cuda::{CudaConfig, CudaGpu};
            let gpu = CudaGpu::new(CudaConfig::default())?;
            job.run(gpu, &NoValidation)
        }
    }
}
