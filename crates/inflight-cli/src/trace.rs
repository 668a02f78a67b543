//! Allocation traces: JSON Lines, one event per line (see docs/TRACE.md).
//!
//! [`Recorder`] writes them (`repro --record`); [`parse`] reads and checks
//! them for `replay`, resolving trace ids to dense slots and stream ids to
//! dense queue indices, so that every error in a trace is found, with its
//! line number, before anything is replayed.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufWriter, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use parking_lot::Mutex;
use serde::Deserialize;

/// The most distinct streams a trace may use: one allocator queue each.
pub const MAX_STREAMS: usize = inflight::MAX_QUEUES;

/// One checked event, with trace ids and streams resolved.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Event {
    /// Allocate `bytes` for work on `stream` into `slot`.
    Alloc { slot: u32, bytes: u64, stream: u32 },
    /// Drop the handle in `slot`.
    Free { slot: u32 },
    /// Bind the buffer in `slot` to `stream`'s open submission.
    Use { slot: u32, stream: u32 },
    /// Submit `stream`'s open submission; `gpu_us` is its GPU time, if given.
    Commit { stream: u32, gpu_us: Option<f64> },
}

/// A parsed, checked trace.
#[derive(Debug, Default)]
pub struct Trace {
    pub events: Vec<Event>,
    /// The line each event came from (1-based), for errors during replay.
    pub lines: Vec<u32>,
    /// Slots needed: the most trace buffers live at once.
    pub slots: usize,
    /// Distinct streams, in order of first appearance.
    pub streams: Vec<u64>,
    pub allocations: u64,
    pub frees: u64,
    pub uses: u64,
    pub commits: u64,
    /// Whether the trace has any `use` or `commit` event; without them,
    /// replay binds at allocation and commits every N events.
    pub explicit_submissions: bool,
    /// The highest sum of requested bytes of live trace buffers.
    pub peak_live_bytes: u64,
    /// The highest number of live trace buffers.
    pub peak_live_buffers: u64,
    /// The last `t` in the trace, µs.
    pub last_t_us: Option<f64>,
}

/// A trace error: the line it is on (1-based) and what is wrong.
#[derive(Debug)]
pub struct TraceError {
    pub line: u64,
    pub message: String,
}

impl fmt::Display for TraceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}", self.message)
        } else {
            write!(f, "line {}: {}", self.line, self.message)
        }
    }
}

impl std::error::Error for TraceError {}

/// One line as written; unknown fields are ignored.
#[derive(Deserialize)]
struct Line<'a> {
    #[serde(borrow)]
    ev: Cow<'a, str>,
    id: Option<u64>,
    bytes: Option<u64>,
    stream: Option<u64>,
    t: Option<f64>,
    gpu_us: Option<f64>,
}

