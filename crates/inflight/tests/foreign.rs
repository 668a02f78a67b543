//! Stream-ordered queues ([`Allocator::adopt_queue`]) and declared uses
//! ([`Buffer::record_stream`]) on the simulated GPU: the program launches
//! its own work on the queues' executors (`SimGpu::launch`), outside the
//! allocator's timeline, as a CUDA program launches kernels on its streams.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use inflight::backend::sim::{SimConfig, SimGpu};
use inflight::{Allocator, Backend, Binding, Buffer, Config, Queue};

const WAIT: Duration = Duration::from_secs(10);

fn slow_sim() -> SimGpu {
    SimGpu::new(SimConfig {
        // 1 MiB of work takes about 20 ms: frees land while it runs.
        ns_per_kib: 20_000.0,
        jitter: 0.0,
        ..SimConfig::default()
    })
}

fn binding(buf: &Buffer<SimGpu>) -> Binding<'_, inflight::backend::sim::SimBuffer> {
    Binding {
        raw: buf.raw(),
        offset: buf.offset(),
        len: buf.len(),
    }
}

/// Launches, on `q`'s stream, a write of `value` to every word of `buf`,
/// and sets `done` when it ran.
fn launch_write(
    gpu: &SimGpu,
    q: &Queue<SimGpu>,
    buf: &Buffer<SimGpu>,
    value: u32,
    done: Arc<AtomicBool>,
) {
    let mut cmds = gpu.begin(q.raw()).unwrap();
    cmds.user(&[binding(buf)], move |views| {
        let n = views[0].words();
        views[0].write(&vec![value; n]);
        done.store(true, Ordering::Release);
    })
    .unwrap();
    gpu.launch(q.raw(), cmds).unwrap();
}

/// Launches, on `q`'s stream, a check that every word of `buf` holds
/// `value`; `ok` is cleared if one does not.
fn launch_check(
    gpu: &SimGpu,
    q: &Queue<SimGpu>,
    buf: &Buffer<SimGpu>,
    value: u32,
    ok: Arc<AtomicBool>,
) {
    let mut cmds = gpu.begin(q.raw()).unwrap();
    cmds.user(&[binding(buf)], move |views| {
        if views[0].read().iter().any(|&w| w != value) {
            ok.store(false, Ordering::Release);
        }
    })
    .unwrap();
    gpu.launch(q.raw(), cmds).unwrap();
}

fn adopted(gpu: &SimGpu) -> (Allocator<SimGpu>, Queue<SimGpu>, Queue<SimGpu>) {
    let alloc = Allocator::new(gpu.clone(), Config::default()).unwrap();
    let a = alloc.adopt_queue(gpu.create_queue().unwrap()).unwrap();
    let b = alloc.adopt_queue(gpu.create_queue().unwrap()).unwrap();
    (alloc, a, b)
}

/// A block freed on a stream-ordered queue while the program's work on it
/// is still queued goes to the next allocation on that queue at once, and
/// never to another queue, nor back to the device, before that work ran.
#[test]
fn a_stream_ordered_free_is_reused_in_order_and_nowhere_else() {
    let gpu = slow_sim();
    let (alloc, a, b) = adopted(&gpu);
    let ran = Arc::new(AtomicBool::new(false));
    let buf = alloc.malloc(1 << 20, &a).unwrap();
    let id = buf.block_id();
    launch_write(&gpu, &a, &buf, 7, ran.clone());
    drop(buf); // stream-ordered: the write above may still be queued
               // Another queue never gets it while the write may run.
    let other = alloc.malloc(1 << 20, &b).unwrap();
    assert!(ran.load(Ordering::Acquire) || other.block_id() != id);
    // Nor does the device get it back.
    alloc.clear_cache();
    assert_eq!(gpu.violations(), 0, "{:?}", gpu.violation_log());
    // The same queue may take it at once: its work runs after the write.
    let again = alloc.malloc(1 << 20, &a).unwrap();
    let ok = Arc::new(AtomicBool::new(true));
    launch_write(&gpu, &a, &again, 9, Arc::new(AtomicBool::new(false)));
    launch_check(&gpu, &a, &again, 9, ok.clone());
    drop((again, other));
    let s = alloc.stats(); // flushes the markers owed
    assert!(s.balanced(), "{s:?}");
    assert!(a.wait_idle(WAIT).unwrap() && b.wait_idle(WAIT).unwrap());
    assert!(
        ok.load(Ordering::Acquire),
        "the in-order reuse saw another value"
    );
    alloc.clear_cache();
    assert_eq!(alloc.stats().reserved_bytes, 0);
    assert_eq!(gpu.violations(), 0, "{:?}", gpu.violation_log());
}

