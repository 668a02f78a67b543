//! Holding the peak (`Config::hold_peak`): a device allocation releases
//! ready blocks, oldest first, rather than raise the bytes held past their
//! high-water mark, and releases no more of them than the request needs.
//! The bytes held are reserved bytes less those pending: in-flight work is
//! the GPU's lag, not the cache's, and trimming when it spikes would only
//! throw away blocks the next allocations need.
//! On the driven backend with front caches off, so that every free of a
//! never-bound buffer lands on the ready list and the test decides which
//! blocks are there.

use inflight::backend::manual::ManualGpu;
use inflight::{Allocator, Buffer, Config, Queue, Stats};

const MIB: u64 = 1 << 20;

fn setup(hold_peak: bool) -> (ManualGpu, Allocator<ManualGpu>, Queue<ManualGpu>) {
    let gpu = ManualGpu::new(1 << 30, true);
    let config = Config {
        front_cache: false,
        hold_peak,
        ..Config::default()
    };
    let alloc = Allocator::new(gpu.clone(), config).unwrap();
    let q = alloc.create_queue().unwrap();
    (gpu, alloc, q)
}

fn balanced(s: Stats) -> Stats {
    assert!(s.balanced(), "{s:?}");
    s
}

/// Four 1 MiB buffers (the high-water mark: 4 MiB), freed oldest first, so
/// that the ready list's age order is the allocation order. Returns their
/// block ids in that order.
fn four_ready_blocks(alloc: &Allocator<ManualGpu>, q: &Queue<ManualGpu>) -> Vec<u64> {
    let bufs: Vec<Buffer<ManualGpu>> = (0..4).map(|_| alloc.malloc(MIB, q).unwrap()).collect();
    let ids = bufs.iter().map(Buffer::block_id).collect();
    drop(bufs);
    let s = balanced(alloc.stats());
    assert_eq!((s.ready_count, s.reserved_bytes), (4, 4 * MIB), "{s:?}");
    ids
}

#[test]
fn a_miss_releases_the_oldest_ready_blocks_instead_of_passing_the_peak() {
    let (_, alloc, q) = setup(true);
    let ids = four_ready_blocks(&alloc, &q);
    // 2 MiB fits none of the 1 MiB blocks: the two oldest go back to the
    // device, the two newest stay cached, and reserved stays at 4 MiB.
    let big = alloc.malloc(2 * MIB, &q).unwrap();
    let s = balanced(alloc.stats());
    assert_eq!(s.peak_reserved_bytes, 4 * MIB, "{s:?}");
    assert_eq!((s.ready_count, s.device_releases), (2, 2), "{s:?}");
    assert_eq!((s.peak_holds, s.trims), (1, 2), "{s:?}");
    let again: Vec<_> = (0..2).map(|_| alloc.malloc(MIB, &q).unwrap()).collect();
    let mut kept: Vec<u64> = again.iter().map(Buffer::block_id).collect();
    kept.sort_unstable();
    assert_eq!(kept, ids[2..], "the newest two stay cached");
    assert_eq!(balanced(alloc.stats()).device_allocations, 5);
    drop((again, big));
}

#[test]
fn with_the_rule_off_the_same_miss_passes_the_peak() {
    let (_, alloc, q) = setup(false);
    four_ready_blocks(&alloc, &q);
    let big = alloc.malloc(2 * MIB, &q).unwrap();
    let s = balanced(alloc.stats());
    assert_eq!(s.peak_reserved_bytes, 6 * MIB, "{s:?}");
    assert_eq!(
        (s.ready_count, s.device_releases, s.peak_holds),
        (4, 0, 0),
        "{s:?}"
    );
    drop(big);
}