/// Reads and checks a trace.
pub fn parse(reader: impl BufRead) -> Result<Trace, TraceError> {
    let mut trace = Trace::default();
    // Trace id -> (slot, bytes) of live buffers.
    let mut live: HashMap<u64, (u32, u64)> = HashMap::new();
    let mut free_slots: Vec<u32> = Vec::new();
    let mut streams: HashMap<u64, u32> = HashMap::new();
    let mut live_bytes = 0u64;
    let mut buf = String::new();
    let mut reader = reader;
    let mut n = 0u64;
    loop {
        buf.clear();
        let read = reader.read_line(&mut buf).map_err(|e| TraceError {
            line: n + 1,
            message: format!("cannot read: {e}"),
        })?;
        if read == 0 {
            break;
        }
        n += 1;
        let err = |message: String| TraceError { line: n, message };
        let text = buf.trim();
        if text.is_empty() {
            continue;
        }
        if n > u64::from(u32::MAX) {
            return Err(err("too many lines (the limit is 2^32 - 1)".into()));
        }
        let l: Line = serde_json::from_str(text)
            .map_err(|e| err(format!("malformed event ({e}): {}", clip(text))))?;
        if let Some(t) = l.t {
            if !t.is_finite() || t < 0.0 {
                return Err(err(format!("\"t\" must be a time in µs, not {t}")));
            }
            trace.last_t_us = Some(t);
        }
        let need_id = |what: &str| {
            l.id.ok_or_else(|| err(format!("a \"{what}\" event needs an \"id\"")))
        };
        let mut stream_of = |what: &str, default: Option<u64>| -> Result<u32, TraceError> {
            let s = l
                .stream
                .or(default)
                .ok_or_else(|| err(format!("a \"{what}\" event needs a \"stream\"")))?;
            if let Some(&q) = streams.get(&s) {
                return Ok(q);
            }
            if streams.len() >= MAX_STREAMS {
                return Err(err(format!(
                    "stream {s} is one more than the {MAX_STREAMS} distinct streams replay supports"
                )));
            }
            let q = streams.len() as u32;
            streams.insert(s, q);
            trace.streams.push(s);
            Ok(q)
        };
        let event = match l.ev.as_ref() {
            "alloc" => {
                let id = need_id("alloc")?;
                let bytes = l
                    .bytes
                    .ok_or_else(|| err("an \"alloc\" event needs \"bytes\"".into()))?;
                if bytes == 0 {
                    return Err(err(format!("alloc of id {id} asks for 0 bytes")));
                }
                let stream = stream_of("alloc", Some(0))?;
                if live.contains_key(&id) {
                    return Err(err(format!(
                        "alloc of id {id}, which is already live (not freed since its alloc)"
                    )));
                }
                let slot = match free_slots.pop() {
                    Some(s) => s,
                    None => {
                        trace.slots += 1;
                        (trace.slots - 1) as u32
                    }
                };
                live.insert(id, (slot, bytes));
                live_bytes += bytes;
                trace.peak_live_bytes = trace.peak_live_bytes.max(live_bytes);
                trace.peak_live_buffers = trace.peak_live_buffers.max(live.len() as u64);
                trace.allocations += 1;
                Event::Alloc {
                    slot,
                    bytes,
                    stream,
                }
            }
            "free" => {
                let id = need_id("free")?;
                let Some((slot, bytes)) = live.remove(&id) else {
                    return Err(err(format!(
                        "free of unknown id {id} (never allocated, or already freed)"
                    )));
                };
                free_slots.push(slot);
                live_bytes -= bytes;
                trace.frees += 1;
                Event::Free { slot }
            }
            "use" => {
                let id = need_id("use")?;
                let Some(&(slot, _)) = live.get(&id) else {
                    return Err(err(format!(
                        "use of unknown id {id} (never allocated, or already freed)"
                    )));
                };
                let stream = stream_of("use", None)?;
                trace.uses += 1;
                trace.explicit_submissions = true;
                Event::Use { slot, stream }
            }
            "commit" => {
                let stream = stream_of("commit", None)?;
                if let Some(g) = l.gpu_us {
                    if !g.is_finite() || g < 0.0 {
                        return Err(err(format!("\"gpu_us\" must be a time in µs, not {g}")));
                    }
                }
                trace.commits += 1;
                trace.explicit_submissions = true;
                Event::Commit {
                    stream,
                    gpu_us: l.gpu_us,
                }
            }
            "meta" => continue,
            other => {
                return Err(err(format!(
                    "unknown event \"{other}\" (expected alloc, free, use, commit or meta)"
                )))
            }
        };
        trace.events.push(event);
        trace.lines.push(n as u32);
    }
    if trace.events.is_empty() {
        return Err(TraceError {
            line: 0,
            message: "the trace has no events".into(),
        });
    }
    Ok(trace)
}

