//! Loading the built shared library, as PyTorch does (`dlopen` and symbol
//! lookup), and running a test body in a child process whose stderr is
//! read back.
//!
//! `cargo test` builds the library with both its crate types, so the
//! `cdylib` lies beside the test executable's `deps` folder:
//! `target/<profile>/deps/libinflight_torch.so` (or one folder up).
//! `INFLIGHT_TORCH_LIB` overrides that.
//!
//! Each in-process test loads its own copy (a file of its own in cargo's
//! test scratch folder): the library keeps its state in statics, so copies
//! keep tests independent of each other. Copies are never unloaded (a Rust
//! library unloaded while its threads' thread-locals live would crash at
//! their exit).

#![allow(dead_code)]

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::PathBuf;
use std::process::Command;

pub use inflight_torch::InflightTorchStats;

/// Where `cargo test` left the shared library.
pub fn built_library() -> PathBuf {
    if let Ok(p) = std::env::var("INFLIGHT_TORCH_LIB") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("the test executable's path");
    let deps = exe.parent().expect("the executable's folder");
    let name = format!(
        "{}inflight_torch{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    );
    for dir in [Some(deps), deps.parent()].into_iter().flatten() {
        let p = dir.join(&name);
        if p.exists() {
            return p;
        }
    }
    panic!(
        "{name} not found beside {} (build it with `cargo build -p inflight-torch`, or set INFLIGHT_TORCH_LIB)",
        exe.display()
    );
}

/// The library's entry points, from one loaded copy.
pub struct Lib {
    pub malloc: unsafe extern "C" fn(isize, c_int, *mut c_void) -> *mut c_void,
    pub free: unsafe extern "C" fn(*mut c_void, isize, c_int, *mut c_void),
    pub record_stream: unsafe extern "C" fn(*mut c_void, *mut c_void),
    pub empty_cache: extern "C" fn(),
    pub init: extern "C" fn(c_int),
    pub set_memory_fraction: extern "C" fn(f64, c_int),
    pub configure: unsafe extern "C" fn(*const c_char, i64, i64, *const c_char) -> c_int,
    pub stats_raw: unsafe extern "C" fn(c_int, *mut InflightTorchStats, usize) -> c_int,
    pub reset_peak: extern "C" fn(c_int),
    pub backend_raw: extern "C" fn() -> *const c_char,
    pub device_count: extern "C" fn() -> c_int,
    pub live: extern "C" fn(c_int) -> usize,
    pub arm_raw: unsafe extern "C" fn(*const c_char) -> c_int,
    pub abi_version: extern "C" fn() -> u32,
}

impl Lib {
    /// Loads the built library itself (for a child process: one load).
    pub fn load_built() -> Lib {
        Self::load_from(built_library())
    }

    /// Loads a copy of its own, named after `tag`.
    pub fn load_copy(tag: &str) -> Lib {
        let src = built_library();
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        std::fs::create_dir_all(&dir).unwrap();
        let dst = dir.join(format!(
            "libinflight_torch_{tag}_{}{}",
            std::process::id(),
            std::env::consts::DLL_SUFFIX
        ));
        std::fs::copy(&src, &dst).unwrap();
        Self::load_from(dst)
    }

    fn load_from(path: PathBuf) -> Lib {
        // SAFETY: the library is this crate's own; its initialisers do
        // nothing but Rust's usual setup.
        let lib = unsafe { libloading::Library::new(&path) }
            .unwrap_or_else(|e| panic!("cannot load {}: {e}", path.display()));
        // Never unloaded (see the module doc).
        let lib: &'static libloading::Library = Box::leak(Box::new(lib));
        macro_rules! sym {
            ($name:literal) => {
                // SAFETY: the symbol is one of the library's entry points,
                // whose C signature is the field's type.
                *unsafe { lib.get($name) }
                    .unwrap_or_else(|e| panic!("missing {}: {e}", String::from_utf8_lossy($name)))
            };
        }
        Lib {
            malloc: sym!(b"inflight_torch_malloc"),
            free: sym!(b"inflight_torch_free"),
            record_stream: sym!(b"inflight_torch_record_stream"),
            empty_cache: sym!(b"inflight_torch_empty_cache"),
            init: sym!(b"inflight_torch_init"),
            set_memory_fraction: sym!(b"inflight_torch_set_memory_fraction"),
            configure: sym!(b"inflight_torch_configure"),
            stats_raw: sym!(b"inflight_torch_stats"),
            reset_peak: sym!(b"inflight_torch_reset_peak"),
            backend_raw: sym!(b"inflight_torch_backend"),
            device_count: sym!(b"inflight_torch_device_count"),
            live: sym!(b"inflight_torch_live_allocations"),
            arm_raw: sym!(b"inflight_torch_debug_arm_panic"),
            abi_version: sym!(b"inflight_torch_abi_version"),
        }
    }

    /// Configures; `None`s are nulls, negative limits defaults.
    pub fn configure(
        &self,
        policy: Option<&str>,
        cache: i64,
        memory: i64,
        backend: Option<&str>,
    ) -> c_int {
        let policy = policy.map(|s| CString::new(s).unwrap());
        let backend = backend.map(|s| CString::new(s).unwrap());
        let p = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
        // SAFETY: null or NUL-terminated strings that outlive the call.
        unsafe { (self.configure)(p(&policy), cache, memory, p(&backend)) }
    }

    /// Allocates on the simulated GPU (any stream handle is valid there).
    pub fn alloc(&self, size: isize, device: c_int, stream: usize) -> usize {
        // SAFETY: on the simulated GPU every stream handle is valid.
        unsafe { (self.malloc)(size, device, stream as *mut c_void) as usize }
    }

    /// Frees on the simulated GPU.
    pub fn dealloc(&self, ptr: usize, size: isize, device: c_int, stream: usize) {
        // SAFETY: as for `alloc`.
        unsafe { (self.free)(ptr as *mut c_void, size, device, stream as *mut c_void) }
    }

    /// Declares a use on another simulated stream.
    pub fn record(&self, ptr: usize, stream: usize) {
        // SAFETY: as for `alloc`.
        unsafe { (self.record_stream)(ptr as *mut c_void, stream as *mut c_void) }
    }

    /// Device `device`'s statistics, or the error code.
    pub fn stats(&self, device: c_int) -> Result<InflightTorchStats, c_int> {
        let mut s = InflightTorchStats::default();
        // SAFETY: `s` is valid for writes of its size.
        let rc = unsafe { (self.stats_raw)(device, &mut s, std::mem::size_of_val(&s)) };
        if rc == 0 {
            Ok(s)
        } else {
            Err(rc)
        }
    }

    /// The backend's name.
    pub fn backend(&self) -> String {
        // SAFETY: the library returns a static NUL-terminated string.
        unsafe { CStr::from_ptr((self.backend_raw)()) }
            .to_string_lossy()
            .into_owned()
    }

    /// Arms a panic in the next call of `entry`.
    pub fn arm(&self, entry: &str) -> c_int {
        let c = CString::new(entry).unwrap();
        // SAFETY: a NUL-terminated string that outlives the call.
        unsafe { (self.arm_raw)(c.as_ptr()) }
    }
}

/// The variable that tells a test executable it is a child (see [`child`]).
pub const CHILD: &str = "INFLIGHT_TORCH_TEST_CHILD";

/// Whether this process is the child running `name`.
pub fn is_child(name: &str) -> bool {
    std::env::var(CHILD).as_deref() == Ok(name)
}

/// What a child run gave back.
pub struct ChildRun {
    pub success: bool,
    pub code: Option<i32>,
    pub stderr: String,
    pub stdout: String,
}

impl ChildRun {
    /// The library's lines on stderr.
    pub fn lines(&self) -> Vec<&str> {
        self.stderr
            .lines()
            .filter(|l| l.starts_with("inflight_torch:"))
            .collect()
    }

    /// Whether one of the library's lines contains every one of `parts`.
    pub fn said(&self, parts: &[&str]) -> bool {
        self.lines()
            .iter()
            .any(|l| parts.iter().all(|p| l.contains(p)))
    }
}

/// Runs test `name` of this executable in a child process (with `env`
/// set), which does its work only there (see [`is_child`]), and returns
/// its exit status and output.
pub fn child(name: &str, env: &[(&str, &str)]) -> ChildRun {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = Command::new(exe);
    cmd.args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, name)
        .env_remove("INFLIGHT_TORCH_BACKEND");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("the child runs");
    ChildRun {
        success: out.status.success(),
        code: out.status.code(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
    }
}
