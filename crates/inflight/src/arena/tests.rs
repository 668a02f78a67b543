//! The arena's unit tests: carving, merging, pages, trimming, stamps.

use super::*;

const MIB: u64 = 1 << 20;

fn arena() -> Arena<u32> {
    Arena::default()
}

#[test]
fn a_segment_splits_and_merges_back_whole() {
    let mut a = arena();
    a.add_segment(0, Class::Large, 7, 20 * MIB);
    let x = a.carve(0, Class::Large, 4 * MIB).unwrap();
    let y = a.carve(0, Class::Large, 6 * MIB).unwrap();
    assert_eq!((x.offset, y.offset), (0, 4 * MIB));
    a.check().unwrap();
    assert_eq!(a.totals().taken, 10 * MIB);
    assert_eq!(
        a.totals().releasable,
        0,
        "a split segment is not releasable"
    );
    a.release(x.node, 0);
    a.check().unwrap();
    // The freed 4 MiB serves a 3 MiB request (best fit, lowest address).
    let z = a.carve(0, Class::Large, 3 * MIB).unwrap();
    assert_eq!(z.offset, 0);
    a.release(z.node, 0);
    a.release(y.node, 0);
    a.check().unwrap();
    let t = a.totals();
    assert_eq!(
        (t.ready_count, t.ready, t.releasable),
        (1, 20 * MIB, 20 * MIB)
    );
    drop((x, y, z));
    let trimmed = a.trim(1);
    assert!(matches!(trimmed[..], [Trimmed::Segment { raw: 7, size, .. }] if size == 20 * MIB));
    assert_eq!(a.totals().reserved, 0);
    a.check().unwrap();
}

#[test]
fn best_fit_takes_the_smallest_node_that_holds_the_request() {
    let mut a = arena();
    a.add_segment(0, Class::Large, 1, 64 * MIB);
    let blocks: Vec<_> = [8, 1, 16, 1, 4, 1]
        .iter()
        .map(|&m| a.carve(0, Class::Large, m * MIB).unwrap())
        .collect();
    // Free the 8, 16 and 4 MiB blocks (separated by live 1 MiB ones).
    for i in [0, 2, 4] {
        a.release(blocks[i].node, 0);
    }
    a.check().unwrap();
    let c = a.carve(0, Class::Large, 3 * MIB).unwrap();
    assert_eq!(c.offset, blocks[4].offset, "the 4 MiB hole is the best fit");
    let d = a.carve(0, Class::Large, 9 * MIB).unwrap();
    assert_eq!(d.offset, blocks[2].offset, "the 16 MiB hole");
    a.check().unwrap();
}

#[test]
fn in_flight_stamps_merge_to_the_latest_and_promote_when_passed() {
    let mut a = arena();
    a.add_segment(3, Class::Small, 1, 2 * MIB);
    let x = a.carve(3, Class::Small, MIB).unwrap();
    let y = a.carve(3, Class::Small, MIB).unwrap();
    a.release(x.node, 5);
    a.release(y.node, 9);
    a.check().unwrap();
    let t = a.totals();
    assert_eq!((t.pending_count, t.pending, t.releasable), (1, 2 * MIB, 0));
    assert!(a.trim(u64::MAX).is_empty(), "nothing in flight is trimmed");
    // The merged node carries the later stamp out when carved.
    let z = a.carve(3, Class::Small, 512).unwrap();
    assert_eq!(z.stamp, 9);
    a.release(z.node, 9);
    assert_eq!(a.oldest_due(3), Some(9));
    assert_eq!(a.promote(3, 8), 0);
    assert_eq!(a.promote(3, 9), 1);
    a.check().unwrap();
    assert_eq!(a.totals().releasable, 2 * MIB);
}

#[test]
fn pools_are_apart() {
    let mut a = arena();
    a.add_segment(0, Class::Small, 1, 2 * MIB);
    assert!(
        a.carve(1, Class::Small, 512).is_none(),
        "another queue's pool"
    );
    assert!(a.carve(0, Class::Large, 512).is_none(), "another class");
    assert!(a.carve(0, Class::Small, 4 * MIB).is_none(), "too large");
}

