//! The plug-in's state: one [`inflight::Allocator`] per device, opened at
//! the device's first allocation; one queue per stream handle, adopted at
//! its first sight; and the address map of live allocations.
//!
//! # The path of a call
//!
//! - **malloc** (size, device, stream): the device's state (a `OnceLock`
//!   read), the stream's queue (a scan of the streams adopted so far, one
//!   or two in most programs), `Allocator::malloc` on it, the buffer's
//!   device address, and the buffer filed under that address.
//! - **free** (address, size, device): the buffer taken out of the
//!   device's map and dropped. The drop is the stream-ordered free: the
//!   block may serve the next allocation on its own stream at once, and
//!   anything else only once the stream's work up to the free (and that of
//!   every stream declared with `record_stream`) has completed.
//! - **record_stream** (address, stream): `Buffer::record_stream` with the
//!   stream's queue, on the device whose map holds the address.
//!
//! # Lock order
//!
//! A device's stream table's grow lock → the allocator's locks. An address
//! map shard's lock is a leaf (see `map.rs`). Buffers are dropped with no
//! lock of this crate held.

use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;

use inflight::{Allocator, Buffer, Config, Limits, Queue, MAX_QUEUES};
use parking_lot::Mutex;

use crate::guard::report;
use crate::kind::{Kind, Sim};
use crate::map::AddressMap;
use crate::settings::{freeze, BackendChoice, Settings};
use crate::stats::InflightTorchStats;

/// No memory fraction waiting to be applied (a NaN's bits: a fraction
/// stored is always finite).
const NO_FRACTION: u64 = u64::MAX;

/// The plug-in over one kind of GPU.
pub(crate) struct Plugin<K: Kind> {
    /// The configuration every device's allocator is made with.
    config: Config,
    /// One slot per device, filled at the device's first allocation: its
    /// state, or why it could not be opened (reported at each use).
    devices: Box<[DeviceSlot<K>]>,
    /// Why the devices could not be counted (no driver), if so.
    count_error: Option<String>,
    /// Per device: a memory fraction set and not yet applied (its bits),
    /// or [`NO_FRACTION`].
    fractions: Box<[AtomicU64]>,
}

/// A device's slot: its state once opened, or why it could not be.
type DeviceSlot<K> = OnceLock<Result<DeviceState<K>, String>>;

/// One device: its allocator and what maps PyTorch's handles onto it.
pub(crate) struct DeviceState<K: Kind> {
    ordinal: usize,
    alloc: Allocator<K::Gpu>,
    gpu: K::Gpu,
    extra: K::Extra,
    streams: Streams<K::Gpu>,
    live: AddressMap<Buffer<K::Gpu>>,
}

/// A stream table's slot: a handle and its queue.
type StreamSlot<B> = OnceLock<(usize, Queue<B>)>;

/// Stream handle → adopted queue, append-only, read without a lock.
struct Streams<B: inflight::Backend> {
    slots: Box<[StreamSlot<B>]>,
    /// Slots filled; written under `grow`.
    len: AtomicUsize,
    grow: Mutex<()>,
}

impl<B: inflight::Backend> Streams<B> {
    fn new() -> Self {
        Streams {
            slots: (0..MAX_QUEUES).map(|_| OnceLock::new()).collect(),
            len: AtomicUsize::new(0),
            grow: Mutex::new(()),
        }
    }

    /// The queue adopted for `handle`, if any.
    #[inline]
    fn find(&self, handle: usize) -> Option<&Queue<B>> {
        let n = self.len.load(Ordering::Acquire);
        self.slots[..n]
            .iter()
            .filter_map(OnceLock::get)
            .find(|(h, _)| *h == handle)
            .map(|(_, q)| q)
    }

    fn count(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }
}

impl<K: Kind> DeviceState<K> {
    /// The queue of stream `handle`, adopted at its first sight. `None`
    /// (reported) if it cannot be.
    #[inline]
    fn queue(&self, handle: usize) -> Option<&Queue<K::Gpu>> {
        match self.streams.find(handle) {
            Some(q) => Some(q),
            None => self.adopt(handle),
        }
    }

