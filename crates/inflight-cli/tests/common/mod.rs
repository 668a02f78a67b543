//! What the CLI's end-to-end tests share: running the binary, reading its
//! output, and temporary paths. Each test file uses some of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Runs the `inflight` binary with `args`.
pub fn inflight(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_inflight"))
        .args(args)
        .output()
        .expect("the binary runs")
}

/// Both output streams, for a failure message.
pub fn text(out: &Output) -> String {
    format!(
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Exit status 0, or the test fails showing both streams.
pub fn ok(out: &Output) {
    assert_eq!(out.status.code(), Some(0), "{}", text(out));
}

/// A path in cargo's temporary folder, unique to this process.
pub fn temp(name: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{}-{name}", std::process::id()))
}

/// A path as the `&str` an argument needs.
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}
