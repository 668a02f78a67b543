"""What the GPU programs of scripts/torch share: the command line, the
allocator's setup (before anything touches CUDA), determinism, timing, the
memory figures, and the one JSON line each program prints last.

Every program runs on its own:

    python scripts/torch/gpt2_train.py --allocator default|expandable|inflight \
        --policy deferred|immediate --steps N

- ``default``: PyTorch's caching allocator.
- ``expandable``: the same with ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True``.
- ``inflight``: ``inflight_torch.enable(policy=...)`` (the library from
  ``INFLIGHT_TORCH_LIB``, or the repository's ``target/release``).

Each sets ``CUBLAS_WORKSPACE_CONFIG=:4096:8``, ``torch.use_deterministic_algorithms(True)``
and a fixed seed, so that the allocators' runs can be compared bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# The inflight_torch package, when it is not installed.
sys.path.insert(0, str(REPO / "python"))


def parser(description: str, steps: int) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--allocator", choices=["default", "expandable", "inflight"], default="default")
    p.add_argument("--policy", choices=["deferred", "retained", "immediate"], default="deferred")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=3, help="steps left out of the time median")
    return p


def setup(args, warn_only: bool = False):
    """Sets the environment and the allocator up, then imports torch;
    returns it. Must run before anything touches CUDA."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if args.allocator == "expandable":
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    else:
        os.environ.pop("PYTORCH_CUDA_ALLOC_CONF", None)
    import torch

    if args.allocator == "inflight":
        import inflight_torch

        inflight_torch.enable(policy=args.policy)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True, warn_only=warn_only)
    torch.backends.cudnn.benchmark = False
    return torch


def sync_time(torch, fn):
    """Runs ``fn`` between two device synchronisations; returns (result, ms)."""
    torch.cuda.synchronize()
    t = time.perf_counter()
    r = fn()
    torch.cuda.synchronize()
    return r, (time.perf_counter() - t) * 1e3


def median_after(times, warmup: int):
    rest = times[warmup:] if len(times) > warmup else times
    return statistics.median(rest) if rest else None


def memory(torch, args) -> dict:
    """Peak reserved and allocated bytes: inflight's own statistics under
    inflight (PyTorch's raise with a pluggable allocator), PyTorch's
    otherwise."""
    if args.allocator == "inflight":
        import inflight_torch

        s = inflight_torch.memory_stats()
        return {
            "peak_reserved": s["reserved_bytes.all.peak"],
            "peak_allocated": s["allocated_bytes.all.peak"],
            "source": "inflight_torch.memory_stats",
            "stats": s,
        }
    s = torch.cuda.memory_stats()
    keep = (
        "num_device_alloc",
        "num_device_free",
        "num_alloc_retries",
        "num_ooms",
        "allocation.all.allocated",
        "segment.all.peak",
    )
    return {
        "peak_reserved": torch.cuda.max_memory_reserved(),
        "peak_allocated": torch.cuda.max_memory_allocated(),
        "source": "torch.cuda.max_memory_reserved",
        "stats": {k: s.get(k) for k in keep},
    }


def header(torch, args, workload: str) -> dict:
    return {
        "workload": workload,
        "allocator": args.allocator,
        "policy": args.policy if args.allocator == "inflight" else None,
        "steps": args.steps,
        "seed": args.seed,
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0),
    }


def emit(result: dict) -> None:
    """Prints the result as the program's last line: one JSON object."""
    sys.stdout.flush()
    print(json.dumps(result, separators=(",", ":")), flush=True)


def hexes(values):
    return [float(v).hex() for v in values]
