//! Model-based property test: random sequences of allocate, bind, commit,
//! complete (in any order across queues), drop, trim, clear and limit
//! changes, on the driven backend. After every step the allocator agrees
//! with a small reference model on which buffers are live, no two live
//! buffers share a byte, its own bookkeeping checks out from scratch
//! (segments tiled by blocks, free blocks merged and indexed), the
//! statistics balance, releasable bytes respect the cache limit, the device
//! holds exactly the reserved bytes, and the driven device saw no release or
//! reuse in flight (checked by byte range).
//!
//! Shrunk failures are kept as named regression tests at the end of this
//! file and run on every `cargo test`. `PROPTEST_CASES` sets the number of
//! random cases (256 by default).

use std::time::Duration;

use inflight::backend::manual::ManualGpu;
use inflight::{Allocator, Buffer, CommandBuffer, Config, Error, Limits, Queue};
use proptest::prelude::*;

const QUEUES: usize = 3;
const MB: u64 = 1 << 20;

#[derive(Clone, Debug)]
enum Step {
    Alloc { size: u64, queue: usize },
    Bind { buf: usize, queue: usize },
    Commit { queue: usize },
    Complete { queue: usize, upto: u64 },
    Drop { buf: usize },
    Trim { bytes: u64 },
    Clear,
    CacheLimit { bytes: u64 },
    RefuseNextAlloc, // the device refuses the next raw allocation (a fault)
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (prop_oneof![4u64..4096, 4096u64..(4 * MB)], 0..QUEUES).prop_map(|(size, queue)| Step::Alloc { size, queue }),
        4 => (0usize..16, 0..QUEUES).prop_map(|(buf, queue)| Step::Bind { buf, queue }),
        2 => (0..QUEUES).prop_map(|queue| Step::Commit { queue }),
        2 => (0..QUEUES, 0u64..6).prop_map(|(queue, upto)| Step::Complete { queue, upto }),
        3 => (0usize..16).prop_map(|buf| Step::Drop { buf }),
        1 => (0u64..(8 * MB)).prop_map(|bytes| Step::Trim { bytes }),
        1 => Just(Step::Clear),
        1 => (0u64..(16 * MB)).prop_map(|bytes| Step::CacheLimit { bytes }),
        1 => Just(Step::RefuseNextAlloc),
    ]
}

/// A queue's open command buffer, and the buffers bound to it.
type Open = (CommandBuffer<ManualGpu>, Vec<Buffer<ManualGpu>>);

struct Harness {
    gpu: ManualGpu,
    alloc: Allocator<ManualGpu>,
    queues: Vec<Queue<ManualGpu>>,
    open: Vec<Option<Open>>,
    live: Vec<Buffer<ManualGpu>>,
    /// Buffers dropped while an open command buffer still held them.
    held: usize,
    submitted: Vec<u64>,
    completed: Vec<u64>,
}

impl Harness {
    fn new(in_order: bool) -> Self {
        let gpu = ManualGpu::new(64 * MB, in_order);
        let config = Config::default()
            .with_memory_limit(48 * MB)
            .with_cache_limit(8 * MB)
            .with_gc_limit(40 * MB)
            .with_pressure_timeout(Duration::from_millis(1));
        let alloc = Allocator::new(gpu.clone(), config).unwrap();
        let queues = (0..QUEUES).map(|_| alloc.create_queue().unwrap()).collect();
        Harness {
            gpu,
            alloc,
            queues,
            open: (0..QUEUES).map(|_| None).collect(),
            live: Vec::new(),
            held: 0,
            submitted: vec![0; QUEUES],
            completed: vec![0; QUEUES],
        }
    }

    fn apply(&mut self, step: &Step, in_order: bool) {
        match *step {
            Step::Alloc { size, queue } => match self.alloc.malloc(size, &self.queues[queue]) {
                Ok(b) => {
                    self.gpu.note_new_owner(b.raw(), b.offset(), b.capacity());
                    self.live.push(b);
                }
                Err(Error::OutOfMemory { stats, .. }) => assert!(stats.balanced(), "{stats:?}"),
                Err(e) => panic!("malloc({size}): {e}"),
            },
            Step::Bind { buf, queue } => {
                if self.live.is_empty() {
                    return;
                }
                let b = &self.live[buf % self.live.len()];
                // On in-order queues, bind only on the allocation queue: a
                // cross-queue bind of an in-order reuse waits on the host, and
                // nothing completes while this single thread waits.
                let queue = if in_order {
                    b.queue_id() as usize
                } else {
                    queue
                };
                let slot = &mut self.open[queue];
                if slot.is_none() {
                    *slot = Some((self.queues[queue].command_buffer().unwrap(), Vec::new()));
                }
                let (cb, held) = slot.as_mut().unwrap();
                cb.fill(b, 1).unwrap();
                held.push(b.clone());
            }
            Step::Commit { queue } => {
                if let Some((cb, held)) = self.open[queue].take() {
                    let value = cb.commit().unwrap().value();
                    self.submitted[queue] = value;
                    drop(held);
                }
            }
            Step::Complete { queue, upto } => {
                let target = (self.completed[queue] + upto).min(self.submitted[queue]);
                self.completed[queue] = self.gpu.complete(queue as u32, target);
            }
            Step::Drop { buf } => {
                if self.live.is_empty() {
                    return;
                }
                drop(self.live.swap_remove(buf % self.live.len()));
            }
            Step::Trim { bytes } => {
                self.alloc.trim(bytes);
            }
            Step::Clear => {
                self.alloc.clear_cache();
            }
            Step::CacheLimit { bytes } => {
                let l = self.alloc.limits();
                let r = self.alloc.set_limits(Limits { cache: bytes, ..l });
                assert_eq!(r.is_ok(), bytes <= l.memory);
            }
            Step::RefuseNextAlloc => self.gpu.fail_next_allocation(),
        }
        // Buffers dropped while an open command buffer holds them stay live
        // until it commits.
        self.held = self
            .open
            .iter()
            .flatten()
            .flat_map(|(_, held)| held.iter())
            .filter(|h| !self.live.iter().any(|b| b.same(h)))
            .fold(Vec::<&Buffer<ManualGpu>>::new(), |mut seen, h| {
                if !seen.iter().any(|s| s.same(h)) {
                    seen.push(h);
                }
                seen
            })
            .len();
        self.check();
    }

