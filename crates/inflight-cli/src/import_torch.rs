//! `inflight import-torch`: a PyTorch memory snapshot (the pickle that
//! `torch.cuda.memory._dump_snapshot` writes, or the same dict as JSON)
//! turned into an inflight trace (docs/TRACE.md) that `replay` and `plot`
//! read.
//!
//! One device's `device_traces` list is read in order: each `alloc` becomes
//! an `alloc` (a fresh id each time, so an address reused after a free is
//! a new buffer; streams renumbered from 0 in order of first appearance),
//! each `free_requested` a `free` (or the `free_completed`, where an
//! address has one without a `free_requested` before it). Frees of blocks
//! allocated before the recording began, and every other entry (`oom`,
//! `snapshot`, `segment_*`), are skipped and counted; frames are ignored.
//! The pickle is read by [`crate::pickle`], which runs no code.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use serde::Serialize;

use crate::progress::Steps;
use crate::pyvalue::PyValue;

#[derive(clap::Args)]
pub struct ImportArgs {
    /// The snapshot: a pickle from `torch.cuda.memory._dump_snapshot`
    /// (protocols 2 to 5) or the same dict as JSON; gzip-compressed or not.
    snapshot: PathBuf,
    /// The trace to write (JSON Lines; gzip-compressed if it ends in .gz).
    #[arg(short, long, value_name = "TRACE")]
    output: PathBuf,
    /// The device whose trace to import [default: the first with entries].
    #[arg(long, value_name = "N")]
    device: Option<usize>,
    /// Print the summary as one JSON object.
    #[arg(long)]
    json: bool,
    /// No progress display, no notes on stderr.
    #[arg(long, short)]
    quiet: bool,
}

/// What an import wrote and skipped.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ImportSummary {
    /// The device imported.
    pub device: usize,
    /// Devices whose trace has entries.
    pub devices_with_entries: Vec<usize>,
    /// Entries of the device's trace.
    pub entries: u64,
    /// Events written (allocs and frees, the `meta` line excluded).
    pub events: u64,
    pub allocs: u64,
    pub frees: u64,
    /// Frees taken from a `free_completed` with no `free_requested`
    /// before it (included in `frees`).
    pub frees_from_completed: u64,
    /// Frees written because an address was allocated again with no free
    /// of it in between (a gap in the recording; included in `frees`).
    pub implied_frees: u64,
    /// Frees of blocks allocated before the recording began: skipped.
    pub skipped_frees: u64,
    /// Other entries skipped, by action (`oom`, `segment_alloc`, …, and
    /// `alloc` of 0 bytes).
    pub skipped: BTreeMap<String, u64>,
    /// Buffers still allocated at the end (replay frees them then).
    pub live_at_end: u64,
    /// The raw stream values, in the order they were renumbered (0, 1, …).
    pub streams: Vec<i64>,
    /// The first entry's `time_us`: each event's `t` is its `time_us` less
    /// this.
    pub t0_us: Option<i64>,
}

impl ImportSummary {
    pub fn skipped_entries(&self) -> u64 {
        self.skipped.values().sum()
    }
}

/// One event of the trace to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Out {
    Alloc {
        id: u64,
        bytes: u64,
        stream: u32,
        t: Option<u64>,
    },
    Free {
        id: u64,
        t: Option<u64>,
    },
}

