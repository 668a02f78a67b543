"""ResNet-50 training (torchvision resnet50(), random weights): batch 32 of
224x224 random images, SGD with momentum. Per step: the loss and the step
time (device-synchronised); then peak reserved and allocated bytes.

torchvision's adaptive average pool has no backward PyTorch calls
deterministic, so determinism is asked with warn_only (for a 7x7 to 1x1
pool its kernel does not use atomics: the runs still compare bit for bit).

    python scripts/torch/resnet_train.py --allocator inflight --steps 20
"""

import common


def main():
    p = common.parser(__doc__, steps=20)
    p.add_argument("--batch", type=int, default=32)
    args = p.parse_args()
    torch = common.setup(args, warn_only=True)
    import warnings

    import torch.nn.functional as F
    from torchvision.models import resnet50

    warnings.filterwarnings("ignore", message=".*does not have a deterministic implementation.*")
    model = resnet50().cuda().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(args.seed)
    losses, times = [], []

    def step(x, y):
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    for i in range(args.steps):
        x = torch.randn(args.batch, 3, 224, 224, generator=gen).cuda()
        y = torch.randint(0, 1000, (args.batch,), generator=gen).cuda()
        loss, ms = common.sync_time(torch, lambda: step(x, y))
        losses.append(loss.item())
        times.append(ms)
        print(f"step {i:3d} loss {losses[-1]:.6f} ({losses[-1].hex()}) {ms:8.2f} ms", flush=True)
    r = common.header(torch, args, "resnet50")
    r.update(
        batch=args.batch,
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