    fn check(&self) {
        let s = self.alloc.stats();
        assert!(s.balanced(), "unbalanced: {s:?}");
        self.alloc
            .check_consistency()
            .unwrap_or_else(|e| panic!("inconsistent: {e}"));
        assert!(
            s.releasable_bytes <= self.alloc.limits().cache,
            "releasable bytes over the cache limit: {s:?}"
        );
        assert_eq!(self.gpu.violations(), 0, "{:?}", self.gpu.messages());
        assert_eq!(
            s.active_count,
            (self.live.len() + self.held) as u64,
            "live buffers: {s:?}"
        );
        // No two live buffers share a byte.
        let mut spans: Vec<(u64, u64, u64)> = self
            .live
            .iter()
            .map(|b| (b.block_id() >> 40, b.offset(), b.offset() + b.capacity()))
            .collect();
        spans.sort_unstable();
        for w in spans.windows(2) {
            assert!(
                w[0].0 != w[1].0 || w[0].2 <= w[1].1,
                "two live buffers overlap: {w:?}"
            );
        }
        assert_eq!(
            self.gpu.allocated_bytes(),
            s.reserved_bytes,
            "device and allocator disagree"
        );
    }

    fn finish(mut self) {
        for q in 0..QUEUES {
            self.apply(&Step::Commit { queue: q }, false);
        }
        self.live.clear();
        self.gpu.complete_all();
        self.alloc.clear_cache();
        let s = self.alloc.stats();
        assert_eq!(s.reserved_bytes, 0, "after drain and clear: {s:?}");
        assert_eq!(self.gpu.live_buffers(), 0);
        assert_eq!(self.gpu.violations(), 0, "{:?}", self.gpu.messages());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256)
    ))]

    #[test]
    fn allocator_agrees_with_the_model_on_unordered_queues(
        steps in prop::collection::vec(step(), 1..120),
    ) {
        let mut h = Harness::new(false);
        for s in &steps {
            h.apply(s, false);
        }
        h.finish();
    }

    #[test]
    fn allocator_agrees_with_the_model_on_in_order_queues(
        steps in prop::collection::vec(step(), 1..120),
    ) {
        let mut h = Harness::new(true);
        for s in &steps {
            h.apply(s, true);
        }
        h.finish();
    }
}

/// Runs a saved sequence.
fn replay(in_order: bool, steps: &[Step]) {
    let mut h = Harness::new(in_order);
    for s in steps {
        h.apply(s, in_order);
    }
    h.finish();
}

/// Shrunk by proptest: blocks promoted from pending to ready were not
/// trimmed to the cache limit, so ready bytes could pass it (I4).
#[test]
fn regression_promotion_respects_the_cache_limit() {
    use Step::*;
    let mut steps: Vec<Step> = (0..6)
        .map(|_| Alloc {
            size: 2 * MB,
            queue: 0,
        })
        .collect();
    steps.extend((0..6).map(|buf| Bind { buf, queue: 0 }));
    steps.push(Commit { queue: 0 });
    steps.extend((0..6).map(|_| Drop { buf: 0 }));
    steps.push(Complete { queue: 0, upto: 1 });
    replay(false, &steps);
}

/// Shrunk by proptest: promotion re-checked a block's other stamps against
/// cached watermarks, so a block whose second queue had completed stayed
/// pending until some later call refreshed that queue.
#[test]
fn regression_promotion_refreshes_other_queues_watermarks() {
    use Step::*;
    let mut steps: Vec<Step> = (0..3).map(|_| Alloc { size: 4, queue: 0 }).collect();
    steps.extend([
        Bind { buf: 2, queue: 1 },
        Bind { buf: 2, queue: 2 },
        Commit { queue: 1 },
        Commit { queue: 2 },
        Complete { queue: 2, upto: 1 },
        Drop { buf: 2 },
        Complete { queue: 1, upto: 1 },
    ]);
    replay(false, &steps);
}

/// Shrunk by proptest: the arena reset a recycled node's generation, so a
/// stale entry of another pool's due heap (left by a node merged away)
/// matched the recycled node, now free in flight on another queue, and
/// promoted it: `clear_cache` then released its segment in flight (I1).
#[test]
fn regression_in_order_reuse_after_clear_keeps_other_queues_uses() {
    use Step::*;
    let steps = [
        Alloc { size: 4, queue: 0 },
        Alloc {
            size: 87041,
            queue: 2,
        },
        Drop { buf: 5 },
        Alloc { size: 4, queue: 0 },
        Alloc { size: 4, queue: 2 },
        Alloc { size: 4, queue: 2 },
        Alloc {
            size: 1048577,
            queue: 0,
        },
        Alloc { size: 4, queue: 2 },
        Bind { buf: 0, queue: 0 },
        Bind { buf: 5, queue: 0 },
        Drop { buf: 5 },
        Drop { buf: 0 },
        Commit { queue: 2 },
        Drop { buf: 3 },
        Alloc { size: 4, queue: 1 },
        Bind { buf: 3, queue: 0 },
        Drop { buf: 3 },
        Clear,
        Commit { queue: 1 },
        Complete { queue: 2, upto: 1 },
    ];
    replay(true, &steps);
}
