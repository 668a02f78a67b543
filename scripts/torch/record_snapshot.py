"""Records a real PyTorch memory snapshot on the GPU, with PyTorch's own
allocator: a few training steps of torchvision's ResNet-18 at varying batch
sizes, under torch.cuda.memory._record_memory_history. The pickle it writes
is what `inflight import-torch` and `inflight snapshot-check` read
(scripts/device-h200.sh runs them on it).

    python scripts/torch/record_snapshot.py OUT.pickle [--steps N]
"""

import argparse

import torch
import torchvision


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--stacks", default="all", choices=["all", "python"],
                    help="the frames kept with each entry (python: smaller files)")
    a = ap.parse_args()
    torch.manual_seed(0)
    torch.cuda.memory._record_memory_history(max_entries=200_000, stacks=a.stacks)
    model = torchvision.models.resnet18(num_classes=100).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    side = torch.cuda.Stream()
    for step in range(a.steps):
        batch = (16, 48, 32)[step % 3]
        x = torch.randn(batch, 3, 160, 160, device="cuda")
        y = torch.randint(0, 100, (batch,), device="cuda")
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        # A tensor used on a second stream, freed with record_stream.
        with torch.cuda.stream(side):
            z = x * 2
        x.record_stream(side)
        del x, z
    torch.cuda.synchronize()
    torch.cuda.memory._dump_snapshot(a.out)
    torch.cuda.memory._record_memory_history(enabled=None)
    print(f"wrote {a.out}: peak reserved {torch.cuda.max_memory_reserved()} bytes, "
          f"peak allocated {torch.cuda.max_memory_allocated()} bytes")


if __name__ == "__main__":
    main()
