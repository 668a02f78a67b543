"""Per-call cost of PyTorch's allocator, or of a plug-in behind it, from
Python: a loop of torch.empty + del on the default stream, at a few sizes,
and a generation-like pattern (a window of live tensors of varied sizes,
each used by a tiny kernel). Prints one JSON line.

    python scripts/torch/alloc_loop.py --allocator default|expandable|inflight [--n N]
"""

import json
import time

import common


def main():
    p = common.parser(__doc__.splitlines()[0], steps=1)
    p.add_argument("--n", type=int, default=200_000)
    args = p.parse_args()
    torch = common.setup(args)
    out = {"allocator": args.allocator}
    torch.empty(1, device="cuda")
    for size in (256, 65536, 4 << 20):
        for _ in range(1000):
            x = torch.empty(size, dtype=torch.uint8, device="cuda")
            del x
        t = time.perf_counter()
        for _ in range(args.n):
            x = torch.empty(size, dtype=torch.uint8, device="cuda")
            del x
        out[f"empty_del_{size}_ns"] = (time.perf_counter() - t) / args.n * 1e9
    sizes = [((i * 7919) % 97 + 1) * 4096 for i in range(1024)]
    live = [None] * 32
    torch.cuda.synchronize()
    t = time.perf_counter()
    for i in range(args.n):
        x = torch.empty(sizes[i % 1024], dtype=torch.uint8, device="cuda")
        x.fill_(1)
        live[i % 32] = x
    torch.cuda.synchronize()
    out["window_fill_ns"] = (time.perf_counter() - t) / args.n * 1e9
    print(json.dumps(out))


if __name__ == "__main__":
    main()
