// The harness operations in the Metal Shading Language, compiled at run
// time with newLibraryWithSource:options:error: (src/backend/metal/device.rs).
//
// Every operand is bound with setBuffer:offset:atIndex: at the first byte of
// its span (the binding's offset plus the span's), so index 0 is the span's
// first word. Each kernel walks `count` words with a grid-stride loop;
// `count` is at most 2^31, so `i + threads` never wraps. Parameters come
// with setBytes:length:atIndex: at index 3, the checksum's result slots at
// index 4.

#include <metal_stdlib>
using namespace metal;

struct Params {
    uint count; // words in the span
    uint arg;   // the fill pattern
    uint slot;  // the checksum's slot in the bound result buffer
};

// Threads per threadgroup of every dispatch (the checksum reduces them); a
// macro, so it is a constant expression for the threadgroup array's size.
#define GROUP 256u

kernel void inflight_fill(device uint* dst [[buffer(0)]],
                          constant Params& p [[buffer(3)]],
                          uint gid [[thread_position_in_grid]],
                          uint threads [[threads_per_grid]]) {
    for (uint i = gid; i < p.count; i += threads) {
        dst[i] = p.arg;
    }
}

kernel void inflight_copy(device const uint* src [[buffer(0)]],
                          device uint* dst [[buffer(1)]],
                          constant Params& p [[buffer(3)]],
                          uint gid [[thread_position_in_grid]],
                          uint threads [[threads_per_grid]]) {
    for (uint i = gid; i < p.count; i += threads) {
        dst[i] = src[i];
    }
}

kernel void inflight_add(device const uint* a [[buffer(0)]],
                         device const uint* b [[buffer(1)]],
                         device uint* out [[buffer(2)]],
                         constant Params& p [[buffer(3)]],
                         uint gid [[thread_position_in_grid]],
                         uint threads [[threads_per_grid]]) {
    for (uint i = gid; i < p.count; i += threads) {
        out[i] = a[i] + b[i];
    }
}

// checksum_words (src/backend/mod.rs): the wrapping u64 sum over the span's
// words w[i] of (w[i] ^ (i * 0x9E3779B1)) and w[i] rotated left by 7, each
// a u32 widened to u64, with i counted from the span's first word and the
// multiply wrapping in u32. Each thread sums its words into a ulong, the
// threadgroup reduces, and thread 0 adds the group's sum to the slot (lo,
// hi) with two 32-bit atomics: the carry out of lo is known exactly from
// the old value atomic_fetch_add returns (64-bit atomic adds are not on
// every Apple GPU).
kernel void inflight_checksum(device const uint* src [[buffer(0)]],
                              constant Params& p [[buffer(3)]],
                              device atomic_uint* results [[buffer(4)]],
                              uint gid [[thread_position_in_grid]],
                              uint threads [[threads_per_grid]],
                              uint lid [[thread_index_in_threadgroup]]) {
    threadgroup ulong part[GROUP];
    ulong sum = 0;
    for (uint i = gid; i < p.count; i += threads) {
        uint w = src[i];
        sum += ulong(w ^ (i * 0x9E3779B1u));
        sum += ulong((w << 7) | (w >> 25));
    }
    part[lid] = sum;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint width = GROUP / 2; width > 0; width /= 2) {
        if (lid < width) {
            part[lid] += part[lid + width];
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    if (lid == 0) {
        ulong total = part[0];
        uint lo = uint(total);
        uint hi = uint(total >> 32);
        uint old = atomic_fetch_add_explicit(&results[p.slot * 2], lo, memory_order_relaxed);
        uint carry = (old + lo < old) ? 1u : 0u;
        atomic_fetch_add_explicit(&results[p.slot * 2 + 1], hi + carry, memory_order_relaxed);
    }
}
