"""Runs every GPU program of scripts/torch under each allocator, each in a
process of its own, then compares them; scripts/device-torch.sh calls it.

    python scripts/torch/run_all.py OUT_DIR [--quick] [--only NAME,...] [--allocators LABEL,...]
        [--budget SECONDS] [--no-memcheck]

Writes, in OUT_DIR (at most a few files: the device tool brings back 8):

- ``torch.log``: every program's output, each under a ``== name`` header;
- ``figures.json``: every program's JSON result, the comparisons, the
  memcheck summary and the verdicts;
- ``summary.txt``: the comparisons as text (also printed).

Comparisons: each inflight run's losses (GPT-2, ResNet-50) and generated
tokens (Llama) against PyTorch's default allocator's, bit for bit (where a
value differs, by how much); step-time medians after warm-up; peak reserved
bytes, inflight's from its own statistics beside
``torch.cuda.max_memory_reserved`` for PyTorch's; the two-stream hazard's
corrupted elements; compute-sanitizer memcheck's error count on a short
GPT-2 run under inflight.

Exit code: 0 when every verdict holds, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PY = sys.executable

BASELINE = ("default", None)
# The GPT-2 run under compute-sanitizer memcheck: short, smaller batches
# (memcheck slows every kernel; 2 steps of 2 x 128 took 19 s on the H200).
MEMCHECK_ARGS = ["--steps", "3", "--batch", "4", "--seq", "256", "--warmup", "0"]
ALLOCATORS = [("default", None), ("expandable", None), ("inflight", "deferred")]


def plan(quick: bool):
    steps = "4" if quick else "20"
    return [
        # name, script, extra args, allocators, timeout (s)
        (
            "two_stream",
            "two_stream.py",
            ["--steps", "6" if quick else "12"],
            ALLOCATORS + [("inflight", "immediate")],
            120,
        ),
        ("gpt2", "gpt2_train.py", ["--steps", steps], ALLOCATORS, 240),
        ("resnet50", "resnet_train.py", ["--steps", steps], ALLOCATORS, 240),
        ("llama", "llama_generate.py", ["--steps", "2"] + (["--new", "32"] if quick else []), ALLOCATORS, 240),
    ]


def label(alloc, policy):
    return alloc if policy is None else f"{alloc}-{policy}"


class Runner:
    def __init__(self, out: Path, budget: float):
        self.out = out
        self.log = open(out / "torch.log", "a", buffering=1)
        self.deadline = time.monotonic() + budget
        self.results = {}
        self.runs = []

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, name, cmd, timeout, env=None):
        """Runs `cmd`; logs its output; returns (rc, seconds, last JSON line or None)."""
        limit = min(timeout, self.left())
        self.log.write(f"\n== {name}: {' '.join(cmd)}\n")
        if limit < 15:
            self.log.write(f"== {name}: skipped, the time budget is spent\n")
            self.runs.append({"run": name, "rc": None, "skipped": True})
            return None, 0.0, None, ""
        t = time.monotonic()
        try:
            p = subprocess.run(
                cmd,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=limit,
                env={**os.environ, **(env or {})},
            )
            rc, text = p.returncode, p.stdout
        except subprocess.TimeoutExpired as e:
            rc = 124
            text = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            text += f"\n(timed out after {limit:.0f} s)\n"
        secs = time.monotonic() - t
        self.log.write(text)
        self.log.write(f"== {name}: exit {rc} in {secs:.1f} s\n")
        result = None
        for line in reversed(text.splitlines()):
            line = line.strip()
            if line.startswith("{") and line.endswith("}"):
                try:
                    result = json.loads(line)
                    break
                except ValueError:
                    continue
        self.runs.append({"run": name, "rc": rc, "seconds": round(secs, 1)})
        print(f"== {name}: exit {rc} in {secs:.1f} s", flush=True)
        return rc, secs, result, text


def compare_values(base, other, key_hex, key_val):
    """Bit-for-bit comparison of two runs' per-step values."""
    if base is None or other is None:
        return {"identical": None, "why": "a run is missing"}
    bh, oh = base.get(key_hex, []), other.get(key_hex, [])
    bv, ov = base.get(key_val, []), other.get(key_val, [])
    n = min(len(bh), len(oh))
    diffs = []
    for i in range(n):
        if bh[i] != oh[i]:
            d = abs(ov[i] - bv[i])
            diffs.append(
                {
                    "step": i,
                    "default": bv[i],
                    "other": ov[i],
                    "abs_diff": d,
                    "rel_diff": d / abs(bv[i]) if bv[i] else None,
                }
            )
    return {
        "identical": not diffs and len(bh) == len(oh),
        "steps_compared": n,
        "steps_differing": len(diffs),
        "max_abs_diff": max((d["abs_diff"] for d in diffs), default=0.0),
        "differences": diffs,
    }


