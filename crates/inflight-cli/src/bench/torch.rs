//! PyTorch's CUDACachingAllocator as a peer: a small C++ harness
//! (`torch_harness.cpp`), written to a temporary folder at run time, compiled
//! against the PyTorch found by `python3` (or `INFLIGHT_TORCH_DIR`), and run
//! as a child process that prints JSON lines.
//!
//! Every step that can fail for want of something installed (no Python, no
//! torch, no headers, no compiler, no GPU) returns `Err(why)` in one line, and
//! the caller skips the row with that line.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::measure::Plan;
use super::sequences::Timing;

const HARNESS: &str = include_str!("torch_harness.cpp");

/// A PyTorch installation with its C++ headers and libraries.
pub struct Torch {
    /// The `torch` package folder (holds include/ and lib/).
    pub dir: PathBuf,
    /// `torch.__version__`, where Python told it.
    pub version: String,
    /// `_GLIBCXX_USE_CXX11_ABI` of the build, where Python told it.
    abi: Option<u8>,
    /// A folder with `cuda_runtime_api.h`.
    cuda_include: PathBuf,
    /// The C++ compiler.
    cxx: String,
}

/// One sequence as the harness measured it.
pub struct TorchRow {
    /// The pair size, or `None` for the mixed workload.
    pub bytes: Option<u64>,
    pub ops: u64,
    pub timing: Timing,
    pub device_allocations: u64,
    pub peak_reserved_bytes: u64,
    pub peak_live_bytes: u64,
    pub peak_requested_bytes: u64,
}

fn run_capture(cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .output()
        .map_err(|e| format!("{:?} could not run: {e}", cmd.get_program()))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(12).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(format!(
            "{:?} failed ({}): {}",
            cmd.get_program(),
            out.status,
            tail.join(" | ")
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Finds PyTorch, its headers, CUDA's headers and a C++ compiler.
pub fn find() -> Result<Torch, String> {
    let (dir, version, abi) = match std::env::var_os("INFLIGHT_TORCH_DIR") {
        Some(d) => (PathBuf::from(d), "unknown".to_string(), None),
        None => {
            let py = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
            let out = run_capture(Command::new(&py).args([
                "-c",
                "import torch, os; print(os.path.dirname(torch.__file__)); \
                 print(int(torch._C._GLIBCXX_USE_CXX11_ABI)); print(torch.__version__)",
            ]))
            .map_err(|e| format!("no PyTorch through {py}: {e}"))?;
            let mut lines = out.lines();
            let dir = PathBuf::from(lines.next().unwrap_or_default().trim());
            let abi = lines.next().and_then(|l| l.trim().parse().ok());
            let version = lines.next().unwrap_or("unknown").trim().to_string();
            (dir, version, abi)
        }
    };
    let header = dir.join("include/c10/cuda/CUDACachingAllocator.h");
    if !header.is_file() {
        return Err(format!(
            "PyTorch at {} has no C++ headers ({} is missing)",
            dir.display(),
            header.display()
        ));
    }
    if !dir.join("lib/libc10_cuda.so").is_file() {
        return Err(format!(
            "PyTorch at {} has no CUDA libraries (lib/libc10_cuda.so is missing)",
            dir.display()
        ));
    }
    let cuda_include = cuda_include(&dir).ok_or_else(|| {
        "no CUDA runtime headers (cuda_runtime_api.h) under CUDA_HOME, /usr/local/cuda* \
         or PyTorch's nvidia packages"
            .to_string()
    })?;
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    run_capture(Command::new(&cxx).arg("--version"))
        .map_err(|e| format!("no C++ compiler: {e}"))?;
    Ok(Torch {
        dir,
        version,
        abi,
        cuda_include,
        cxx,
    })
}

/// The first folder holding `cuda_runtime_api.h`.
fn cuda_include(torch_dir: &Path) -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(v) = std::env::var_os(var) {
            candidates.push(PathBuf::from(v).join("include"));
        }
    }
    candidates.push("/usr/local/cuda/include".into());
    let mut versioned: Vec<PathBuf> = std::fs::read_dir("/usr/local")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("cuda-"))
        })
        .map(|p| p.join("include"))
        .collect();
    versioned.sort();
    candidates.extend(versioned.into_iter().rev());
    // Wheels: site-packages/nvidia/{cu13,cuda_runtime,...}/include.
    if let Some(site) = torch_dir.parent() {
        let nvidia = site.join("nvidia");
        for e in std::fs::read_dir(&nvidia).into_iter().flatten().flatten() {
            candidates.push(e.path().join("include"));
        }
    }
    candidates
        .into_iter()
        .find(|d| d.join("cuda_runtime_api.h").is_file())
}