    #[cold]
    fn adopt(&self, handle: usize) -> Option<&Queue<K::Gpu>> {
        let s = &self.streams;
        let _grow = s.grow.lock();
        if let Some(q) = s.find(handle) {
            return Some(q);
        }
        let n = s.len.load(Ordering::Relaxed);
        if n >= s.slots.len() {
            report(&format!(
                "stream {handle:#x} on device {}: inflight supports at most {} streams per device",
                self.ordinal,
                s.slots.len()
            ));
            return None;
        }
        // SAFETY: promise 1 of `Kind::adopt` is the C ABI's contract on
        // the stream handles it is given (see `inflight_torch_malloc`):
        // PyTorch's streams live as long as the process.
        let raw = match unsafe { K::adopt(&self.gpu, handle) } {
            Ok(raw) => raw,
            Err(e) => {
                report(&format!(
                    "cannot adopt stream {handle:#x} on device {}: {e}",
                    self.ordinal
                ));
                return None;
            }
        };
        let q = match self.alloc.adopt_queue(raw) {
            Ok(q) => q,
            Err(e) => {
                report(&format!(
                    "cannot adopt stream {handle:#x} on device {}: {e}",
                    self.ordinal
                ));
                return None;
            }
        };
        let _ = s.slots[n].set((handle, q));
        s.len.store(n + 1, Ordering::Release);
        s.slots[n].get().map(|(_, q)| q)
    }
}

