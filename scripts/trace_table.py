#!/usr/bin/env python3
"""The memory table of docs/BENCHMARKS.md: every shared trace replayed under
each policy, beside PyTorch's own figures for the same program, then once
more under a memory limit of 1.15 x the trace's peak requested bytes.

    python3 scripts/trace_table.py [--inflight BIN] [--backend sim|cuda]
        [--traces DIR] [--json OUT.json]

BIN defaults to target/release/inflight, DIR to ../shared/traces (with its
pytorch_stats.json). Prints one Markdown table per trace and a verdict per
target; exits 1 if a target is missed.
"""
import argparse
import json
import os
import subprocess
import sys

LIMIT_FACTOR = 1.15


def replay(binary, backend, trace, extra=(), may_fail=False):
    """Runs `inflight replay --json` and returns one dict per policy; with
    `may_fail`, None when the replay stops (out of memory)."""
    cmd = [binary, "replay", trace, "--backend", backend, "--json", *extra]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode not in (0, 1):
        if may_fail:
            print(f"({os.path.basename(trace)}: {out.stderr.strip()})")
            return None
        sys.exit(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr}")
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    if not rows:
        sys.exit(f"{' '.join(cmd)} printed nothing:\n{out.stderr}")
    return {r["policy"]: r for r in rows}


def mib(b):
    return f"{b / (1 << 20):,.1f} MiB"


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inflight", default=os.path.join(root, "target/release/inflight"))
    ap.add_argument("--backend", default="sim")
    ap.add_argument("--traces", default=os.path.join(root, "..", "shared", "traces"))
    ap.add_argument("--json", help="write every figure here too")
    a = ap.parse_args()
    stats = json.load(open(os.path.join(a.traces, "pytorch_stats.json")))
    ok = True
    everything = []
    for entry in stats:
        name = entry["trace"]
        path = os.path.join(a.traces, name + ".jsonl.gz")
        if not os.path.exists(path):
            path = os.path.join(a.traces, name + ".jsonl")
        runs = replay(a.inflight, a.backend, path)
        requested = runs["deferred"]["peak_requested_bytes"]
        limit = int(requested * LIMIT_FACTOR)
        limited = replay(a.inflight, a.backend, path,
                         ["--policy", "deferred", "--memory-limit", str(limit)], may_fail=True)
        limited = (limited or {}).get("deferred")
        default, expandable = entry["pytorch_default"], entry["pytorch_expandable_segments"]
        print(f"\n{name} ({entry['events']:,} events, {a.backend}; "
              f"peak requested {mib(requested)})\n")
        print("| allocator | peak reserved | reserved / peak allocated | device allocations or page maps |")
        print("| --- | ---: | ---: | ---: |")
        for policy in ("deferred", "retained", "immediate"):
            r = runs[policy]
            print(f"| inflight {policy} | {mib(r['peak_reserved_bytes'])} | "
                  f"{r['peak_reserved_bytes'] / r['peak_live_bytes']:.4f} | "
                  f"{r['device_allocations']:,} |")
        for label, p in (("PyTorch default", default), ("PyTorch expandable segments", expandable)):
            print(f"| {label} | {mib(p['peak_reserved_bytes'])} | "
                  f"{p['peak_reserved_bytes'] / p['peak_allocated_bytes']:.4f} | "
                  f"{p['device_allocations']:,} |")
        d, r, i = runs["deferred"], runs["retained"], runs["immediate"]
        checks = {
            "deferred's peak reserved <= PyTorch default's":
                d["peak_reserved_bytes"] <= default["peak_reserved_bytes"],
            "deferred's peak reserved <= PyTorch expandable segments'":
                d["peak_reserved_bytes"] <= expandable["peak_reserved_bytes"],
            "device allocations or maps <= PyTorch expandable's":
                d["device_allocations"] <= expandable["device_allocations"],
            "deferred <= 1.01 x immediate":
                d["peak_reserved_bytes"] <= 1.01 * i["peak_reserved_bytes"],
            "deferred <= retained": d["peak_reserved_bytes"] <= r["peak_reserved_bytes"],
            f"fits under {LIMIT_FACTOR} x peak requested ({mib(limit)})":
                limited is not None and limited["oom_errors"] == 0 and limited["violations"] == 0,
            "0 violations, balanced": all(x["violations"] == 0 and x["stats_balanced"]
                                          for x in runs.values()),
        }
        print()
        for what, good in checks.items():
            print(f"- {'met' if good else 'MISSED'}: {what}")
            ok &= good
        everything.append({"trace": name, "backend": a.backend, "runs": runs,
                           "limited": limited, "limit_bytes": limit,
                           "checks": checks})
    if a.json:
        with open(a.json, "w") as f:
            json.dump(everything, f, indent=1)
    print("\nall targets met" if ok else "\nsome targets missed")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
