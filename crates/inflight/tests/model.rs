//! Model-based property test: random sequences of allocate, bind, commit,
//! complete (in any order across queues), drop, trim, clear and limit
//! changes, on the driven backend, with `Config::hold_peak` on or off. After
//! every step the allocator agrees with a small reference model on which
//! blocks are live and which are pending, the ready and released blocks
//! together are exactly the idle ones, the statistics balance, ready bytes
//! respect the cache limit, and the driven device saw no release or reuse in
//! flight.
//!
//! Shrunk failures are kept as named regression tests at the end of this
//! file and run on every `cargo test`. `PROPTEST_CASES` sets the number of
//! random cases (256 by default).

use std::collections::{BTreeMap, HashMap};
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

/// What the model knows of a device block: its stamps, and whether it is live.
#[derive(Default)]
struct ModelBlock {
    stamps: BTreeMap<usize, u64>,
    live: bool,
}

struct Harness {
    gpu: ManualGpu,
    alloc: Allocator<ManualGpu>,
    queues: Vec<Queue<ManualGpu>>,
    open: Vec<Option<(CommandBuffer<ManualGpu>, Vec<u64>)>>,
    live: Vec<Buffer<ManualGpu>>,
    blocks: HashMap<u64, ModelBlock>,
    submitted: Vec<u64>,
    completed: Vec<u64>,
}

impl Harness {
    fn new(in_order: bool, hold_peak: bool) -> Self {
        let gpu = ManualGpu::new(64 * MB, in_order);
        let config = Config {
            hold_peak,
            memory_limit: Some(48 * MB),
            cache_limit: Some(8 * MB),
            gc_limit: Some(40 * MB),
            pressure_timeout: Duration::from_millis(1),
            ..Config::default()
        };
        let alloc = Allocator::new(gpu.clone(), config).unwrap();
        let queues = (0..QUEUES).map(|_| alloc.create_queue().unwrap()).collect();
        Harness {
            gpu,
            alloc,
            queues,
            open: (0..QUEUES).map(|_| None).collect(),
            live: Vec::new(),
            blocks: HashMap::new(),
            submitted: vec![0; QUEUES],
            completed: vec![0; QUEUES],
        }
    }

    fn apply(&mut self, step: &Step, in_order: bool) {
        match *step {
            Step::Alloc { size, queue } => match self.alloc.malloc(size, &self.queues[queue]) {
                Ok(b) => {
                    self.gpu.note_new_owner(b.raw());
                    let m = self.blocks.entry(b.block_id()).or_default();
                    assert!(!m.live, "block {} handed out twice", b.block_id());
                    m.live = true;
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
                let (cb, ids) = slot.as_mut().unwrap();
                cb.fill(b, 1).unwrap();
                ids.push(b.block_id());
            }
            Step::Commit { queue } => {
                if let Some((cb, ids)) = self.open[queue].take() {
                    let value = cb.commit().unwrap().value();
                    self.submitted[queue] = value;
                    for id in ids {
                        let s = self
                            .blocks
                            .get_mut(&id)
                            .unwrap()
                            .stamps
                            .entry(queue)
                            .or_default();
                        *s = (*s).max(value);
                    }
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
                let b = self.live.swap_remove(buf % self.live.len());
                let id = b.block_id();
                // An open command buffer holds it until commit: still live.
                let held = self.open.iter().flatten().any(|(_, ids)| ids.contains(&id));
                drop(b);
                if !held {
                    self.blocks.get_mut(&id).unwrap().live = false;
                }
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
        // Buffers dropped while an open command buffer held them become free
        // at commit: recompute liveness from the handles and open lists.
        for (id, m) in self.blocks.iter_mut() {
            m.live = self.live.iter().any(|b| b.block_id() == *id)
                || self.open.iter().flatten().any(|(_, ids)| ids.contains(id));
        }
        self.check();
    }

    fn check(&self) {
        let s = self.alloc.stats();
        assert!(s.balanced(), "unbalanced: {s:?}");
        assert!(
            s.ready_bytes <= self.alloc.limits().cache,
            "ready over the cache limit: {s:?}"
        );
        assert_eq!(self.gpu.violations(), 0, "{:?}", self.gpu.messages());
        let live = self.blocks.values().filter(|m| m.live).count() as u64;
        let pending = self
            .blocks
            .values()
            .filter(|m| !m.live && m.stamps.iter().any(|(&q, &v)| v > self.completed[q]))
            .count() as u64;
        let idle = self.blocks.len() as u64 - live - pending;
        assert_eq!(s.active_count, live, "live blocks: {s:?}");
        assert_eq!(s.pending_count, pending, "pending blocks: {s:?}");
        assert_eq!(
            s.ready_count + s.device_releases,
            idle,
            "idle = ready + released: {s:?}"
        );
        assert_eq!(s.device_allocations, self.blocks.len() as u64, "{s:?}");
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
        hold_peak in any::<bool>(),
    ) {
        let mut h = Harness::new(false, hold_peak);
        for s in &steps {
            h.apply(s, false);
        }
        h.finish();
    }

    #[test]
    fn allocator_agrees_with_the_model_on_in_order_queues(
        steps in prop::collection::vec(step(), 1..120),
        hold_peak in any::<bool>(),
    ) {
        let mut h = Harness::new(true, hold_peak);
        for s in &steps {
            h.apply(s, true);
        }
        h.finish();
    }
}

/// Runs a saved sequence.
fn replay(in_order: bool, steps: &[Step]) {
    let mut h = Harness::new(in_order, false);
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