/// Picks the device: `wanted`, or the first with entries.
fn pick_device(traces: &[PyValue], wanted: Option<usize>) -> anyhow::Result<(usize, Vec<usize>)> {
    let with_entries: Vec<usize> = traces
        .iter()
        .enumerate()
        .filter(|(_, t)| t.as_seq().is_some_and(|s| !s.is_empty()))
        .map(|(i, _)| i)
        .collect();
    let list = |v: &[usize]| {
        if v.is_empty() {
            "none".to_string()
        } else {
            v.iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    match wanted {
        Some(d) if d >= traces.len() => anyhow::bail!(
            "--device {d}: the snapshot has traces for {} device(s), 0 to {} (devices with entries: {})",
            traces.len(),
            traces.len().saturating_sub(1),
            list(&with_entries)
        ),
        Some(d) if !with_entries.contains(&d) => anyhow::bail!(
            "--device {d}: its trace has no entries (devices with entries: {})",
            list(&with_entries)
        ),
        Some(d) => Ok((d, with_entries)),
        None => match with_entries.first() {
            Some(&d) => Ok((d, with_entries)),
            None => anyhow::bail!(
                "no device's trace has entries: was the snapshot taken with \
                 torch.cuda.memory._record_memory_history() on?"
            ),
        },
    }
}

/// Converts one device's trace of `snapshot` into trace events.
pub fn convert(
    snapshot: &PyValue,
    device: Option<usize>,
    progress: &mut dyn FnMut(u64, u64),
) -> anyhow::Result<(Vec<Out>, ImportSummary)> {
    if snapshot.as_seq().is_some() {
        anyhow::bail!(
            "the snapshot is a list of segments without a trace (an old format, or \
             recorded without torch.cuda.memory._record_memory_history())"
        );
    }
    if snapshot.as_dict().is_none() {
        anyhow::bail!("the snapshot is a {}, not a dict", snapshot.type_name());
    }
    let traces = match snapshot.get("device_traces") {
        Some(t) => t.as_seq().ok_or_else(|| {
            anyhow::anyhow!("\"device_traces\" is a {}, not a list", t.type_name())
        })?,
        None => anyhow::bail!(
            "the snapshot has no \"device_traces\" (recorded without \
             torch.cuda.memory._record_memory_history()?)"
        ),
    };
    let (d, with_entries) = pick_device(traces, device)?;
    let entries = traces[d]
        .as_seq()
        .ok_or_else(|| anyhow::anyhow!("device_traces[{d}] is not a list"))?;
    let mut s = ImportSummary {
        device: d,
        devices_with_entries: with_entries,
        entries: entries.len() as u64,
        ..ImportSummary::default()
    };
    let mut out = Vec::with_capacity(entries.len());
    // Address -> id of the buffer allocated there.
    let mut live: HashMap<u64, u64> = HashMap::new();
    // Addresses freed (free_requested) whose free_completed is still due.
    let mut awaiting: HashSet<u64> = HashSet::new();
    let mut streams: HashMap<i128, u32> = HashMap::new();
    let mut next_id = 1u64;
    let total = entries.len() as u64;
    for (i, e) in entries.iter().enumerate() {
        if i % 4096 == 0 {
            progress(i as u64, total);
        }
        let at = || format!("device_traces[{d}][{i}]");
        if e.as_dict().is_none() {
            anyhow::bail!("{}: a {}, not a dict", at(), e.type_name());
        }
        let action = e
            .get("action")
            .and_then(PyValue::as_str)
            .ok_or_else(|| anyhow::anyhow!("{}: no \"action\" string", at()))?;
        let t_raw = e.get("time_us").and_then(PyValue::as_int);
        if s.t0_us.is_none() {
            s.t0_us = t_raw.and_then(|t| i64::try_from(t).ok());
        }
        let is_free = matches!(action, "free_requested" | "free_completed");
        if action != "alloc" && !is_free {
            *s.skipped.entry(action.to_string()).or_default() += 1;
            continue;
        }
        let num = |key: &str| -> anyhow::Result<u64> {
            let v = e
                .get(key)
                .ok_or_else(|| anyhow::anyhow!("{}: {action} without \"{key}\"", at()))?;
            v.as_u64().ok_or_else(|| {
                anyhow::anyhow!(
                    "{}: {action} with \"{key}\" {v}, not an int from 0 to 2^64 - 1",
                    at()
                )
            })
        };
        let addr = num("addr")?;
        let t = match (t_raw, s.t0_us) {
            (Some(t), Some(t0)) => u64::try_from((t - i128::from(t0)).max(0)).ok(),
            _ => None,
        };
        match action {
            "alloc" => {
                let bytes = num("size")?;
                if bytes == 0 {
                    *s.skipped.entry("alloc of 0 bytes".into()).or_default() += 1;
                    continue;
                }
                let raw = e
                    .get("stream")
                    .map(|v| {
                        v.as_int().ok_or_else(|| {
                            anyhow::anyhow!("{}: alloc with \"stream\" {v}, not an int", at())
                        })
                    })
                    .transpose()?
                    .unwrap_or(0);
                let n = streams.len() as u32;
                let stream = *streams.entry(raw).or_insert_with(|| {
                    s.streams.push(i64::try_from(raw).unwrap_or(i64::MAX));
                    n
                });
                if let Some(old) = live.remove(&addr) {
                    out.push(Out::Free { id: old, t });
                    s.frees += 1;
                    s.implied_frees += 1;
                }
                awaiting.remove(&addr);
                let id = next_id;
                next_id += 1;
                live.insert(addr, id);
                out.push(Out::Alloc {
                    id,
                    bytes,
                    stream,
                    t,
                });
                s.allocs += 1;
            }
            "free_requested" => {
                awaiting.insert(addr);
                match live.remove(&addr) {
                    Some(id) => {
                        out.push(Out::Free { id, t });
                        s.frees += 1;
                    }
                    None => s.skipped_frees += 1,
                }
            }
            _ => {
                // free_completed: the end of a free already written, or
                // the only sign of one.
                if awaiting.remove(&addr) {
                    continue;
                }
                match live.remove(&addr) {
                    Some(id) => {
                        out.push(Out::Free { id, t });
                        s.frees += 1;
                        s.frees_from_completed += 1;
                    }
                    None => s.skipped_frees += 1,
                }
            }
        }
    }
    progress(total, total);
    s.events = out.len() as u64;
    s.live_at_end = live.len() as u64;
    Ok((out, s))
}

/// Writes the trace: a `meta` line with `source` and the summary, then the
/// events.
pub fn write_trace(
    w: &mut dyn Write,
    events: &[Out],
    s: &ImportSummary,
    source: &str,
) -> std::io::Result<()> {
    let meta = serde_json::json!({
        "ev": "meta",
        "format": "inflight-trace/1",
        "source": "inflight import-torch",
        "snapshot": source,
        "device": s.device,
        "entries": s.entries,
        "allocs": s.allocs,
        "frees": s.frees,
        "frees_from_completed": s.frees_from_completed,
        "implied_frees": s.implied_frees,
        "skipped_frees": s.skipped_frees,
        "skipped_entries": s.skipped,
        "live_at_end": s.live_at_end,
        "streams": s.streams,
        "t0_us": s.t0_us,
    });
    writeln!(w, "{meta}")?;
    for e in events {
        match *e {
            Out::Alloc {
                id,
                bytes,
                stream,
                t,
            } => match t {
                Some(t) => writeln!(
                    w,
                    r#"{{"ev":"alloc","id":{id},"bytes":{bytes},"stream":{stream},"t":{t}}}"#
                )?,
                None => writeln!(
                    w,
                    r#"{{"ev":"alloc","id":{id},"bytes":{bytes},"stream":{stream}}}"#
                )?,
            },
            Out::Free { id, t } => match t {
                Some(t) => writeln!(w, r#"{{"ev":"free","id":{id},"t":{t}}}"#)?,
                None => writeln!(w, r#"{{"ev":"free","id":{id}}}"#)?,
            },
        }
    }
    w.flush()
}

/// One line saying what was written and skipped.
fn summary_line(s: &ImportSummary, output: &Path) -> String {
    let others = if s.skipped.is_empty() {
        "0 other entries".to_string()
    } else {
        format!(
            "{} other entries ({})",
            s.skipped_entries(),
            s.skipped
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    format!(
        "inflight import-torch: wrote {} events ({} allocs, {} frees) of device {} to {}; \
         skipped {} frees of blocks allocated before recording and {}; {} stream{}",
        s.events,
        s.allocs,
        s.frees,
        s.device,
        output.display(),
        s.skipped_frees,
        others,
        s.streams.len(),
        if s.streams.len() == 1 { "" } else { "s" },
    )
}

pub fn command(a: ImportArgs) -> anyhow::Result<ExitCode> {
    let quiet = a.quiet || a.json;
    let mut parse: Option<Steps> = None;
    let snapshot =
        crate::snapshot::read_snapshot_with_progress(&a.snapshot, &mut |done, total| {
            parse
                .get_or_insert_with(|| Steps::new("reading", "bytes", total, quiet))
                .show(done)
        })?;
    if let Some(p) = parse {
        p.finish();
    }
    let mut steps: Option<Steps> = None;
    let (events, summary) = convert(&snapshot, a.device, &mut |done, total| {
        steps
            .get_or_insert_with(|| Steps::new("importing", "entries", total, quiet))
            .show(done)
    })
    .with_context(|| format!("{}", a.snapshot.display()))?;
    if let Some(s) = steps {
        s.finish();
    }
    drop(snapshot);
    if a.device.is_none() && !quiet {
        let others: Vec<String> = summary
            .devices_with_entries
            .iter()
            .filter(|&&d| d != summary.device)
            .map(|d| d.to_string())
            .collect();
        eprintln!(
            "inflight: importing device {}{}",
            summary.device,
            if others.is_empty() {
                String::new()
            } else {
                format!(
                    " (the first with entries; also: {}; pick one with --device)",
                    others.join(", ")
                )
            }
        );
    }
    if summary.streams.len() > crate::trace::MAX_STREAMS {
        eprintln!(
            "inflight: warning: {} streams, more than the {} replay supports",
            summary.streams.len(),
            crate::trace::MAX_STREAMS
        );
    }
    let source = a.snapshot.file_name().map_or_else(
        || a.snapshot.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let mut w = crate::input::create(&a.output)?;
    write_trace(&mut w, &events, &summary, &source)
        .with_context(|| format!("cannot write {}", a.output.display()))?;
    drop(w);
    if a.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        println!("{}", summary_line(&summary, &a.output));
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pickle;

    fn entry(action: &str, addr: u64, size: u64, stream: i128, t: u64) -> PyValue {
        PyValue::dict([
            ("action", PyValue::str(action)),
            ("addr", PyValue::int(addr)),
            ("size", PyValue::int(size)),
            ("stream", PyValue::int(stream)),
            ("time_us", PyValue::int(t)),
            (
                "frames",
                PyValue::list(vec![PyValue::dict([
                    ("filename", PyValue::str("train.py")),
                    ("line", PyValue::int(42)),
                    ("name", PyValue::str("forward")),
                ])]),
            ),
        ])
    }

    const S1: i128 = 0x5581_2c40_0a10; // raw stream pointers
    const S2: i128 = 0x5581_2c40_0b20;
    const T0: u64 = 1_796_406_423_085_148;

    /// Device 0 has two entries; device 2 the interesting trace.
    fn snapshot() -> PyValue {
        let a = 0x7f00_0000_0000u64;
        let dev2 = vec![
            // Freed before recording began: skipped.
            entry("free_requested", a + 0x9000, 512, 0, T0),
            entry("free_completed", a + 0x9000, 512, 0, T0 + 1),
            entry("segment_alloc", a, 2 << 20, S1, T0 + 2),
            entry("alloc", a, 512, S1, T0 + 3),
            entry("alloc", a + 512, 1024, S2, T0 + 4),
            entry("free_requested", a, 512, S1, T0 + 5),
            entry("free_completed", a, 512, S1, T0 + 6),
            // The address again: a new buffer.
            entry("alloc", a, 512, S1, T0 + 7),
            PyValue::dict([
                ("action", PyValue::str("oom")),
                ("device_free", PyValue::int(1u64 << 20)),
                ("size", PyValue::int(1u64 << 40)),
                ("stream", PyValue::int(S1)),
                ("time_us", PyValue::int(T0 + 8)),
            ]),
            PyValue::dict([
                ("action", PyValue::str("snapshot")),
                ("addr", PyValue::int(0)),
                ("size", PyValue::int(0)),
                ("stream", PyValue::int(0)),
                ("time_us", PyValue::int(T0 + 9)),
            ]),
            // A free_completed alone (free_requested not recorded).
            entry("free_completed", a + 512, 1024, S2, T0 + 10),
            entry("segment_free", a + (4 << 20), 2 << 20, S1, T0 + 11),
            entry("alloc", a + 4096, 4096, S1, T0 + 12),
        ];
        PyValue::dict([
            ("segments", PyValue::list(vec![])),
            (
                "device_traces",
                PyValue::list(vec![
                    PyValue::list(vec![
                        entry("alloc", 0x1000, 64, 0, 5),
                        entry("free_requested", 0x1000, 64, 0, 6),
                    ]),
                    PyValue::list(vec![]),
                    PyValue::list(dev2),
                ]),
            ),
        ])
    }

    fn trace_of(events: &[Out], s: &ImportSummary) -> String {
        let mut buf = Vec::new();
        write_trace(&mut buf, events, s, "test.pickle").unwrap();
        String::from_utf8(buf).unwrap()
    }

    #[test]
    fn device_2_through_a_pickle() {
        let bytes = pickle::to_vec(&snapshot());
        let v = pickle::read(&bytes).unwrap();
        let (events, s) = convert(&v, Some(2), &mut |_, _| {}).unwrap();
        assert_eq!(s.device, 2);
        assert_eq!(s.devices_with_entries, [0, 2]);
        assert_eq!(s.entries, 13);
        assert_eq!((s.allocs, s.frees), (4, 2));
        assert_eq!(s.frees_from_completed, 1);
        assert_eq!(s.skipped_frees, 1);
        assert_eq!(s.skipped.get("oom"), Some(&1));
        assert_eq!(s.skipped.get("snapshot"), Some(&1));
        assert_eq!(s.skipped.get("segment_alloc"), Some(&1));
        assert_eq!(s.skipped.get("segment_free"), Some(&1));
        assert_eq!(s.skipped_entries(), 4);
        assert_eq!(s.live_at_end, 2);
        assert_eq!(s.streams, [S1 as i64, S2 as i64]);
        assert_eq!(s.t0_us, Some(T0 as i64));
        assert_eq!(
            events,
            [
                Out::Alloc {
                    id: 1,
                    bytes: 512,
                    stream: 0,
                    t: Some(3)
                },
                Out::Alloc {
                    id: 2,
                    bytes: 1024,
                    stream: 1,
                    t: Some(4)
                },
                Out::Free { id: 1, t: Some(5) },
                Out::Alloc {
                    id: 3,
                    bytes: 512,
                    stream: 0,
                    t: Some(7)
                },
                Out::Free { id: 2, t: Some(10) },
                Out::Alloc {
                    id: 4,
                    bytes: 4096,
                    stream: 0,
                    t: Some(12)
                },
            ]
        );
        // The CLI's own parser takes it.
        let text = trace_of(&events, &s);
        let t = crate::trace::parse(text.as_bytes()).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(t.allocations, 4);
        assert_eq!(t.frees, 2);
        assert_eq!(t.streams, [0, 1]);
        assert_eq!(t.peak_live_bytes, 512 + 4096);
        let meta: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert_eq!(meta["ev"], "meta");
        assert_eq!(meta["device"], 2);
        assert_eq!(meta["skipped_frees"], 1);
        assert_eq!(meta["skipped_entries"]["oom"], 1);
        assert_eq!(meta["snapshot"], "test.pickle");
    }

    #[test]
    fn the_first_device_with_entries_is_the_default() {
        let (events, s) = convert(&snapshot(), None, &mut |_, _| {}).unwrap();
        assert_eq!(s.device, 0);
        assert_eq!(events.len(), 2);
        assert_eq!(s.t0_us, Some(5));
        crate::trace::parse(trace_of(&events, &s).as_bytes()).unwrap();
    }

    #[test]
    fn a_reused_address_without_a_free_gets_one() {
        let v = PyValue::dict([(
            "device_traces",
            PyValue::list(vec![PyValue::list(vec![
                entry("alloc", 0x2000, 512, 0, 1),
                entry("alloc", 0x2000, 512, 0, 2),
                entry("alloc", 0x3000, 0, 0, 3),
            ])]),
        )]);
        let (events, s) = convert(&v, None, &mut |_, _| {}).unwrap();
        assert_eq!(s.implied_frees, 1);
        assert_eq!(s.skipped.get("alloc of 0 bytes"), Some(&1));
        assert_eq!(events[1], Out::Free { id: 1, t: Some(1) });
        crate::trace::parse(trace_of(&events, &s).as_bytes()).unwrap();
    }

    #[test]
    fn bad_snapshots_say_why() {
        let e = convert(&snapshot(), Some(1), &mut |_, _| {}).unwrap_err();
        assert!(e.to_string().contains("no entries"), "{e}");
        let e = convert(&snapshot(), Some(7), &mut |_, _| {}).unwrap_err();
        assert!(e.to_string().contains("3 device(s)"), "{e}");
        let e = convert(&PyValue::list(vec![]), None, &mut |_, _| {}).unwrap_err();
        assert!(e.to_string().contains("without a trace"), "{e}");
        let e = convert(
            &PyValue::dict([("segments", PyValue::list(vec![]))]),
            None,
            &mut |_, _| {},
        )
        .unwrap_err();
        assert!(e.to_string().contains("no \"device_traces\""), "{e}");
        let v = PyValue::dict([(
            "device_traces",
            PyValue::list(vec![PyValue::list(vec![PyValue::dict([
                ("action", PyValue::str("alloc")),
                ("addr", PyValue::int(-5)),
            ])])]),
        )]);
        let e = convert(&v, None, &mut |_, _| {}).unwrap_err();
        assert!(e.to_string().contains("device_traces[0][0]"), "{e}");
        let v = PyValue::dict([("device_traces", PyValue::list(vec![PyValue::list(vec![])]))]);
        let e = convert(&v, None, &mut |_, _| {}).unwrap_err();
        assert!(e.to_string().contains("_record_memory_history"), "{e}");
    }
}
