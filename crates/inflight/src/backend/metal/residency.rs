//! Residency budget accounting, in plain Rust: which buffers go into the
//! queue's `MTLResidencySet` (macOS 15+), within a budget like MLX's wired
//! limit, and when the set must be committed. The Metal side applies what
//! it says; it knows nothing of Metal, so it is unit-tested anywhere.
//!
//! # Budget
//!
//! A buffer is *wired* (added to the set, kept resident by the OS) when it
//! fits under the budget beside the buffers already wired; otherwise it is
//! *unwired*: it works as any Metal buffer does, the OS may just page it
//! out. Going over the budget is never an error. When a wired buffer is
//! removed, unwired buffers that now fit are promoted, oldest first; a
//! smaller budget ([`ResidencyBudget::set_limit`]) demotes the newest wired
//! buffers until the rest fit.
//!
//! # Commits
//!
//! Additions and removals change the set's contents only once it is
//! committed. Additions are committed lazily, before the next submission
//! ([`ResidencyBudget::needs_commit`]); a removal asks for a commit at once
//! ([`Removal::commit_now`]), so a released buffer's memory really goes back
//! when [`crate::Backend::release`] returns, as MLX's does: the
//! demonstration of the incident needs the release to be real.

use std::collections::BTreeMap;

/// Where a buffer went.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Into the residency set.
    Wired,
    /// Outside it: over the budget.
    Unwired,
}

/// What removing a buffer asks the Metal side to do.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[must_use]
pub struct Removal {
    /// The buffer was in the set: remove it from the set.
    pub was_wired: bool,
    /// Unwired buffers to add to the set now, oldest first.
    pub promoted: Vec<u64>,
    /// Commit the set now (see the module doc).
    pub commit_now: bool,
}

/// What changing the budget asks the Metal side to do.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[must_use]
pub struct Rebalance {
    /// Buffers to take out of the set.
    pub demoted: Vec<u64>,
    /// Buffers to add to the set.
    pub promoted: Vec<u64>,
}

/// The residency set's contents as accounted (see the module doc). Buffers
/// are named by ids the caller gives, in increasing order of allocation.
#[derive(Debug)]
pub struct ResidencyBudget {
    limit: u64,
    wired_bytes: u64,
    wired: BTreeMap<u64, u64>,
    unwired: BTreeMap<u64, u64>,
    /// Whether the set changed since its last commit.
    dirty: bool,
}

impl ResidencyBudget {
    /// An empty set with a budget of `limit` bytes.
    pub fn new(limit: u64) -> Self {
        ResidencyBudget {
            limit,
            wired_bytes: 0,
            wired: BTreeMap::new(),
            unwired: BTreeMap::new(),
            dirty: false,
        }
    }

    /// The budget, in bytes.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes of wired buffers.
    pub fn wired_bytes(&self) -> u64 {
        self.wired_bytes
    }

    /// Bytes of buffers left out of the set.
    pub fn unwired_bytes(&self) -> u64 {
        self.unwired.values().sum()
    }

    /// Places a new buffer: wired if it fits under the budget.
    pub fn insert(&mut self, id: u64, bytes: u64) -> Placement {
        if self.wired.contains_key(&id) {
            return Placement::Wired;
        }
        if self.unwired.contains_key(&id) {
            return Placement::Unwired;
        }
        if self.fits(bytes) {
            self.wire(id, bytes);
            Placement::Wired
        } else {
            self.unwired.insert(id, bytes);
            Placement::Unwired
        }
    }

    /// Removes a buffer (at its release), promoting what now fits.
    pub fn remove(&mut self, id: u64) -> Removal {
        if self.unwired.remove(&id).is_some() {
            return Removal::default();
        }
        let Some(bytes) = self.wired.remove(&id) else {
            return Removal::default();
        };
        self.wired_bytes -= bytes;
        self.dirty = true;
        Removal {
            was_wired: true,
            promoted: self.promote(),
            commit_now: true,
        }
    }

    /// Changes the budget: demotes the newest wired buffers until the rest
    /// fit, or promotes unwired ones that now fit.
    pub fn set_limit(&mut self, limit: u64) -> Rebalance {
        self.limit = limit;
        let mut demoted = Vec::new();
        while self.wired_bytes > self.limit {
            let (id, bytes) = self.wired.pop_last().expect("wired bytes > 0");
            self.wired_bytes -= bytes;
            self.unwired.insert(id, bytes);
            demoted.push(id);
        }
        if !demoted.is_empty() {
            self.dirty = true;
        }
        Rebalance {
            demoted,
            promoted: self.promote(),
        }
    }

    /// Whether the set must be committed before the next submission.
    pub fn needs_commit(&self) -> bool {
        self.dirty
    }

