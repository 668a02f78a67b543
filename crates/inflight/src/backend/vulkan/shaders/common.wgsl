// Shared by every inflight Vulkan shader (build.rs prepends it).
//
// Each dispatch covers `count` words of one chunk of a span. A buffer is
// bound at an offset aligned down to the device's storage-buffer offset
// alignment; `off0`..`off2` are the word offsets of the chunk inside each
// binding. `arg` is the fill pattern, or for a checksum the index of the
// chunk's first word relative to the span's start. `slot` is the checksum's
// slot inside the bound result buffer (two words per slot: lo, hi).
struct Params {
    off0: u32,
    off1: u32,
    off2: u32,
    count: u32,
    arg: u32,
    slot: u32,
}

var<push_constant> p: Params;

const WORKGROUP: u32 = 256u;