def compare_tokens(base, other):
    if base is None or other is None:
        return {"identical": None, "why": "a run is missing"}
    out = []
    for r, (bt, ot) in enumerate(zip(base["tokens"], other["tokens"])):
        flat_b = [t for row in bt for t in row]
        flat_o = [t for row in ot for t in row]
        differing = sum(1 for a, b in zip(flat_b, flat_o) if a != b)
        first = next((i for i, (a, b) in enumerate(zip(flat_b, flat_o)) if a != b), None)
        out.append({"request": r, "tokens": len(flat_b), "differing": differing, "first_differing": first})
    return {"identical": all(o["differing"] == 0 for o in out), "requests": out}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--quick", action="store_true", help="fewer steps: a smoke test")
    ap.add_argument("--only", default="", help="comma-separated: two_stream,gpt2,resnet50,llama,memcheck")
    ap.add_argument("--budget", type=float, default=450.0, help="seconds for everything")
    ap.add_argument("--no-memcheck", action="store_true")
    ap.add_argument("--allocators", default="", help="comma-separated labels to keep, e.g. default,inflight-deferred")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    only = set(filter(None, args.only.split(",")))
    keep = set(filter(None, args.allocators.split(",")))
    R = Runner(out, args.budget)
    env_lines = []
    for cmd in (["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                [PY, "-c", "import torch, transformers, torchvision; print('torch', torch.__version__, 'transformers', transformers.__version__, 'torchvision', torchvision.__version__)"]):
        try:
            env_lines.append(subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout.strip())
        except Exception as e:  # noqa: BLE001
            env_lines.append(f"{cmd[0]}: {e}")
    R.log.write("== environment\n" + "\n".join(env_lines) + f"\nINFLIGHT_TORCH_LIB={os.environ.get('INFLIGHT_TORCH_LIB')}\n")

    figures = {"environment": env_lines, "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
               "quick": args.quick, "workloads": {}}
    for name, script, extra, allocs, timeout in plan(args.quick):
        if only and name not in only:
            continue
        w = figures["workloads"].setdefault(name, {"runs": {}})
        for alloc, policy in allocs:
            if keep and label(alloc, policy) not in keep:
                continue
            cmd = [PY, str(HERE / script), "--allocator", alloc] + (["--policy", policy] if policy else []) + extra
            rc, secs, result, _ = R.run(f"{name}/{label(alloc, policy)}", cmd, timeout)
            w["runs"][label(alloc, policy)] = {"rc": rc, "seconds": round(secs, 1), "result": result}

    if not args.no_memcheck and (not only or "memcheck" in only):
        cmd = ["compute-sanitizer", "--tool", "memcheck", "--print-limit", "20", PY,
               str(HERE / "gpt2_train.py"), "--allocator", "inflight"] + MEMCHECK_ARGS
        rc, secs, result, text = R.run("memcheck/gpt2-inflight-deferred", cmd, 300)
        m = re.search(r"ERROR SUMMARY: (\d+) error", text or "")
        figures["memcheck"] = {"rc": rc, "seconds": round(secs, 1), "errors": int(m.group(1)) if m else None,
                               "losses": result.get("losses") if result else None}

    lines, verdicts = summarise(figures)
    figures["verdicts"] = verdicts
    figures["runs"] = R.runs
    (out / "figures.json").write_text(json.dumps(figures, indent=1))
    text = "\n".join(lines) + "\n"
    (out / "summary.txt").write_text(text)
    R.log.write("\n== summary\n" + text)
    print(text)
    sys.exit(0 if verdicts and all(v["ok"] for v in verdicts) else 1)


def fmt_bytes(n):
    return "-" if n is None else f"{n / 2**20:9.1f} MiB"


def fmt_ms(x):
    return "-" if x is None else f"{x:8.2f} ms"


def summarise(figures):
    lines, verdicts = [], []

    def verdict(what, ok, detail):
        verdicts.append({"what": what, "ok": bool(ok), "detail": detail})
        lines.append(f"{'OK  ' if ok else 'FAIL'} {what}: {detail}")

    lines.append(f"inflight-torch GPU run, {figures['date']}: {'; '.join(figures['environment'])}")
    for name, w in figures["workloads"].items():
        runs = w["runs"]
        base = (runs.get("default") or {}).get("result")
        lines.append("")
        lines.append(f"-- {name}")
        if name in ("gpt2", "resnet50", "llama"):
            lines.append(f"   {'allocator':<20} {'time median':>12} {'peak reserved':>14} {'peak allocated':>15}  source of peaks")
        for lab, run in runs.items():
            r = run.get("result")
            if r is None:
                lines.append(f"   {lab:<20} no result (exit {run.get('rc')})")
                if lab == "inflight-immediate" and run.get("rc") not in (None, 0, 124):
                    verdict(f"{name}/{lab} shows the defect", True, f"the program failed (exit {run.get('rc')})")
                else:
                    verdict(f"{name}/{lab} ran", False, f"exit {run.get('rc')}")
                continue
            mem = r.get("memory", {})
            if name in ("gpt2", "resnet50"):
                lines.append(f"   {lab:<20} {fmt_ms(r.get('median_ms')):>12} {fmt_bytes(mem.get('peak_reserved')):>14} "
                             f"{fmt_bytes(mem.get('peak_allocated')):>15}  {mem.get('source')}")
            elif name == "llama":
                lines.append(f"   {lab:<20} cold {fmt_ms(r.get('cold_ms'))} warm {fmt_ms(r.get('warm_ms'))} "
                             f"{fmt_bytes(mem.get('peak_reserved')):>14} {fmt_bytes(mem.get('peak_allocated')):>15}  {mem.get('source')}")
            elif name == "two_stream":
                lines.append(f"   {lab:<20} corrupted elements {r['corrupted_elements']:>9} in {r['corrupted_rounds']}/{r['steps']} rounds, "
                             f"{r['ms']:.1f} ms, peak reserved {fmt_bytes(mem.get('peak_reserved'))}")
        # Bit-for-bit comparisons against the default allocator.
        for lab, run in runs.items():
            if lab == "default" or name == "two_stream":
                continue
            other = run.get("result")
            if name in ("gpt2", "resnet50"):
                c = compare_values(base, other, "losses_hex", "losses")
                run["compare"] = c
                if c["identical"]:
                    detail = f"losses identical to default's, bit for bit, over {c['steps_compared']} steps"
                elif c["identical"] is None:
                    detail = c["why"]
                else:
                    worst = max(c["differences"], key=lambda d: d["abs_diff"])
                    detail = (f"{c['steps_differing']} of {c['steps_compared']} losses differ from default's; largest by "
                              f"{worst['abs_diff']:.3e} at step {worst['step']} ({worst['default']!r} vs {worst['other']!r})")
                    for d in c["differences"]:
                        lines.append(f"     step {d['step']:3d}: default {d['default']!r} {lab} {d['other']!r} diff {d['abs_diff']:.3e}")
                verdict(f"{name}/{lab} losses", c["identical"], detail)
            elif name == "llama":
                c = compare_tokens(base, other)
                run["compare"] = c
                if c["identical"]:
                    detail = "generated tokens identical to default's"
                elif c["identical"] is None:
                    detail = c["why"]
                else:
                    detail = "; ".join(f"request {q['request']}: {q['differing']}/{q['tokens']} tokens differ (first at {q['first_differing']})"
                                       for q in c["requests"])
                verdict(f"{name}/{lab} tokens", c["identical"], detail)
        if name == "two_stream":
            for lab, run in runs.items():
                r = run.get("result")
                if r is None:
                    continue
                bad = r["corrupted_elements"]
                if lab == "inflight-immediate":
                    verdict(f"{name}/{lab} shows the defect", bad > 0, f"{bad} corrupted elements (expected: some)")
                else:
                    verdict(f"{name}/{lab} intact", bad == 0, f"{bad} corrupted elements (expected: none)")
    if "memcheck" in figures:
        m = figures["memcheck"]
        lines.append("")
        lines.append(f"-- compute-sanitizer memcheck, GPT-2 ({' '.join(MEMCHECK_ARGS)}) under inflight deferred: "
                     f"{m['errors']} errors, exit {m['rc']}, {m['seconds']} s, losses {m['losses']}")
        verdict("memcheck", m["errors"] == 0 and m["rc"] == 0, f"{m['errors']} errors, exit {m['rc']}")
    return lines, verdicts


if __name__ == "__main__":
    main()