impl<K: Kind> Plugin<K> {
    /// The plug-in as `settings` describe it; devices are counted now and
    /// opened at their first allocation.
    pub(crate) fn new(settings: &Settings) -> Self {
        let (n, count_error) = match K::device_count(settings.device_count) {
            Ok(n) => (n, None),
            Err(e) => (0, Some(e)),
        };
        let mut config = Config::default().with_policy(settings.policy.policy());
        // Growable segments (address ranges, pages mapped on demand) unless
        // the environment turns them off, as PyTorch's expandable segments
        // are an option too.
        if let Ok(v) = std::env::var("INFLIGHT_TORCH_GROWABLE") {
            let off = matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "0" | "false" | "off" | "no"
            );
            config = config.with_growable(!off);
        }
        config.memory_limit = settings.memory_limit;
        config.cache_limit = settings.cache_limit;
        let fractions: Box<[AtomicU64]> = (0..n).map(|_| AtomicU64::new(NO_FRACTION)).collect();
        for &(d, f) in &settings.fractions {
            if let Some(slot) = fractions.get(d) {
                slot.store(f.to_bits(), Ordering::Relaxed);
            }
        }
        Plugin {
            config,
            devices: (0..n).map(|_| OnceLock::new()).collect(),
            count_error,
            fractions,
        }
    }

    /// Devices, as counted at the start.
    pub(crate) fn device_count(&self) -> usize {
        self.devices.len()
    }

    /// Device `device`, opened if this is its first use; `None` (reported)
    /// if it is out of range or cannot be opened.
    #[inline]
    fn device(&self, device: c_int, what: &str) -> Option<&DeviceState<K>> {
        let slot = self.slot(device, what)?;
        let d = device as usize;
        match slot.get_or_init(|| self.open(d)) {
            Ok(state) => {
                if self.fractions[d].load(Ordering::Relaxed) != NO_FRACTION {
                    self.apply_fraction(state);
                }
                Some(state)
            }
            Err(e) => {
                report(&format!("{what}: device {device} is unavailable: {e}"));
                None
            }
        }
    }

    /// Device `device` if it has been opened; `None` (not reported) if not.
    #[inline]
    fn opened(&self, device: usize) -> Option<&DeviceState<K>> {
        match self.devices.get(device)?.get() {
            Some(Ok(state)) => Some(state),
            _ => None,
        }
    }

    /// The slot of device `device`; `None` (reported) if out of range.
    #[inline]
    fn slot(&self, device: c_int, what: &str) -> Option<&DeviceSlot<K>> {
        let slot = usize::try_from(device)
            .ok()
            .and_then(|d| self.devices.get(d));
        if slot.is_none() {
            self.out_of_range(device, what);
        }
        slot
    }

    #[cold]
    fn out_of_range(&self, device: c_int, what: &str) {
        match &self.count_error {
            Some(e) => report(&format!(
                "{what} on device {device}: no device is available: {e}"
            )),
            None => report(&format!(
                "{what}: device {device} is out of range (there are {} devices)",
                self.devices.len()
            )),
        }
    }

    #[cold]
    fn open(&self, d: usize) -> Result<DeviceState<K>, String> {
        let (gpu, extra) = K::open(d, self.devices.len())?;
        let _scope = K::enter(&extra);
        let alloc = Allocator::new(gpu.clone(), self.config.clone()).map_err(|e| e.to_string())?;
        Ok(DeviceState {
            ordinal: d,
            alloc,
            gpu,
            extra,
            streams: Streams::new(),
            live: AddressMap::new(),
        })
    }

    /// Applies the memory fraction waiting for `state`'s device, if any:
    /// the memory limit becomes that fraction of the device's capacity
    /// (clamped to 1 byte .. capacity), the cache limit the configured one
    /// or the memory limit, whichever is lower, and the GC limit 95% of it.
    #[cold]
    fn apply_fraction(&self, state: &DeviceState<K>) {
        let bits = self.fractions[state.ordinal].swap(NO_FRACTION, Ordering::AcqRel);
        if bits == NO_FRACTION {
            return;
        }
        let fraction = f64::from_bits(bits).clamp(0.0, 1.0);
        let capacity = state.alloc.device_info().memory_capacity;
        let memory = ((capacity as f64 * fraction) as u64).clamp(1, capacity);
        let limits = Limits {
            memory,
            cache: self.config.cache_limit.unwrap_or(memory).min(memory),
            gc: (memory / 20 * 19).max(1),
        };
        let _scope = K::enter(&state.extra);
        if let Err(e) = state.alloc.set_limits(limits) {
            report(&format!(
                "memory fraction {fraction} on device {}: {e}",
                state.ordinal
            ));
        }
    }

    /// `inflight_torch_malloc`'s body.
    #[inline]
    pub(crate) fn malloc(&self, size: usize, device: c_int, stream: usize) -> *mut c_void {
        let Some(dev) = self.device(device, "malloc") else {
            return std::ptr::null_mut();
        };
        let _scope = K::enter(&dev.extra);
        let Some(queue) = dev.queue(stream) else {
            return std::ptr::null_mut();
        };
        match dev.alloc.malloc(size as u64, queue) {
            Ok(buf) => {
                let addr = K::address(&buf);
                if let Some(old) = dev.live.insert(addr, buf) {
                    duplicate(addr, device, old);
                }
                addr as *mut c_void
            }
            Err(e) => {
                report(&format!(
                    "malloc of {size} bytes on device {device} failed, returning null: {e}"
                ));
                std::ptr::null_mut()
            }
        }
    }

    /// `inflight_torch_free`'s body.
    #[inline]
    pub(crate) fn free(&self, ptr: usize, size: usize, device: c_int) {
        let Some(slot) = self.slot(device, "free") else {
            return;
        };
        let Some(Ok(dev)) = slot.get() else {
            report(&format!(
                "free of {ptr:#x} on device {device}, where inflight_torch has allocated nothing: ignored"
            ));
            return;
        };
        let Some(buf) = dev.live.remove(ptr as u64) else {
            report(&format!(
                "free of {ptr:#x} on device {device}: not an allocation of inflight_torch there \
                 (never allocated, freed already, or inside an allocation): ignored"
            ));
            return;
        };
        if buf.len() != size as u64 {
            report(&format!(
                "free of {ptr:#x} on device {device} with size {size}: it was allocated with \
                 size {}; freed all the same",
                buf.len()
            ));
        }
        let _scope = K::enter(&dev.extra);
        drop(buf);
    }

    /// `inflight_torch_record_stream`'s body.
    pub(crate) fn record_stream(&self, ptr: usize, stream: usize) {
        let addr = ptr as u64;
        let Some(dev) = (0..self.devices.len())
            .filter_map(|d| self.opened(d))
            .find(|dev| dev.live.contains(addr))
        else {
            report(&format!(
                "record_stream of {ptr:#x}: not a live allocation of inflight_torch: ignored"
            ));
            return;
        };
        let _scope = K::enter(&dev.extra);
        let Some(queue) = dev.queue(stream) else {
            return;
        };
        match dev.live.with(addr, |buf| buf.record_stream(queue)) {
            Some(Ok(())) => {}
            Some(Err(e)) => report(&format!("record_stream of {ptr:#x}: {e}")),
            None => report(&format!(
                "record_stream of {ptr:#x}: freed while the call ran: ignored"
            )),
        }
    }

    /// `inflight_torch_empty_cache`'s body: every opened device's cache.
    pub(crate) fn empty_cache(&self) {
        for dev in (0..self.devices.len()).filter_map(|d| self.opened(d)) {
            let _scope = K::enter(&dev.extra);
            dev.alloc.clear_cache();
        }
    }

    /// `inflight_torch_set_memory_fraction`'s body.
    pub(crate) fn set_memory_fraction(&self, fraction: f64, device: c_int) {
        if self.slot(device, "set_memory_fraction").is_none() {
            return;
        }
        let d = device as usize;
        self.fractions[d].store(fraction.to_bits(), Ordering::Release);
        if let Some(state) = self.opened(d) {
            self.apply_fraction(state);
        }
    }

    /// `inflight_torch_stats`'s body: `None` (reported) for a device out of
    /// range; zeros for one not used yet.
    pub(crate) fn stats(&self, device: c_int) -> Option<InflightTorchStats> {
        self.slot(device, "stats")?;
        Some(match self.opened(device as usize) {
            Some(dev) => {
                let _scope = K::enter(&dev.extra);
                InflightTorchStats::from_stats(&dev.alloc.stats(), dev.streams.count() as u64)
            }
            None => InflightTorchStats::default(),
        })
    }

    /// `inflight_torch_reset_peak`'s body: one device, or every one (`device < 0`).
    pub(crate) fn reset_peak(&self, device: c_int) {
        if device < 0 {
            for dev in (0..self.devices.len()).filter_map(|d| self.opened(d)) {
                dev.alloc.reset_peak();
            }
        } else if self.slot(device, "reset_peak").is_some() {
            if let Some(dev) = self.opened(device as usize) {
                dev.alloc.reset_peak();
            }
        }
    }

    /// Live allocations on `device` (tests).
    pub(crate) fn live(&self, device: usize) -> usize {
        self.opened(device).map_or(0, |d| d.live.len())
    }
}

