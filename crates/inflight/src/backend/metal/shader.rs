//! The harness kernels' source and the facts the host side shares with it:
//! entry points, argument indices, threadgroup size, the parameter block,
//! and how a span becomes a dispatch. Plain Rust, so the agreement between
//! the two sides, and a CPU model of the checksum's reduction, are
//! unit-tested on any platform; the source itself compiles only on a Mac.

/// The Metal Shading Language source of the four kernels.
pub(crate) const SOURCE: &str = include_str!("kernels.metal");

/// Threads per threadgroup of every dispatch (`GROUP` in the source).
pub(crate) const GROUP: u32 = 256;
/// Threadgroups per dispatch at most: each thread loops over its words.
pub(crate) const MAX_GROUPS: u32 = 4096;
/// Argument index of the parameter block (`[[buffer(3)]]`).
pub(crate) const PARAMS_INDEX: usize = 3;
/// Argument index of the checksum's result slots (`[[buffer(4)]]`).
pub(crate) const RESULTS_INDEX: usize = 4;
/// The longest span one operation covers: 2^31 words, so a kernel's
/// `i + threads` never wraps a 32-bit index.
pub(crate) const MAX_OP_SPAN: u64 = 4 << 31;
/// Checksum slots per result buffer (two words each).
pub(crate) const SLOTS_PER_CHUNK: usize = 256;

/// The operations, with their entry points.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) enum Kernel {
    Fill,
    Copy,
    Add,
    Checksum,
}

impl Kernel {
    /// Every kernel, in the order the device compiles them.
    pub(crate) const ALL: [Kernel; 4] = [Kernel::Fill, Kernel::Copy, Kernel::Add, Kernel::Checksum];

    /// The kernel's function name in [`SOURCE`].
    pub(crate) const fn entry(self) -> &'static str {
        match self {
            Kernel::Fill => "inflight_fill",
            Kernel::Copy => "inflight_copy",
            Kernel::Add => "inflight_add",
            Kernel::Checksum => "inflight_checksum",
        }
    }
}

/// The parameter block, as the source's `struct Params`.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Params {
    pub(crate) count: u32,
    pub(crate) arg: u32,
    pub(crate) slot: u32,
}

/// Threadgroups for `words` words: enough for one word a thread, at most
/// [`MAX_GROUPS`], at least one.
pub(crate) fn groups(words: u64) -> u32 {
    words
        .div_ceil(u64::from(GROUP))
        .clamp(1, u64::from(MAX_GROUPS)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{checksum_words, index_mix, value_mix};

    #[test]
    fn the_source_has_every_entry_point_and_the_shared_constants() {
        for k in Kernel::ALL {
            assert!(
                SOURCE.contains(&format!("kernel void {}(", k.entry())),
                "{k:?}"
            );
        }
        assert!(SOURCE.contains(&format!("#define GROUP {GROUP}u")));
        assert!(SOURCE.contains(&format!("constant Params& p [[buffer({PARAMS_INDEX})]]")));
        assert!(SOURCE.contains(&format!("results [[buffer({RESULTS_INDEX})]]")));
        assert!(SOURCE.contains("uint count;") && SOURCE.contains("uint arg;"));
        assert_eq!(std::mem::size_of::<Params>(), 12);
    }

    #[test]
    fn dispatch_sizes() {
        assert_eq!(groups(0), 1);
        assert_eq!(groups(1), 1);
        assert_eq!(groups(256), 1);
        assert_eq!(groups(257), 2);
        assert_eq!(groups(u64::from(u32::MAX)), MAX_GROUPS);
        // The largest span's last index plus the grid never wraps.
        let threads = u64::from(MAX_GROUPS * GROUP);
        assert!(MAX_OP_SPAN / 4 + threads < 1 << 32);
    }

    /// The checksum kernel's arithmetic, run on the CPU: per-thread ulong
    /// sums over a grid-stride loop, a threadgroup tree reduction, and the
    /// slot updated through two u32 atomics with the carry taken from the
    /// old low word. It must equal `checksum_words` bit for bit.
    #[test]
    fn the_checksum_kernels_reduction_is_checksum_words() {
        let words: Vec<u32> = (0..70_001u32)
            .map(|i| i.wrapping_mul(2_654_435_761).rotate_left(i % 31) ^ 0xFFFF_0000)
            .collect();
        let groups = groups(words.len() as u64) as usize;
        let threads = groups * GROUP as usize;
        let (mut lo, mut hi) = (0u32, 0u32);
        for g in 0..groups {
            let mut part: Vec<u64> = (0..GROUP as usize)
                .map(|lid| {
                    let mut sum = 0u64;
                    let mut i = g * GROUP as usize + lid;
                    while i < words.len() {
                        let w = words[i];
                        sum = sum.wrapping_add(u64::from(w ^ index_mix(i as u64)));
                        sum = sum.wrapping_add(u64::from(value_mix(w)));
                        i += threads;
                    }
                    sum
                })
                .collect();
            let mut width = GROUP as usize / 2;
            while width > 0 {
                for lid in 0..width {
                    part[lid] = part[lid].wrapping_add(part[lid + width]);
                }
                width /= 2;
            }
            let (l, h) = (part[0] as u32, (part[0] >> 32) as u32);
            let old = lo;
            lo = lo.wrapping_add(l);
            let carry = u32::from(old.wrapping_add(l) < old);
            hi = hi.wrapping_add(h.wrapping_add(carry));
        }
        let got = u64::from(lo) | (u64::from(hi) << 32);
        assert_eq!(got, checksum_words(&words));
    }
}
