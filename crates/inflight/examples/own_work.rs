//! A program's own GPU work on inflight buffers, through the open API.
//!
//! Each round allocates a buffer, records the program's own operations on it
//! (not inflight's harness operations): write a pattern of the round's own,
//! then, as a second operation, read it back into host memory. It commits,
//! and drops the buffer at once, while that work is still in flight. Rounds
//! alternate between two queues, whose work runs concurrently. The allocator
//! must neither release the block nor hand it to a round on the other queue
//! before the work ran (a round on the same queue may take it: its work
//! runs after): every round's read-back then holds its own pattern, which
//! the program checks once everything completed.
//!
//! ```text
//! cargo run --release -p inflight --example own_work            # simulated GPU
//! cargo run --release -p inflight --example own_work --features cuda -- --cuda
//! ```

use std::sync::{Arc, Mutex};
use std::time::Duration;

use inflight::{Allocator, Backend, Buffer, CommandBuffer, Config, Queue, Ticket};

/// Rounds, and the words each round's buffer holds.
const ROUNDS: u32 = 64;
const WORDS: usize = 64 * 1024;

/// What each round read back, filled in by the GPU's work.
type Readback = Arc<Mutex<Vec<u32>>>;

/// The program's own work on one backend: write `pattern` over the bound
/// buffer, then copy it into `out`.
trait OwnWork: Backend {
    fn record(
        cb: &mut CommandBuffer<Self>,
        buf: &Buffer<Self>,
        pattern: u32,
        out: Readback,
    ) -> inflight::Result<()>
    where
        Self: Sized;
}

impl OwnWork for inflight::backend::sim::SimGpu {
    fn record(
        cb: &mut CommandBuffer<Self>,
        buf: &Buffer<Self>,
        pattern: u32,
        out: Readback,
    ) -> inflight::Result<()> {
        let binding = cb.bind(buf)?;
        let (_, cmds) = cb.native();
        // A host-side "kernel" on the simulated GPU: it runs on the queue's
        // executor, in order, when the submission gets there.
        cmds.user(&[binding], move |views| {
            let view = &views[0];
            let words: Vec<u32> = (0..view.words() as u32).map(|i| pattern ^ i).collect();
            view.write(&words);
        })?;
        cmds.user(&[binding], move |views| {
            *out.lock().unwrap() = views[0].read();
        })?;
        Ok(())
    }
}

#[cfg(feature = "cuda")]
impl OwnWork for inflight::backend::cuda::CudaGpu {
    fn record(
        cb: &mut CommandBuffer<Self>,
        buf: &Buffer<Self>,
        pattern: u32,
        out: Readback,
    ) -> inflight::Result<()> {
        use cudarc::driver::sys;
        let ptr = cb.bind(buf)?.device_ptr();
        let words = (buf.len() / 4) as usize;
        let (_, cmds) = cb.native();
        // Driver calls enqueued on the submission's stream: a 32-bit memset
        // (all words get `pattern`, so the check below expects that), then
        // a copy back to the host, which the stream runs after it.
        cmds.user(move |stream| {
            let mut host = out.lock().unwrap();
            host.resize(words, 0);
            // SAFETY: `ptr` is a bound buffer's address with `words` words
            // (the allocator keeps it until this submission completes, I1);
            // `host` holds `words` words and outlives the copy (the program
            // reads it only after the ticket completed, and pageable copies
            // return once the data is staged).
            let (set, copy) = unsafe {
                (
                    sys::cuMemsetD32Async(ptr, pattern, words, stream),
                    sys::cuMemcpyDtoHAsync_v2(host.as_mut_ptr().cast(), ptr, words * 4, stream),
                )
            };
            for (call, r) in [("cuMemsetD32Async", set), ("cuMemcpyDtoHAsync", copy)] {
                r.result()
                    .map_err(|e| inflight::DeviceError::Other(format!("{call}: {e:?}")))?;
            }
            Ok(())
        });
        Ok(())
    }
}

/// What a round's read-back must hold.
fn expected(pattern: u32, i: usize, uniform: bool) -> u32 {
    if uniform {
        pattern
    } else {
        pattern ^ i as u32
    }
}

fn run<B: OwnWork>(backend: B, uniform: bool) -> Result<(), Box<dyn std::error::Error>> {
    let alloc = Allocator::new(backend, Config::default())?;
    let queues: [Queue<B>; 2] = [alloc.create_queue()?, alloc.create_queue()?];
    let mut rounds: Vec<(u32, Readback, Ticket<B>)> = Vec::new();
    for round in 0..ROUNDS {
        let queue = &queues[round as usize % 2];
        let pattern = 0xC0DE_0000 | round;
        let buf = alloc.malloc((WORDS * 4) as u64, queue)?;
        let out: Readback = Arc::new(Mutex::new(Vec::new()));
        let mut cb = queue.command_buffer()?;
        B::record(&mut cb, &buf, pattern, out.clone())?;
        let ticket = cb.commit()?;
        drop(buf); // in flight: the allocator holds the block for the work
        rounds.push((pattern, out, ticket));
    }
    let mut wrong = 0usize;
    for (pattern, out, ticket) in &rounds {
        ticket.wait(Duration::from_secs(30))?;
        let got = out.lock().unwrap();
        let bad = got.len() != WORDS
            || got
                .iter()
                .enumerate()
                .any(|(i, &w)| w != expected(*pattern, i, uniform));
        wrong += usize::from(bad);
    }
    let stats = alloc.stats();
    println!(
        "{} rounds on {}: {} read back wrong; {} device allocations, {} cache hits, {} frees in flight",
        ROUNDS,
        alloc.device_info().name,
        wrong,
        stats.device_allocations,
        stats.cache_hits,
        stats.deferred_frees
    );
    if wrong > 0 || !stats.balanced() {
        return Err(format!("{wrong} rounds read back another round's data").into());
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::args().any(|a| a == "--cuda") {
        #[cfg(feature = "cuda")]
        return run(inflight::backend::cuda::CudaGpu::default_device()?, true);
        #[cfg(not(feature = "cuda"))]
        return Err("built without the `cuda` feature: add --features cuda".into());
    }
    use inflight::backend::sim::{SimConfig, SimGpu};
    // A slow simulated GPU, so that every free lands while work is queued.
    let gpu = SimGpu::new(SimConfig {
        ns_per_kib: 2_000.0,
        ..SimConfig::default()
    });
    run(gpu, false)
}
