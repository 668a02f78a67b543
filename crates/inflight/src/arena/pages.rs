//! The mapped parts of a growable segment, as coalesced page runs: what a
//! carve must map, what a free node may give back (whole pages), and its
//! mapped and releasable bytes.

use std::collections::BTreeMap;

/// The mapped parts of a growable segment: byte runs `[start, end)`, page
/// aligned, coalesced.
#[derive(Debug, Default)]
pub(super) struct Pages {
    pub(super) page: u64,
    pub(super) runs: BTreeMap<u64, u64>,
}

impl Pages {
    /// Nothing mapped yet, in pages of `page` bytes.
    pub(super) fn new(page: u64) -> Pages {
        Pages {
            page,
            runs: BTreeMap::new(),
        }
    }

    /// The unmapped page runs covering `[a, b)` (page aligned).
    pub(super) fn unmapped_within(&self, a: u64, b: u64) -> Vec<(u64, u64)> {
        let (a, b) = (a / self.page * self.page, b.div_ceil(self.page) * self.page);
        let mut out = Vec::new();
        let mut at = a;
        let first = self
            .runs
            .range(..=a)
            .next_back()
            .map(|(&s, _)| s)
            .unwrap_or(a);
        for (&s, &e) in self.runs.range(first..b) {
            if e <= at {
                continue;
            }
            if s > at {
                out.push((at, s.min(b)));
            }
            at = at.max(e);
            if at >= b {
                break;
            }
        }
        if at < b {
            out.push((at, b));
        }
        out
    }

    /// Marks `[a, b)` (page aligned) mapped.
    pub(super) fn map(&mut self, mut a: u64, mut b: u64) {
        if let Some((&s, &e)) = self.runs.range(..=a).next_back() {
            if e >= a {
                a = s;
                b = b.max(e);
                self.runs.remove(&s);
            }
        }
        while let Some((&s, &e)) = self.runs.range(a..=b).next() {
            b = b.max(e);
            self.runs.remove(&s);
        }
        self.runs.insert(a, b);
    }

    /// Marks `[a, b)` (page aligned, mapped) unmapped.
    pub(super) fn unmap(&mut self, a: u64, b: u64) {
        let (&s, &e) = self
            .runs
            .range(..=a)
            .next_back()
            .expect("unmapping a mapped range");
        debug_assert!(e >= b, "unmapping [{a}, {b}) beyond its run [{s}, {e})");
        self.runs.remove(&s);
        if s < a {
            self.runs.insert(s, a);
        }
        if b < e {
            self.runs.insert(b, e);
        }
    }

    /// The mapped bytes of `[a, b)` and of the whole pages inside it, at
    /// once; in one lookup when one run maps all of it (the common case).
    pub(super) fn measure(&self, a: u64, b: u64) -> (u64, u64) {
        let (pa, pb) = (a.div_ceil(self.page) * self.page, b / self.page * self.page);
        let first = self
            .runs
            .range(..=a)
            .next_back()
            .map(|(&s, _)| s)
            .unwrap_or(a);
        let (mut mapped, mut whole) = (0, 0);
        for (&s, &e) in self.runs.range(first..b) {
            mapped += e.min(b).saturating_sub(s.max(a));
            whole += e.min(pb).saturating_sub(s.max(pa));
        }
        (mapped, whole)
    }

    /// The mapped whole pages inside `[a, b)`, as runs.
    pub(super) fn whole_mapped_within(&self, a: u64, b: u64) -> Vec<(u64, u64)> {
        let (a, b) = (a.div_ceil(self.page) * self.page, b / self.page * self.page);
        if b <= a {
            return Vec::new();
        }
        let first = self
            .runs
            .range(..=a)
            .next_back()
            .map(|(&s, _)| s)
            .unwrap_or(a);
        self.runs
            .range(first..b)
            .filter_map(|(&s, &e)| {
                let (lo, hi) = (s.max(a), e.min(b));
                (hi > lo).then_some((lo, hi))
            })
            .collect()
    }
}