/// An address handed out while an earlier allocation at it is still live:
/// an allocator bug. The earlier buffer is leaked (its memory may be in use
/// by whoever holds it), never freed.
#[cold]
fn duplicate<B: inflight::Backend>(addr: u64, device: c_int, old: Buffer<B>) {
    report(&format!(
        "internal error: address {addr:#x} on device {device} was handed out twice; \
         the earlier allocation is leaked"
    ));
    std::mem::forget(old);
}

/// The plug-in, over the GPU chosen at the first allocation.
pub(crate) enum Runtime {
    /// The simulated GPU.
    Sim(Plugin<Sim>),
    /// CUDA.
    #[cfg(feature = "cuda")]
    Cuda(Plugin<crate::kind::Cuda>),
    /// No GPU: why (an unknown backend, or CUDA asked of a build without it).
    Unavailable(String),
}

/// Runs `$body` with `$p` bound to the runtime's plug-in, or `$none` with
/// `$why` bound to why there is none.
macro_rules! dispatch {
    ($rt:expr, $p:ident => $body:expr, $why:ident => $none:expr) => {
        match $rt {
            $crate::plugin::Runtime::Sim($p) => $body,
            #[cfg(feature = "cuda")]
            $crate::plugin::Runtime::Cuda($p) => $body,
            $crate::plugin::Runtime::Unavailable($why) => $none,
        }
    };
}
pub(crate) use dispatch;

static RUNTIME: OnceLock<Runtime> = OnceLock::new();

/// The runtime, if the first allocation has made it.
#[inline]
pub(crate) fn started() -> Option<&'static Runtime> {
    RUNTIME.get()
}

/// The runtime, made now (freezing the settings) if this is the first call.
#[inline]
pub(crate) fn start() -> &'static Runtime {
    RUNTIME.get_or_init(|| {
        let (settings, backend) = freeze();
        match backend {
            Ok(BackendChoice::Sim) => Runtime::Sim(Plugin::new(&settings)),
            #[cfg(feature = "cuda")]
            Ok(BackendChoice::Cuda) => Runtime::Cuda(Plugin::new(&settings)),
            #[cfg(not(feature = "cuda"))]
            Ok(BackendChoice::Cuda) => Runtime::Unavailable(
                "this build of inflight_torch has no CUDA backend (feature `cuda`)".into(),
            ),
            Err(e) => Runtime::Unavailable(e),
        }
    })
}

impl Runtime {
    /// The backend's name.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Runtime::Sim(_) => "sim",
            #[cfg(feature = "cuda")]
            Runtime::Cuda(_) => "cuda",
            Runtime::Unavailable(_) => "unavailable",
        }
    }
}
