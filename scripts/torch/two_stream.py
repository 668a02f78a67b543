"""The cross-stream hazard, in PyTorch: each round produces a tensor on the
current (main) stream, reads it on a side stream after a long delay
(side.wait_stream(main), then torch.cuda._sleep, then a copy), declares
that use with record_stream(side), and frees it on main at once; main then
allocates tensors of the same size and writes them immediately. An
allocator that hands the freed block to main's next tensor while the side
stream has yet to read it (reuse in flight) corrupts what the side stream
copies. Every copy is checked, element by element, against a CPU reference.

Expected: no corrupted element under PyTorch's allocators and inflight's
deferred policy; corruption under inflight's immediate policy (the defect).

    python scripts/torch/two_stream.py --allocator inflight --policy immediate
"""

import common


def cycles_per_ms(torch) -> float:
    """torch.cuda._sleep's cycles a millisecond, measured with events."""
    torch.cuda._sleep(1_000_000)  # warm-up
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(50_000_000)
    end.record()
    end.synchronize()
    return 50_000_000 / max(start.elapsed_time(end), 1e-3)


def main():
    p = common.parser(__doc__, steps=12)
    p.add_argument("--elements", type=int, default=4 << 20, help="float32 elements a tensor")
    p.add_argument("--sleep-ms", type=float, default=20.0, help="side stream's delay a round")
    p.add_argument("--churn", type=int, default=4, help="tensors main writes after each free")
    args = p.parse_args()
    torch = common.setup(args)
    n = args.elements
    cycles = int(args.sleep_ms * cycles_per_ms(torch))
    main_stream = torch.cuda.current_stream()
    side = torch.cuda.Stream()
    base = torch.arange(n, dtype=torch.float32) % 1000
    outs, churn = [], []
    torch.empty(1, device="cuda")  # the allocator's first use (device opening) before the timing

    def rounds():
        for i in range(args.steps):
            src = (torch.arange(n, device="cuda", dtype=torch.float32) % 1000) + i * 1000
            side.wait_stream(main_stream)
            with torch.cuda.stream(side):
                torch.cuda._sleep(cycles)
                outs.append(src * 1.0)
            src.record_stream(side)
            del src
            churn.clear()
            for _ in range(args.churn):
                junk = torch.empty(n, device="cuda", dtype=torch.float32)
                junk.fill_(-1.0)
                churn.append(junk)

    _, ms = common.sync_time(torch, rounds)
    bad = []
    for i, out in enumerate(outs):
        expect = base + i * 1000
        bad.append(int((out.cpu() != expect).sum().item()))
    corrupted = sum(bad)
    print(f"rounds {args.steps}, corrupted elements per round {bad}, {ms:.1f} ms", flush=True)
    r = common.header(torch, args, "two_stream")
    r.update(
        elements=n,
        sleep_ms=args.sleep_ms,
        churn=args.churn,
        corrupted_per_round=bad,
        corrupted_elements=corrupted,
        corrupted_rounds=sum(1 for b in bad if b),
        ms=ms,
        memory=common.memory(torch, args),
    )
    common.emit(r)


if __name__ == "__main__":
    main()