#[test]
fn the_peak_rises_when_the_ready_list_cannot_cover_the_request() {
    let (_, alloc, q) = setup(true);
    four_ready_blocks(&alloc, &q);
    // 8 MiB: all four cached blocks go, and reserved rises to 8 MiB, the
    // request alone; the mark is now 8 MiB.
    let big = alloc.malloc(8 * MIB, &q).unwrap();
    let s = balanced(alloc.stats());
    assert_eq!(
        (s.reserved_bytes, s.peak_reserved_bytes),
        (8 * MIB, 8 * MIB)
    );
    assert_eq!(
        (s.ready_count, s.device_releases, s.peak_holds),
        (0, 4, 1),
        "{s:?}"
    );
    // Below the new mark a miss releases nothing: with the cache emptied,
    // 2 MiB cached and 4 MiB asked for make 6 MiB, under 8.
    drop(big);
    assert_eq!(alloc.trim(0), 8 * MIB);
    drop(alloc.malloc(2 * MIB, &q).unwrap());
    let four = alloc.malloc(4 * MIB, &q).unwrap();
    let s = balanced(alloc.stats());
    assert_eq!(s.reserved_bytes, 6 * MIB, "2 MiB cached, 4 MiB live: {s:?}");
    assert_eq!((s.ready_count, s.peak_holds), (1, 1), "{s:?}");
    drop(four);
}

#[test]
fn live_blocks_are_never_released() {
    let (_, alloc, q) = setup(true);
    four_ready_blocks(&alloc, &q);
    // Three of the four cached blocks back in use: only one is ready, and
    // a 3 MiB miss (4 + 3 over the 4 MiB mark) can release only that one.
    let live: Vec<_> = (0..3).map(|_| alloc.malloc(MIB, &q).unwrap()).collect();
    let big = alloc.malloc(3 * MIB, &q).unwrap();
    let s = balanced(alloc.stats());
    assert_eq!(
        (s.ready_count, s.device_releases, s.peak_holds),
        (0, 1, 1),
        "{s:?}"
    );
    assert_eq!(s.reserved_bytes, 6 * MIB, "{s:?}");
    assert!(live.iter().all(|b| b.capacity() == MIB));
    drop((live, big));
}

#[test]
fn the_mark_outlives_reset_peak() {
    let (_, alloc, q) = setup(true);
    four_ready_blocks(&alloc, &q);
    // Down to 2 MiB cached, and the statistics' peak reset to that.
    assert_eq!(alloc.trim(2 * MIB), 2 * MIB);
    alloc.reset_peak();
    assert_eq!(alloc.stats().peak_reserved_bytes, 2 * MIB);
    // The mark is still 4 MiB: 2 cached + 2 asked for fit under it, and
    // nothing is released.
    let big = alloc.malloc(2 * MIB, &q).unwrap();
    let s = balanced(alloc.stats());
    assert_eq!(
        (s.ready_count, s.peak_holds, s.reserved_bytes),
        (2, 0, 4 * MIB),
        "{s:?}"
    );
    drop(big);
}

#[test]
fn pending_bytes_do_not_count_against_the_mark() {
    let (gpu, alloc, q) = setup(true);
    let bufs: Vec<Buffer<ManualGpu>> = (0..4).map(|_| alloc.malloc(MIB, &q).unwrap()).collect();
    let [a, b, c, d] = <[_; 4]>::try_from(bufs).ok().unwrap();
    let mut cb = q.command_buffer().unwrap();
    cb.fill(&a, 1).unwrap();
    cb.fill(&b, 1).unwrap();
    let ticket = cb.commit().unwrap();
    drop((a, b, c)); // two pending, one ready; the mark is 4 MiB
    let s = balanced(alloc.stats());
    assert_eq!((s.pending_count, s.ready_count), (2, 1), "{s:?}");
    // 2 MiB fits none: held bytes are 4 - 2 pending = 2, and 2 + 2 is at
    // the mark, so the ready block stays; reserved rises to 6 MiB while
    // the pending blocks' work runs.
    let big = alloc.malloc(2 * MIB, &q).unwrap();
    let s = balanced(alloc.stats());
    assert_eq!(
        (s.ready_count, s.peak_holds, s.device_releases),
        (1, 0, 0),
        "{s:?}"
    );
    assert_eq!(s.peak_reserved_bytes, 6 * MIB, "{s:?}");
    drop((big, d));
    gpu.complete_all();
    assert!(ticket.is_complete().unwrap(), "{s:?}");
    assert_eq!(gpu.violations(), 0, "{:?}", gpu.messages());
}