    /// Records that the set was committed.
    pub fn committed(&mut self) {
        self.dirty = false;
    }

    fn fits(&self, bytes: u64) -> bool {
        self.wired_bytes
            .checked_add(bytes)
            .is_some_and(|total| total <= self.limit)
    }

    fn wire(&mut self, id: u64, bytes: u64) {
        self.wired.insert(id, bytes);
        self.wired_bytes += bytes;
        self.dirty = true;
    }

    /// Moves unwired buffers that fit into the set, oldest first (a buffer
    /// too big to fit is skipped, not waited for).
    fn promote(&mut self) -> Vec<u64> {
        let fitting: Vec<(u64, u64)> = {
            let mut room = self.limit.saturating_sub(self.wired_bytes);
            self.unwired
                .iter()
                .filter(|&(_, &bytes)| {
                    let fits = bytes <= room;
                    if fits {
                        room -= bytes;
                    }
                    fits
                })
                .map(|(&id, &bytes)| (id, bytes))
                .collect()
        };
        for &(id, bytes) in &fitting {
            self.unwired.remove(&id);
            self.wire(id, bytes);
        }
        fitting.into_iter().map(|(id, _)| id).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_wired_until_the_budget_is_spent() {
        let mut r = ResidencyBudget::new(100);
        assert!(!r.needs_commit());
        assert_eq!(r.insert(1, 60), Placement::Wired);
        assert!(r.needs_commit());
        r.committed();
        assert_eq!(r.insert(2, 50), Placement::Unwired);
        assert!(
            !r.needs_commit(),
            "an unwired buffer does not change the set"
        );
        assert_eq!(r.insert(3, 40), Placement::Wired);
        assert_eq!((r.wired_bytes(), r.unwired_bytes()), (100, 50));
    }

    #[test]
    fn a_buffer_over_the_whole_budget_stays_unwired() {
        let mut r = ResidencyBudget::new(10);
        assert_eq!(r.insert(1, 11), Placement::Unwired);
        assert_eq!(r.insert(2, u64::MAX), Placement::Unwired);
        assert_eq!(r.wired_bytes(), 0);
        assert_eq!(r.remove(1), Removal::default());
    }

    #[test]
    fn removing_a_wired_buffer_commits_at_once_and_promotes_oldest_first() {
        let mut r = ResidencyBudget::new(100);
        r.insert(1, 80);
        r.insert(2, 30);
        r.insert(3, 20);
        r.insert(4, 60);
        r.committed();
        let removal = r.remove(1);
        // 60 bytes of room: 2 (30) fits, 4 (60) no longer does.
        assert_eq!(
            removal,
            Removal {
                was_wired: true,
                promoted: vec![2],
                commit_now: true,
            }
        );
        assert_eq!(r.wired_bytes(), 20 + 30);
        assert!(r.needs_commit());
        r.committed();
        // Removing an unwired buffer changes nothing in the set.
        assert_eq!(r.insert(5, 90), Placement::Unwired);
        assert_eq!(r.remove(5), Removal::default());
        assert!(!r.needs_commit());
        // Room for 4 at last.
        assert_eq!(r.remove(3).promoted, vec![4]);
        assert_eq!((r.wired_bytes(), r.unwired_bytes()), (90, 0));
    }

    #[test]
    fn unknown_and_repeated_ids_change_nothing() {
        let mut r = ResidencyBudget::new(100);
        assert_eq!(r.remove(9), Removal::default());
        r.insert(1, 10);
        assert_eq!(r.insert(1, 10), Placement::Wired);
        assert_eq!(r.wired_bytes(), 10);
        assert!(r.remove(1).was_wired);
        assert_eq!(r.remove(1), Removal::default());
        assert_eq!(r.wired_bytes(), 0);
    }

    #[test]
    fn a_smaller_budget_demotes_the_newest_and_a_larger_one_promotes() {
        let mut r = ResidencyBudget::new(100);
        for id in 1..=4 {
            r.insert(id, 25);
        }
        r.committed();
        let down = r.set_limit(60);
        assert_eq!(down.demoted, vec![4, 3]);
        assert!(down.promoted.is_empty());
        assert!(r.needs_commit());
        assert_eq!(r.wired_bytes(), 50);
        r.committed();
        let up = r.set_limit(1000);
        assert_eq!(up.promoted, vec![3, 4]);
        assert_eq!(r.wired_bytes(), 100);
        assert_eq!(r.unwired_bytes(), 0);
    }

    #[test]
    fn a_zero_budget_wires_nothing() {
        let mut r = ResidencyBudget::new(0);
        assert_eq!(r.insert(1, 4), Placement::Unwired);
        assert!(!r.needs_commit());
    }
}