/// A use declared on another stream keeps the block from its own queue too
/// until that stream's work ran: the reader sees its data intact.
#[test]
fn a_declared_use_on_another_stream_holds_the_block() {
    let gpu = slow_sim();
    let (alloc, a, b) = adopted(&gpu);
    let intact = Arc::new(AtomicBool::new(true));
    for round in 0..8u32 {
        let buf = alloc.malloc(1 << 18, &a).unwrap();
        let written = Arc::new(AtomicBool::new(false));
        launch_write(&gpu, &a, &buf, round, written.clone());
        // The program orders b after the write (an event wait, here a host
        // wait), then reads on b, declares that use, and frees at once.
        assert!(a.wait_idle(WAIT).unwrap() || written.load(Ordering::Acquire));
        while !written.load(Ordering::Acquire) {
            std::thread::yield_now();
        }
        // A long job ahead of the read keeps it queued a while.
        let filler = alloc.malloc(1 << 20, &b).unwrap();
        launch_write(&gpu, &b, &filler, 0, Arc::new(AtomicBool::new(false)));
        launch_check(&gpu, &b, &buf, round, intact.clone());
        buf.record_stream(&b).unwrap();
        drop((buf, filler));
        // Queue a's next allocations would overwrite the block if they got it.
        for _ in 0..4 {
            let x = alloc.malloc(1 << 18, &a).unwrap();
            launch_write(&gpu, &a, &x, 0xBAD, Arc::new(AtomicBool::new(false)));
        }
    }
    alloc.poll();
    assert!(a.wait_idle(WAIT).unwrap() && b.wait_idle(WAIT).unwrap());
    assert!(
        intact.load(Ordering::Acquire),
        "a declared use saw its block reused"
    );
    assert_eq!(gpu.violations(), 0, "{:?}", gpu.violation_log());
    assert!(alloc.stats().balanced());
}

/// With no commit after a stream-ordered free, the allocator submits a
/// marker of its own when it needs to know: the block then becomes ready.
#[test]
fn an_owed_marker_is_submitted_when_needed() {
    let gpu = slow_sim();
    let (alloc, a, _b) = adopted(&gpu);
    let buf = alloc.malloc(4096, &a).unwrap();
    drop(buf);
    assert_eq!(a.last_submitted(), 0);
    let mut s = alloc.stats();
    assert_eq!(a.last_submitted(), 1, "stats() flushes the owed marker");
    for _ in 0..1000 {
        if s.pending_count == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
        s = alloc.stats();
    }
    assert_eq!((s.pending_count, s.ready_count), (0, 1), "{s:?}");
}

/// A buffer of another allocator, or a queue of another, is refused.
#[test]
fn record_stream_refuses_another_allocators_queue() {
    let gpu = slow_sim();
    let (alloc, a, _) = adopted(&gpu);
    let (_other, c, _) = adopted(&gpu);
    let buf = alloc.malloc(4096, &a).unwrap();
    assert!(matches!(
        buf.record_stream(&c),
        Err(inflight::Error::ForeignQueue)
    ));
}
