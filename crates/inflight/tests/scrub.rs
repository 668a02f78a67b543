//! Scrubbing (`Config::scrub`): a recycled buffer reads as zeros to its new
//! owner; without it, the previous owner's bytes show through.

use std::time::Duration;

use inflight::backend::checksum_uniform;
use inflight::backend::sim::{SimConfig, SimGpu};
use inflight::{Allocator, Buffer, Config, Queue};

const SECRET: u32 = 0xDEAD_BEEF;
const LEN: u64 = 64 << 10;

fn setup(scrub: bool, op_cost: Duration) -> (SimGpu, Allocator<SimGpu>, Queue<SimGpu>) {
    let g = SimGpu::new(SimConfig {
        seed: 1,
        op_cost,
        ..SimConfig::default()
    });
    let a = Allocator::new(g.clone(), Config::default().with_scrub(scrub)).unwrap();
    let q = a.create_queue().unwrap();
    (g, a, q)
}

/// The previous owner writes its secret, then lets go of the buffer.
fn previous_owner(a: &Allocator<SimGpu>, q: &Queue<SimGpu>, wait: bool) -> u64 {
    let b = a.malloc(LEN, q).unwrap();
    let id = b.block_id();
    let mut cb = q.command_buffer().unwrap();
    cb.fill(&b, SECRET).unwrap();
    let t = cb.commit().unwrap();
    drop(b);
    if wait {
        assert!(t.wait(Duration::from_secs(5)).unwrap());
    }
    id
}

/// What the new owner reads on its first use.
fn first_read(q: &Queue<SimGpu>, b: &Buffer<SimGpu>) -> u64 {
    let mut cb = q.command_buffer().unwrap();
    let slot = cb.checksum(b).unwrap();
    let t = cb.commit().unwrap();
    assert!(t.wait(Duration::from_secs(10)).unwrap());
    t.checksum(slot).unwrap()
}

#[test]
fn without_scrubbing_a_recycled_buffer_exposes_the_previous_owners_bytes() {
    let (g, a, q) = setup(false, Duration::from_micros(2));
    let id = previous_owner(&a, &q, true);
    let b = a.malloc(LEN, &q).unwrap();
    assert_eq!(b.block_id(), id, "the block was recycled");
    assert_eq!(first_read(&q, &b), checksum_uniform(SECRET, LEN / 4));
    assert_eq!(g.violations(), 0);
}

#[test]
fn with_scrubbing_a_recycled_buffer_reads_as_zeros() {
    let (g, a, q) = setup(true, Duration::from_micros(2));
    let id = previous_owner(&a, &q, true);
    let b = a.malloc(LEN, &q).unwrap();
    assert_eq!(b.block_id(), id, "the block was recycled");
    assert_eq!(first_read(&q, &b), checksum_uniform(0, LEN / 4));
    // Only the first use is scrubbed: the owner's own writes stay.
    let mut cb = q.command_buffer().unwrap();
    cb.fill(&b, 5).unwrap();
    cb.commit().unwrap().wait(Duration::MAX).unwrap();
    assert_eq!(first_read(&q, &b), checksum_uniform(5, LEN / 4));
    // A shorter request on the same block: zeros over all of it.
    drop(b);
    let short = a.malloc(LEN - 4096, &q).unwrap();
    assert_eq!(short.block_id(), id);
    assert_eq!(
        first_read(&q, &short),
        checksum_uniform(0, (LEN - 4096) / 4)
    );
    assert_eq!(g.violations(), 0);
}

#[test]
fn scrubbing_is_ordered_after_the_previous_owners_work_still_in_flight() {
    // The previous owner's fill is still running when the block is reused
    // on the same in-order queue: the zero fill runs after it.
    let (g, a, q) = setup(true, Duration::from_millis(30));
    let id = previous_owner(&a, &q, false);
    let b = a.malloc(LEN, &q).unwrap();
    assert_eq!(b.block_id(), id, "reused in order, before completion");
    assert_eq!(first_read(&q, &b), checksum_uniform(0, LEN / 4));
    assert_eq!(g.violations(), 0);
}

#[test]
fn a_scrub_recorded_in_a_command_buffer_never_submitted_is_owed_again() {
    let (g, a, q) = setup(true, Duration::from_micros(2));
    previous_owner(&a, &q, true);
    let b = a.malloc(LEN, &q).unwrap();
    let mut abandoned = q.command_buffer().unwrap();
    abandoned.checksum(&b).unwrap();
    drop(abandoned);
    assert_eq!(first_read(&q, &b), checksum_uniform(0, LEN / 4));
    assert_eq!(g.violations(), 0);
}