/// Reads and checks a trace file, gzip-compressed or not; errors name the
/// file and line.
pub fn load(path: &Path) -> anyhow::Result<Trace> {
    let reader = crate::input::open(path)?;
    parse(reader).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

fn clip(s: &str) -> String {
    const MAX: usize = 80;
    if s.len() <= MAX {
        return s.to_string();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// Writes a trace from many threads: one buffered file behind a mutex, each
/// event stamped with `t` under the lock so the file's order is the order
/// the events happened in. Write errors are kept and returned by
/// [`Recorder::finish`].
pub struct Recorder {
    out: Mutex<Sink>,
    start: Instant,
    next_id: AtomicU64,
}

struct Sink {
    w: BufWriter<File>,
    events: u64,
    error: Option<io::Error>,
}

impl Recorder {
    /// Creates (truncates) `path` and writes a `meta` line with `meta`'s
    /// fields (a JSON object's members, without braces, or empty).
    pub fn create(path: &Path, meta: &str) -> anyhow::Result<Recorder> {
        let file = File::create(path)
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", path.display()))?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        let sep = if meta.is_empty() { "" } else { "," };
        writeln!(
            w,
            "{{\"ev\":\"meta\",\"format\":\"inflight-trace/1\"{sep}{meta}}}"
        )?;
        Ok(Recorder {
            out: Mutex::new(Sink {
                w,
                events: 0,
                error: None,
            }),
            start: Instant::now(),
            next_id: AtomicU64::new(1),
        })
    }

    /// A fresh trace id: unique per buffer for the whole run.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Runs `f` on the file under the lock, with `t` now; `f` returns the
    /// events it wrote. The first write error is kept and stops recording.
    fn batch(&self, f: impl FnOnce(&mut BufWriter<File>, u64) -> io::Result<u64>) {
        let mut s = self.out.lock();
        if s.error.is_some() {
            return;
        }
        let t = self.start.elapsed().as_micros() as u64;
        match f(&mut s.w, t) {
            Ok(n) => s.events += n,
            Err(e) => s.error = Some(e),
        }
    }

    /// `alloc` of each id with its size on `stream`, under one lock.
    pub fn alloc_all(&self, ids: &[u64], sizes: impl Iterator<Item = u64>, stream: usize) {
        self.batch(|w, t| {
            for (id, bytes) in ids.iter().zip(sizes) {
                writeln!(
                    w,
                    r#"{{"ev":"alloc","id":{id},"bytes":{bytes},"stream":{stream},"t":{t}}}"#
                )?;
            }
            Ok(ids.len() as u64)
        });
    }

    /// `free` of each id, under one lock.
    pub fn free_all(&self, ids: &[u64]) {
        self.batch(|w, t| {
            for id in ids {
                writeln!(w, r#"{{"ev":"free","id":{id},"t":{t}}}"#)?;
            }
            Ok(ids.len() as u64)
        });
    }

    /// `use` of each id on `stream`, then `commit` of `stream`, under one lock.
    pub fn use_all_and_commit(&self, ids: &[u64], stream: usize) {
        self.batch(|w, t| {
            for id in ids {
                writeln!(w, r#"{{"ev":"use","id":{id},"stream":{stream},"t":{t}}}"#)?;
            }
            writeln!(w, r#"{{"ev":"commit","stream":{stream},"t":{t}}}"#)?;
            Ok(ids.len() as u64 + 1)
        });
    }

    /// Flushes the file; returns the number of events written.
    pub fn finish(&self) -> anyhow::Result<u64> {
        let mut s = self.out.lock();
        if let Some(e) = s.error.take() {
            anyhow::bail!("writing the trace failed: {e}");
        }
        s.w.flush()
            .map_err(|e| anyhow::anyhow!("writing the trace failed: {e}"))?;
        Ok(s.events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(s: &str) -> Result<Trace, TraceError> {
        parse(s.as_bytes())
    }

    #[test]
    fn events_resolve_to_slots_and_streams() {
        let t = parse_str(concat!(
            "{\"ev\":\"meta\",\"source\":\"test\"}\n",
            "{\"ev\":\"alloc\",\"id\":7,\"bytes\":4096,\"stream\":5,\"t\":1}\n",
            "\n",
            "{\"ev\":\"use\",\"id\":7,\"stream\":9,\"extra\":[1,2]}\n",
            "{\"ev\":\"commit\",\"stream\":9,\"gpu_us\":12.5}\n",
            "{\"ev\":\"free\",\"id\":7}\n",
            "{\"ev\":\"alloc\",\"id\":7,\"bytes\":8}\n",
        ))
        .unwrap();
        assert_eq!(
            t.events,
            [
                Event::Alloc {
                    slot: 0,
                    bytes: 4096,
                    stream: 0
                },
                Event::Use { slot: 0, stream: 1 },
                Event::Commit {
                    stream: 1,
                    gpu_us: Some(12.5)
                },
                Event::Free { slot: 0 },
                Event::Alloc {
                    slot: 0,
                    bytes: 8,
                    stream: 2
                },
            ]
        );
        assert_eq!(t.lines, [2, 4, 5, 6, 7]);
        assert_eq!(t.streams, [5, 9, 0]);
        assert_eq!(t.peak_live_bytes, 4096);
        assert!(t.explicit_submissions);
    }

    #[test]
    fn bad_input_names_its_line() {
        let cases = [
            ("{\"ev\":\"alloc\",\"id\":1,\"bytes\":4}\n{oops\n", 2, "malformed"),
            ("{\"ev\":\"free\",\"id\":3}\n", 1, "free of unknown id 3"),
            (
                "{\"ev\":\"alloc\",\"id\":1,\"bytes\":4}\n{\"ev\":\"alloc\",\"id\":1,\"bytes\":4}\n",
                2,
                "already live",
            ),
            ("{\"ev\":\"alloc\",\"id\":1,\"bytes\":0}\n", 1, "0 bytes"),
            ("{\"ev\":\"use\",\"id\":1,\"stream\":0}\n", 1, "use of unknown id 1"),
            ("{\"ev\":\"commit\"}\n", 1, "needs a \"stream\""),
            ("{\"ev\":\"launch\"}\n", 1, "unknown event"),
            ("{\"ev\":\"alloc\",\"id\":1,\"bytes\":-4}\n", 1, "malformed"),
        ];
        for (text, line, what) in cases {
            let e = parse_str(text).unwrap_err();
            assert_eq!(e.line, line, "{text}: {e}");
            assert!(e.to_string().contains(what), "{text}: {e}");
        }
    }

    #[test]
    fn too_many_streams_is_an_error() {
        let mut s = String::new();
        for i in 0..=MAX_STREAMS {
            s.push_str(&format!(
                "{{\"ev\":\"alloc\",\"id\":{i},\"bytes\":4,\"stream\":{}}}\n",
                i * 10
            ));
        }
        let e = parse_str(&s).unwrap_err();
        assert_eq!(e.line, MAX_STREAMS as u64 + 1);
        assert!(e.to_string().contains("distinct streams"), "{e}");
    }
}
