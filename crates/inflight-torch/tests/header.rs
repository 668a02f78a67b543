//! The C header agrees with the library: every function it declares is
//! exported, and its statistics struct has the Rust struct's size.

#![deny(clippy::undocumented_unsafe_blocks)]

mod common;

#[test]
fn the_header_matches_the_library() {
    let header = include_str!("../include/inflight_torch.h");
    let lib_path = common::built_library();
    // SAFETY: this crate's own library.
    let lib = unsafe { libloading::Library::new(&lib_path) }.unwrap();
    let mut declared = 0;
    for line in header.lines().filter(|l| !l.trim_start().starts_with('*')) {
        let Some(at) = line.find("inflight_torch_") else {
            continue;
        };
        let rest = &line[at..];
        let Some(paren) = rest.find('(') else {
            continue;
        };
        let name = &rest[..paren];
        if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        // SAFETY: only the symbol's presence is checked; it is not called.
        let found = unsafe { lib.get::<*const ()>(name.as_bytes()) };
        assert!(
            found.is_ok(),
            "{name} is declared in the header but not exported"
        );
        declared += 1;
    }
    assert_eq!(declared, 14, "functions declared");
    let open = header
        .find("typedef struct inflight_torch_stats {")
        .unwrap();
    let close = open + header[open..].find("} inflight_torch_stats;").unwrap();
    let fields = header[open..close].matches("uint64_t ").count();
    assert_eq!(
        fields * 8,
        std::mem::size_of::<inflight_torch::InflightTorchStats>(),
        "the header's struct and the Rust one differ"
    );
    std::mem::forget(lib);
}
