"""A plain PyTorch training loop with AdamP (or SGDP), an LR schedule and the optimizer's diagnostics.

    python examples/plain_loop_scheduler.py                    # 300 steps, about 6 s of CPU time (1 thread)
    python examples/plain_loop_scheduler.py --optimizer sgdp

What it shows:

* ``param_groups(model, weight_decay, example_inputs=...)``: no weight decay on biases
  and norm scales, and for each weight whether it is scale-invariant, checked
  numerically on the model itself (the conv weights, followed by BatchNorm, are;
  the classifier is not);
* a warmup + cosine schedule from ``torch.optim.lr_scheduler`` (any scheduler works);
* ``track_stats=True`` and ``opt.stats()``: which weights were projected, their
  norms and effective step sizes (``lr / ||w||^2`` and the angle ``w`` turned by).
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

from torch_adamp import SGDP, AdamP, param_groups


class SmallCNN(nn.Module):
    def __init__(self, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


def make_data(n: int, size: int, num_classes: int = 10, seed: int = 0, split: int = 0) -> tuple[Tensor, Tensor]:
    """Noisy images around one random template per class (``seed``); ``split`` draws other samples."""
    templates = torch.randn(num_classes, 3, size, size, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1000 * (split + 1))
    y = torch.randint(0, num_classes, (n,), generator=g)
    x = templates[y] + 2.0 * torch.randn(n, 3, size, size, generator=g)
    return x, y


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="AdamP/SGDP in a plain loop with an LR schedule and diagnostics")
    parser.add_argument("--optimizer", choices=["adamp", "sgdp"], default="adamp")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for torch (default: 1, as torch-adamp's CLI: more threads are slower on small models)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    model = SmallCNN(args.width)
    x, y = make_data(4096, args.image_size, seed=args.seed)
    x_test, y_test = make_data(512, args.image_size, seed=args.seed, split=1)  # same classes, new samples

    # No weight decay on 1-D parameters; each weight's `scale_invariant` from a numerical check.
    wd = 1e-2 if args.optimizer == "adamp" else 1e-5
    groups = param_groups(model, weight_decay=wd, example_inputs=x[:64])
    for g in groups:
        print(f"  {', '.join(g['param_names'])}: weight_decay={g['weight_decay']}, "
              f"scale_invariant={g.get('scale_invariant', 'auto')!r}")  # fmt: skip
    if args.optimizer == "adamp":
        opt: torch.optim.Optimizer = AdamP(groups, lr=3e-3, betas=(0.9, 0.999), track_stats=True)
    else:  # the paper's (and the reference README's) SGDP setting
        opt = SGDP(groups, lr=0.1, momentum=0.9, nesterov=True, track_stats=True)

    warmup = max(1, args.steps // 10)
    warmup_then_cosine = [
        LinearLR(opt, start_factor=0.1, total_iters=warmup),
        CosineAnnealingLR(opt, T_max=max(1, args.steps - warmup)),
    ]
    scheduler = SequentialLR(opt, warmup_then_cosine, milestones=[warmup])

    losses: list[float] = []
    stats: dict[str, float] = {}
    model.train()
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(x), (args.batch_size,))
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        scheduler.step()
        losses.append(loss.item())
        if step % args.log_every == 0 or step == args.steps:
            stats = opt.stats()  # statistics of this step (the only host sync of track_stats)
            print(
                f"step {step:4d}  loss {loss.item():.3f}  lr {scheduler.get_last_lr()[0]:.2e}  "
                f"projected {stats['projected_fraction']:.2f}  "
                f"conv2: view {stats['conv2.weight/view']:.0f} |w| {stats['conv2.weight/weight_norm']:.3f} "
                f"lr/|w|^2 {stats['conv2.weight/lr_over_norm_sq']:.2e} "
                f"angle {stats['conv2.weight/angular_update']:.2e} rad"
            )

    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(dim=1) == y_test).float().mean().item()
    print(f"test accuracy {accuracy:.3f}")
    return {"losses": losses, "stats": stats, "accuracy": accuracy, "groups": groups}


if __name__ == "__main__":
    main()