#[test]
fn growable_segments_map_pages_under_blocks_and_unmap_free_ones() {
    let mut a = arena();
    let page = 2 * MIB;
    a.add_range(0, Class::Large, 9, 1 << 30, page);
    let x = a.carve(0, Class::Large, 3 * MIB).unwrap();
    assert_eq!(x.maps, vec![(0, 4 * MIB)]);
    let y = a.carve(0, Class::Large, 3 * MIB).unwrap();
    // It starts on the mapped page x ends on: only the next is new.
    assert_eq!(
        (y.offset, y.maps.clone()),
        (3 * MIB, vec![(4 * MIB, 6 * MIB)])
    );
    a.check().unwrap();
    assert_eq!(a.totals().reserved, 6 * MIB);
    a.release(x.node, 0);
    a.check().unwrap();
    // x's first page is wholly free; its second is shared with y.
    assert_eq!(a.totals().releasable, 2 * MIB);
    let t = a.trim(u64::MAX);
    assert!(matches!(&t[..], [Trimmed::Pages { runs, .. }] if runs == &vec![(0, 2 * MIB)]));
    a.check().unwrap();
    assert_eq!(a.totals().reserved, 4 * MIB);
    // Carving there again maps it again.
    let z = a.carve(0, Class::Large, MIB).unwrap();
    assert_eq!((z.offset, z.maps.clone()), (0, vec![(0, 2 * MIB)]));
    a.release(z.node, 0);
    a.release(y.node, 0);
    a.check().unwrap();
    assert_eq!(a.totals().releasable, 6 * MIB);
    a.trim(u64::MAX);
    assert_eq!(a.totals().reserved, 0);
    a.check().unwrap();
}

#[test]
fn a_failed_map_is_undone() {
    let mut a = arena();
    a.add_range(0, Class::Small, 9, 1 << 30, 2 * MIB);
    let x = a.carve(0, Class::Small, MIB).unwrap();
    a.unmark_mapped(x.node, &x.maps);
    a.release(x.node, 0);
    a.check().unwrap();
    assert_eq!(a.totals().reserved, 0);
}

/// Random carves, releases (some in flight), promotions and trims,
/// with the invariants checked after every step.
#[test]
fn random_operations_keep_every_invariant() {
    let mut seed = 0x1234_5678_9ABC_DEF0u64;
    let mut rnd = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    for growable in [false, true] {
        let mut a = arena();
        if growable {
            a.add_range(0, Class::Large, 0, 1 << 32, 2 * MIB);
        } else {
            for i in 0..4 {
                a.add_segment(0, Class::Large, i, 32 * MIB);
            }
        }
        let mut live: Vec<Carved<u32>> = Vec::new();
        let mut clock = 1;
        for step in 0..4000 {
            match rnd(10) {
                0..=4 => {
                    let size = (1 + rnd(8 * MIB / GRANULE)) * GRANULE;
                    if let Some(c) = a.carve(0, Class::Large, size) {
                        live.push(c);
                    }
                }
                5..=7 if !live.is_empty() => {
                    let c = live.swap_remove(rnd(live.len() as u64) as usize);
                    let stamp = if rnd(2) == 0 { 0 } else { clock + rnd(5) };
                    a.release(c.node, stamp);
                }
                8 => {
                    clock += 1;
                    a.promote(0, clock);
                }
                _ => {
                    a.trim(rnd(16 * MIB));
                }
            }
            a.check().unwrap_or_else(|e| panic!("step {step}: {e}"));
            for c in &live {
                assert_eq!(a.nodes[c.node as usize].size, c.size);
                assert!(a.nodes[c.node as usize].free.is_none());
            }
        }
    }
}

/// `would_carve_again` agrees with a release followed by a carve: for each
/// taken block of a segment with holes, the answer is whether that round
/// trip gives the same block back.
#[test]
fn would_carve_again_predicts_release_then_carve() {
    const SIZES: [u64; 5] = [4, 2, 4, 8, 2];
    // A 64 MiB segment carved into SIZES (MiB), then `holes` released.
    fn build(holes: &[usize]) -> (Arena<u32>, Vec<Carved<u32>>) {
        let mut a = arena();
        a.add_segment(0, Class::Large, 1, 64 * MIB);
        let blocks: Vec<_> = SIZES
            .iter()
            .map(|&m| a.carve(0, Class::Large, m * MIB).unwrap())
            .collect();
        for &i in holes {
            a.release(blocks[i].node, 0);
        }
        (a, blocks)
    }
    let mut both = [0, 0];
    for holes in [vec![], vec![1], vec![3], vec![0, 3], vec![2, 4], vec![1, 3]] {
        for i in (0..SIZES.len()).filter(|i| !holes.contains(i)) {
            let (mut a, blocks) = build(&holes);
            let (b, size) = (&blocks[i], SIZES[i] * MIB);
            assert!(
                !a.would_carve_again(b.node, 1, Class::Large, size),
                "another pool"
            );
            assert!(
                !a.would_carve_again(b.node, 0, Class::Small, size),
                "another class"
            );
            assert!(
                !a.would_carve_again(b.node, 0, Class::Large, size + MIB),
                "another size"
            );
            let predicted = a.would_carve_again(b.node, 0, Class::Large, size);
            a.release(b.node, 0);
            let c = a.carve(0, Class::Large, size).unwrap();
            assert_eq!(
                predicted,
                c.offset == b.offset,
                "block {i}, holes {holes:?}"
            );
            a.check().unwrap();
            both[usize::from(predicted)] += 1;
        }
    }
    assert!(
        both[0] > 0 && both[1] > 0,
        "both answers exercised: {both:?}"
    );
}