/// Writes the harness into a fresh temporary folder and compiles it
/// (`-std=c++17`, then `-std=c++20` if the headers need it).
pub fn build(t: &Torch) -> Result<PathBuf, String> {
    let tmp = std::env::temp_dir().join(format!("inflight-bench-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    let src = tmp.join("torch_harness.cpp");
    std::fs::write(&src, HARNESS).map_err(|e| format!("{}: {e}", src.display()))?;
    let exe = tmp.join("torch_harness");
    let lib = t.dir.join("lib");
    let mut last = String::new();
    for std in ["-std=c++17", "-std=c++20"] {
        let mut cmd = Command::new(&t.cxx);
        cmd.args(["-O2", std, "-o"])
            .arg(&exe)
            .arg(&src)
            .arg(format!("-I{}", t.dir.join("include").display()))
            .arg(format!(
                "-I{}",
                t.dir.join("include/torch/csrc/api/include").display()
            ))
            .arg(format!("-I{}", t.cuda_include.display()))
            .arg(format!("-L{}", lib.display()))
            .arg(format!("-Wl,-rpath,{}", lib.display()))
            .args(["-ltorch", "-lc10", "-lc10_cuda", "-ltorch_cuda"]);
        if let Some(abi) = t.abi {
            cmd.arg(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"));
        }
        match run_capture(&mut cmd) {
            Ok(_) => return Ok(exe),
            Err(e) => last = e,
        }
    }
    Err(format!("the PyTorch harness did not compile: {last}"))
}

/// Runs the harness over `plan`'s sequences; checks its size checksum.
pub fn run(exe: &Path, plan: &Plan) -> Result<Vec<TorchRow>, String> {
    let m = &plan.mixed;
    let mut cmd = Command::new(exe);
    cmd.arg(plan.pairs.to_string())
        .arg(plan.batches.to_string())
        .arg(m.seed.to_string())
        .arg(m.live.to_string())
        .arg(m.ops.len().to_string())
        .arg(m.min.to_string())
        .arg(m.max.to_string())
        .args(plan.pair_sizes.iter().map(|s| s.to_string()));
    let out = run_capture(&mut cmd)?;
    let mut lines = out.lines().filter(|l| l.starts_with('{'));
    let head: serde_json::Value = lines
        .next()
        .and_then(|l| serde_json::from_str(l).ok())
        .ok_or("the harness printed no header")?;
    let theirs = head["checksum"].as_str().unwrap_or_default();
    let ours = format!("{:016x}", m.checksum);
    if theirs != ours {
        return Err(format!(
            "the harness generated other sizes (checksum {theirs}, ours {ours})"
        ));
    }
    let mut rows = Vec::new();
    for l in lines {
        let v: serde_json::Value =
            serde_json::from_str(l).map_err(|e| format!("bad harness line ({e}): {l}"))?;
        let ns: Vec<f64> = v["ns"]
            .as_array()
            .ok_or("no ns")?
            .iter()
            .filter_map(|x| x.as_f64())
            .collect();
        let n = |k: &str| v[k].as_u64().ok_or(format!("no {k} in {l}"));
        rows.push(TorchRow {
            bytes: if v["sequence"] == "mixed" {
                None
            } else {
                Some(n("bytes")?)
            },
            ops: n("ops")?,
            timing: Timing::from_batches(ns),
            device_allocations: n("device_allocations")?,
            peak_reserved_bytes: n("peak_reserved_bytes")?,
            peak_live_bytes: n("peak_live_bytes")?,
            peak_requested_bytes: n("peak_requested_bytes")?,
        });
    }
    let _ = std::fs::remove_dir_all(exe.parent().unwrap_or(exe));
    Ok(rows)
}
