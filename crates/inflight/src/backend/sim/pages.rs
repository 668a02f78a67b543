//! Host memory of one simulated buffer, backed lazily in 64 KiB chunks (a
//! map of the chunks written, so that a growable segment's address range,
//! as large as the device, costs nothing until its pages are used).
//!
//! A GPU buffer of 16 MiB whose kernels touch its first few KiB should cost
//! the simulator a few KiB of host memory, as a fresh mapping costs the OS
//! only the pages it touches. Chunks are allocated on first write; a chunk
//! never written reads as zeros.

/// Words per chunk (64 KiB).
const CHUNK_WORDS: usize = 16 * 1024;

/// The words of one buffer, in lazily allocated chunks.
pub(crate) struct Pages {
    chunks: std::collections::HashMap<usize, Box<[u32]>>,
    words: usize,
}

impl Pages {
    /// A zeroed buffer of `words` words; allocates nothing yet.
    pub(crate) fn new(words: usize) -> Self {
        Pages {
            chunks: std::collections::HashMap::new(),
            words,
        }
    }

    /// Calls `f(chunk_index, range_in_chunk, offset_in_span)` for each piece of
    /// `[start, start + len)`.
    fn pieces(start: usize, len: usize, mut f: impl FnMut(usize, std::ops::Range<usize>, usize)) {
        let mut done = 0;
        while done < len {
            let at = start + done;
            let (c, off) = (at / CHUNK_WORDS, at % CHUNK_WORDS);
            let n = (CHUNK_WORDS - off).min(len - done);
            f(c, off..off + n, done);
            done += n;
        }
    }

    fn chunk_mut(&mut self, c: usize) -> &mut [u32] {
        let len = CHUNK_WORDS.min(self.words - c * CHUNK_WORDS);
        self.chunks
            .entry(c)
            .or_insert_with(|| vec![0u32; len].into_boxed_slice())
    }

    /// Writes `value` to words `[start, start + len)`.
    pub(crate) fn fill(&mut self, start: usize, len: usize, value: u32) {
        Self::pieces(start, len, |c, r, _| {
            if value == 0 && !self.chunks.contains_key(&c) {
                return; // already reads as zeros
            }
            self.chunk_mut(c)[r].fill(value);
        });
    }

    /// Copies words `[start, start + len)` out.
    pub(crate) fn read(&self, start: usize, len: usize) -> Vec<u32> {
        let mut out = vec![0u32; len];
        Self::pieces(start, len, |c, r, at| {
            if let Some(chunk) = self.chunks.get(&c) {
                out[at..at + r.len()].copy_from_slice(&chunk[r]);
            }
        });
        out
    }

    /// Writes `src` to words starting at `start`.
    pub(crate) fn write(&mut self, start: usize, src: &[u32]) {
        Self::pieces(start, src.len(), |c, r, at| {
            let n = r.len();
            self.chunk_mut(c)[r].copy_from_slice(&src[at..at + n]);
        });
    }

    /// Zeroes words `[start, start + len)`, giving whole chunks back (an
    /// unmapped page's memory goes back for real).
    pub(crate) fn clear(&mut self, start: usize, len: usize) {
        Self::pieces(start, len, |c, r, _| {
            if r.len() == CHUNK_WORDS {
                self.chunks.remove(&c);
            } else if let Some(chunk) = self.chunks.get_mut(&c) {
                chunk[r].fill(0);
            }
        });
    }

    /// [`crate::backend::checksum_words`] of words `[start, start + len)`,
    /// with indices relative to `start`.
    pub(crate) fn checksum(&self, start: usize, len: usize) -> u64 {
        let mut sum = 0u64;
        Self::pieces(start, len, |c, r, at| {
            let base = at as u64;
            match self.chunks.get(&c) {
                Some(chunk) => {
                    for (i, &w) in chunk[r].iter().enumerate() {
                        let term = w ^ crate::backend::index_mix(base + i as u64);
                        sum = sum
                            .wrapping_add(u64::from(term))
                            .wrapping_add(u64::from(crate::backend::value_mix(w)));
                    }
                }
                None => {
                    sum = sum.wrapping_add(crate::backend::checksum_uniform_from(
                        0,
                        base,
                        r.len() as u64,
                    ));
                }
            }
        });
        sum
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::checksum_words;

    #[test]
    fn lazily_backed_pages_read_and_checksum_like_a_flat_buffer() {
        let words = CHUNK_WORDS * 3 + 17;
        let mut p = Pages::new(words);
        let mut flat = vec![0u32; words];
        p.fill(CHUNK_WORDS - 5, 40, 9);
        flat[CHUNK_WORDS - 5..CHUNK_WORDS + 35].fill(9);
        let src: Vec<u32> = (0..CHUNK_WORDS as u32 + 3).collect();
        p.write(CHUNK_WORDS * 2, &src);
        flat[CHUNK_WORDS * 2..CHUNK_WORDS * 3 + 3].copy_from_slice(&src);
        assert_eq!(p.read(0, words), flat);
        for (start, len) in [(0, words), (CHUNK_WORDS - 7, 100), (3, CHUNK_WORDS * 2)] {
            assert_eq!(
                p.checksum(start, len),
                checksum_words(&flat[start..start + len])
            );
        }
        assert!(p.chunks.contains_key(&1) && p.chunks.contains_key(&3));
        p.clear(CHUNK_WORDS, CHUNK_WORDS);
        flat[CHUNK_WORDS..CHUNK_WORDS * 2].fill(0);
        assert!(!p.chunks.contains_key(&1));
        assert_eq!(p.read(0, words), flat);
    }
}
