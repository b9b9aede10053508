"""The paper's projection around any optimizer: ``torch_adamp.Projected(torch.optim.RAdam(...))``.

Trains the small conv-BatchNorm network of ``torch-adamp compare`` on the Fashion-MNIST subset shipped
with the reproduce package (``reproduce/`` of the repository; ``bash scripts/setup.sh`` installs it), with
RAdam and with ``Projected(RAdam)``, and prints the norm of the conv weights (scale-invariant: BatchNorm
follows each one) and the view the projection used. A few seconds on a CPU:
``python examples/projected_optimizer.py``.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import torch_adamp
from torch_adamp_reproduce import compare, fashion_mnist


def train(wrap: bool, steps: int, data: fashion_mnist.Dataset) -> float:
    torch.manual_seed(0)
    net = compare.make_model(width=8)
    # any torch.optim.Optimizer; a decoupled weight decay is read from its groups and kept (x wd_ratio)
    inner = torch.optim.RAdam(net.parameters(), lr=1e-2)
    opt: torch.optim.Optimizer = torch_adamp.Projected(inner, track_stats=True) if wrap else inner
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)  # schedulers see the same param_groups
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        idx = torch.randint(0, len(data.train_y), (64,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(net(data.train_x[idx]), data.train_y[idx]).backward()
        opt.step()
        sched.step()
    if wrap:
        s = opt.stats()  # type: ignore[attr-defined]
        print(f"  Projected(RAdam): view of the first conv weight {s['group0.param0/view']:.0f} (1 = channel)")
    names = compare.scale_invariant_names(net)
    params = dict(net.named_parameters())
    return float(torch.stack([params[n].detach().norm() for n in names]).norm())


def main(argv: list[str] | None = None) -> tuple[float, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    data = fashion_mnist.load(train_size=2000, test_size=10, image_size=14)
    plain = train(False, args.steps, data)
    projected = train(True, args.steps, data)
    print(f"conv-weight norm after {args.steps} steps: RAdam {plain:.3f}, Projected(RAdam) {projected:.3f}")
    return plain, projected


if __name__ == "__main__":
    main()
