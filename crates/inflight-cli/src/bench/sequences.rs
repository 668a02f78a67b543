//! What `bench` feeds every allocator: the mixed workload's sizes and
//! slots ([`Mixed`], from [`Rng`], xorshift64*, which the C++ harness has
//! bit for bit, with an FNV-1a checksum both sides compare), and how its
//! batches' times are summarised ([`Timing`]).

use serde::Serialize;

/// xorshift64* (Vigna), seeded as `seed ^ golden ratio` (never 0). The C++
/// harness has the same generator, bit for bit.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        let s = seed ^ 0x9E37_79B9_7F4A_7C15;
        Rng(if s == 0 { 1 } else { s })
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A size log-uniform in `[lo, hi]`: `2^(log2 lo + u (log2 hi - log2 lo))`
    /// with `u` from the top 53 bits, truncated and clamped.
    pub fn log_uniform(&mut self, lo: u64, hi: u64) -> u64 {
        let u = (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
        let (a, b) = ((lo as f64).log2(), (hi as f64).log2());
        ((a + u * (b - a)).exp2() as u64).clamp(lo, hi)
    }
}

/// FNV-1a over 64-bit words (the size sequence's checksum, on both sides).
struct Fnv(u64);

impl Fnv {
    fn add(&mut self, w: u64) {
        self.0 ^= w;
        self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
    }
}

/// The mixed workload: `live` initial sizes, then (slot, size) per step.
pub struct Mixed {
    pub seed: u64,
    pub live: u64,
    pub min: u64,
    pub max: u64,
    pub initial: Vec<u64>,
    pub ops: Vec<(usize, u64)>,
    pub checksum: u64,
}

impl Mixed {
    pub fn generate(seed: u64, live: u64, steps: u64, min: u64, max: u64) -> Self {
        let mut rng = Rng::new(seed);
        let mut sum = Fnv(0xcbf2_9ce4_8422_2325);
        let initial: Vec<u64> = (0..live)
            .map(|_| {
                let s = rng.log_uniform(min, max);
                sum.add(s);
                s
            })
            .collect();
        let ops = (0..steps)
            .map(|_| {
                let slot = rng.next_u64() % live;
                let size = rng.log_uniform(min, max);
                sum.add(slot);
                sum.add(size);
                (slot as usize, size)
            })
            .collect();
        Mixed {
            seed,
            live,
            min,
            max,
            initial,
            ops,
            checksum: sum.0,
        }
    }

    /// The most bytes requested and live at once over `passes` passes of
    /// the first `steps` steps.
    pub fn peak_requested(&self, steps: usize, passes: u32) -> u64 {
        let mut live = self.initial.clone();
        let mut cur: u64 = live.iter().sum();
        let mut peak = cur;
        for _ in 0..passes {
            for &(slot, size) in &self.ops[..steps] {
                cur = cur - live[slot] + size;
                live[slot] = size;
                peak = peak.max(cur);
            }
        }
        peak
    }
}

/// Batch figures in ns per pair.
#[derive(Clone, Debug, Serialize)]
pub struct Timing {
    /// Median over the batches.
    pub ns_per_pair: f64,
    /// Fastest batch.
    pub ns_min: f64,
    /// Slowest batch.
    pub ns_max: f64,
    /// Every batch, in order.
    pub ns_batches: Vec<f64>,
}

impl Timing {
    pub fn from_batches(ns: Vec<f64>) -> Timing {
        let mut sorted = ns.clone();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if n == 0 {
            f64::NAN
        } else if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        Timing {
            ns_per_pair: median,
            ns_min: sorted.first().copied().unwrap_or(f64::NAN),
            ns_max: sorted.last().copied().unwrap_or(f64::NAN),
            ns_batches: ns,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xorshift64star_matches_reference_values() {
        // The first outputs for seed 1, computed independently from the
        // definition (state ^= 0x9E3779B97F4A7C15, then >>12, <<25, >>27, * M).
        let mut r = Rng::new(1);
        let mut x: u64 = 1 ^ 0x9E37_79B9_7F4A_7C15;
        for _ in 0..100 {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            assert_eq!(r.next_u64(), x.wrapping_mul(0x2545_F491_4F6C_DD1D));
        }
    }

    #[test]
    fn mixed_sizes_are_log_uniform_in_range_and_reproducible() {
        let m = Mixed::generate(7, 64, 20_000, 1024, 64 << 20);
        let again = Mixed::generate(7, 64, 20_000, 1024, 64 << 20);
        assert_eq!(m.checksum, again.checksum);
        assert_ne!(
            m.checksum,
            Mixed::generate(8, 64, 20_000, 1024, 64 << 20).checksum
        );
        assert!(m
            .ops
            .iter()
            .all(|&(s, b)| s < 64 && (1024..=64 << 20).contains(&b)));
        // Log-uniform over 16 octaves: about 1/16 of the sizes in each.
        let low = m.ops.iter().filter(|&&(_, b)| b < 2048).count();
        assert!((900..1600).contains(&low), "{low} of 20000 below 2 KiB");
        let high = m.ops.iter().filter(|&&(_, b)| b >= 32 << 20).count();
        assert!(
            (900..1600).contains(&high),
            "{high} of 20000 at 32 MiB or above"
        );
    }

    #[test]
    fn timing_takes_the_median_and_the_spread() {
        let t = Timing::from_batches(vec![5.0, 1.0, 3.0, 9.0, 2.0]);
        assert_eq!((t.ns_per_pair, t.ns_min, t.ns_max), (3.0, 1.0, 9.0));
        assert_eq!(Timing::from_batches(vec![4.0, 2.0]).ns_per_pair, 3.0);
    }
}
