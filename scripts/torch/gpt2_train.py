"""GPT-2 small training (transformers GPT2LMHeadModel from GPT2Config(),
random weights and tokens): batch 8 x 512, AdamW. Per step: the loss, the
step time (device-synchronised); then peak reserved and allocated bytes.

    python scripts/torch/gpt2_train.py --allocator inflight --steps 20
"""

import common


def main():
    p = common.parser(__doc__, steps=20)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--attn", default="eager", help="transformers attn_implementation")
    args = p.parse_args()
    torch = common.setup(args)
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(attn_implementation=args.attn)
    model = GPT2LMHeadModel(config).cuda().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(args.seed)
    data = torch.randint(0, config.vocab_size, (args.steps, args.batch, args.seq), generator=gen)
    losses, times = [], []

    def step(x):
        out = model(input_ids=x, labels=x)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.detach()

    for i in range(args.steps):
        x = data[i].cuda()
        loss, ms = common.sync_time(torch, lambda: step(x))
        losses.append(loss.item())
        times.append(ms)
        print(f"step {i:3d} loss {losses[-1]:.6f} ({losses[-1].hex()}) {ms:8.2f} ms", flush=True)
    r = common.header(torch, args, "gpt2")
    r.update(
        batch=args.batch,
        seq=args.seq,
        attn=args.attn,
        losses=losses,
        losses_hex=common.hexes(losses),
        step_ms=times,
        median_ms=common.median_after(times, args.warmup),
        warmup=args.warmup,
        memory=common.memory(torch, args),
    )
    common.emit(r)


if __name__ == "__main__":
    main()
