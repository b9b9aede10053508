"""A timm model trained with torch_adamp's AdamP (or SGDP).

    pip install timm                      # needs a torchvision built for your torch
    python examples/timm_model.py --model resnet18 --steps 20

``timm.optim`` has its own AdamP and SGDP (from the authors' code). These are
drop-in replacements with the same arguments and numbers (``timm.optim.SGDP``
keeps the momentum buffer unprojected: ``SGDP(..., project_momentum=False)``
reproduces it), plus sync-free multi-tensor steps, ``torch.compile`` support,
FSDP2 and diagnostics. Build the optimizer yourself in place of
``timm.optim.create_optimizer_v2(model, "adamp", ...)``; that factory passes
``wd_ratio=0.01, nesterov=True`` to AdamP (and ``nesterov=True`` to SGDP), so
pass those to reproduce a timm run.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.nn.functional as F

from torch_adamp import SGDP, AdamP, param_groups


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import timm  # imported here so that `--help` works without it

    parser = argparse.ArgumentParser(description="A timm model with torch_adamp")
    parser.add_argument("--model", default="resnet18", help="any timm model name (random initialisation)")
    parser.add_argument("--optimizer", choices=["adamp", "sgdp"], default="adamp")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--num-classes", type=int, default=10)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    device = torch.device(args.device)
    model = timm.create_model(args.model, pretrained=False, num_classes=args.num_classes).to(device)

    # No weight decay on biases and norm scales; `scale_invariant="auto"` (the paper's cosine
    # test) decides per step which weights are projected. (Pass example_inputs= to check each
    # weight numerically instead: a few forwards per weight, fine for small models.)
    groups = param_groups(model, weight_decay=1e-4 if args.optimizer == "sgdp" else 1e-2)
    if args.optimizer == "adamp":
        opt: torch.optim.Optimizer = AdamP(groups, lr=1e-3, track_stats=True)
    else:
        opt = SGDP(groups, lr=0.1, momentum=0.9, nesterov=True, track_stats=True)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)

    model.train()
    losses = []
    for step in range(1, args.steps + 1):
        x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
        y = torch.randint(0, args.num_classes, (args.batch_size,), device=device)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        scheduler.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == args.steps:
            stats = opt.stats()
            print(
                f"step {step:3d}  loss {loss.item():.3f}  projected: {stats['projected_fraction']:.0%} of the "
                f"weights, {stats['projected_numel_fraction']:.0%} of their elements"
            )
    return {"losses": losses, "stats": opt.stats()}


if __name__ == "__main__":
    main()
