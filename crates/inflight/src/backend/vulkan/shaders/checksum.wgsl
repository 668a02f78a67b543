// checksum: adds the chunk's share of `checksum_words` to a result slot:
// per word, w ^ (index * 0x9E3779B1) plus w rotated left by 7.
//
// The sum is a wrapping u64; WGSL has no u64, so every partial sum is a
// (lo, hi) pair of u32 and a carry out of lo goes into hi. Each invocation
// sums its words, the workgroup reduces its 256 pairs in shared memory, and
// invocation 0 adds the pair to the slot with two atomics: the carry of the
// lo addition is known exactly from atomicAdd's returned old value.
@group(0) @binding(0) var<storage, read> src: array<u32>;
@group(0) @binding(3) var<storage, read_write> results: array<atomic<u32>>;

var<workgroup> lo_part: array<u32, 256>;
var<workgroup> hi_part: array<u32, 256>;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>,
        @builtin(local_invocation_index) lid: u32,
        @builtin(num_workgroups) groups: vec3<u32>) {
    let stride = groups.x * WORKGROUP;
    var lo = 0u;
    var hi = 0u;
    for (var i = gid.x; i < p.count; i += stride) {
        let w = src[p.off0 + i];
        let term = w ^ ((p.arg + i) * 0x9E3779B1u);
        let sum = lo + term;
        hi += select(0u, 1u, sum < lo);
        lo = sum;
        // The value term: w rotated left by 7.
        let value = (w << 7u) | (w >> 25u);
        let sum2 = lo + value;
        hi += select(0u, 1u, sum2 < lo);
        lo = sum2;
    }
    lo_part[lid] = lo;
    hi_part[lid] = hi;
    workgroupBarrier();
    for (var width = WORKGROUP / 2u; width > 0u; width = width / 2u) {
        if (lid < width) {
            let x = lo_part[lid];
            let sum = x + lo_part[lid + width];
            lo_part[lid] = sum;
            hi_part[lid] = hi_part[lid] + hi_part[lid + width] + select(0u, 1u, sum < x);
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        let l = lo_part[0];
        let old = atomicAdd(&results[p.slot * 2u], l);
        let carry = select(0u, 1u, old + l < old);
        atomicAdd(&results[p.slot * 2u + 1u], hi_part[0] + carry);
    }
}
