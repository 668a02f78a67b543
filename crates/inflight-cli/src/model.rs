//! The harness's CPU model of a uniform span's checksum, fast enough that
//! checking never becomes the bottleneck (on a real GPU a slow model leaves
//! the device idle, and a reuse in flight then has nothing to race with).
//!
//! For words that all hold `v`, [`inflight::backend::checksum_uniform`] is
//! `Σ (v ^ m_i)` over the index terms `m_i`, plus `n` times the value term
//! `rotl(v, 7)`. Since `v ^ m = v + m - 2 (v & m)`,
//! the sum is `n v + Σ m_i - 2 Σ_b 2^b v_b c_b`, where `c_b` counts the `m_i`
//! with bit `b` set: `Σ m_i` and the 32 counts depend on `n` alone, so they
//! are computed once per span length and cached (wrapping arithmetic
//! throughout, exact modulo 2^64 like the checksum itself).

use std::collections::HashMap;

use inflight::backend::{index_mix, value_mix};

/// The most span lengths kept; past it the cache starts over.
const MAX_LENGTHS: usize = 4096;

/// Per-length terms of the uniform checksum.
struct Terms {
    sum: u64,
    bits: [u64; 32],
}

impl Terms {
    fn new(words: u64) -> Self {
        let mut t = Terms {
            sum: 0,
            bits: [0; 32],
        };
        for i in 0..words {
            let m = index_mix(i);
            t.sum = t.sum.wrapping_add(u64::from(m));
            for (b, c) in t.bits.iter_mut().enumerate() {
                *c += u64::from((m >> b) & 1);
            }
        }
        t
    }
}

/// Uniform checksums with the per-length terms cached (one per thread).
#[derive(Default)]
pub struct UniformChecksums {
    cache: HashMap<u64, Terms>,
}

impl UniformChecksums {
    /// `checksum_uniform(value, words)`, in 32 steps once `words` was seen.
    pub fn get(&mut self, value: u32, words: u64) -> u64 {
        if self.cache.len() >= MAX_LENGTHS && !self.cache.contains_key(&words) {
            self.cache.clear();
        }
        let t = self.cache.entry(words).or_insert_with(|| Terms::new(words));
        let and = (0..32)
            .filter(|b| (value >> b) & 1 == 1)
            .fold(0u64, |acc, b| acc.wrapping_add(t.bits[b] << b));
        words
            .wrapping_mul(u64::from(value))
            .wrapping_add(t.sum)
            .wrapping_sub(and.wrapping_mul(2))
            .wrapping_add(words.wrapping_mul(u64::from(value_mix(value))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use inflight::backend::checksum_uniform;
    use rand::{Rng, SeedableRng};

    #[test]
    fn matches_the_reference_model() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut m = UniformChecksums::default();
        for words in [0u64, 1, 2, 3, 31, 1024, 4097, 65_536] {
            for value in [0u32, 1, u32::MAX, 0x8000_0000, rng.random(), rng.random()] {
                assert_eq!(
                    m.get(value, words),
                    checksum_uniform(value, words),
                    "value {value:#x}, {words} words"
                );
            }
        }
    }
}
