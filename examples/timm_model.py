"""A timm model trained with torch_adamp's AdamP (or SGDP), built by timm's own optimizer factory.

    bash scripts/setup.sh timm            # timm, with the torchvision built for the installed torch
    python examples/timm_model.py --model resnet18 --steps 20
    python examples/timm_model.py --help                          # works without timm

timm imports torchvision, which must be the build made for your torch: a plain ``pip install timm`` on
Linux replaces a CPU torch by PyPI's newest CUDA build, and PyPI's torchvision does not import beside a
CPU torch ("operator torchvision::nms does not exist"). ``scripts/setup.sh timm`` installs the matching
build (``torchvision==0.(X+15).*`` for torch 2.X, ``+cpu`` from https://download.pytorch.org/whl/cpu for
a CPU torch) and timm, or stops, changing nothing, where none can be had; without timm this script says
what to install.

``torch_adamp.integrations.timm.register()`` adds ``tadamp`` and ``tsgdp`` to timm's factory, so
``timm.optim.create_optimizer_v2(model, "tadamp", ...)`` (or timm's ``train.py --opt tadamp``)
builds this package's AdamP with timm's parameter grouping and timm's defaults for its ``adamp``:
``wd_ratio=0.01, nesterov=True`` (``tsgdp``: ``nesterov=True``, ``momentum=0.9`` and the
momentum buffer unprojected, as timm's SGDP). ``register(replace=True)`` puts them under timm's
names ``adamp`` and ``sgdp`` as well. The numbers are timm's own AdamP's / SGDP's (tested), with
sync-free multi-tensor or fused steps, ``torch.compile`` support, FSDP2 and the diagnostics
printed here.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch
import torch.nn.functional as F

from torch_adamp.integrations.timm import install_hint, register


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="A timm model with torch_adamp's optimizers, from timm's factory")
    parser.add_argument("--model", default="resnet18", help="any timm model name (random initialisation)")
    parser.add_argument("--optimizer", choices=["tadamp", "tsgdp"], default="tadamp", help="timm factory name")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for torch (default: 1, as torch-adamp's CLI: more threads are slower on small models)",
    )
    args = parser.parse_args(argv)
    try:
        import timm  # after parsing, so that --help works without timm
    except Exception as e:  # ImportError, or a torchvision built for another torch
        sys.exit(f"this example needs {install_hint()}. ({type(e).__name__}: {str(e).splitlines()[0]})")

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = timm.create_model(args.model, pretrained=False, num_classes=args.num_classes).to(device)

    # timm groups the parameters (no weight decay on biases and norm scales); `scale_invariant="auto"`
    # (the paper's cosine test) decides per step which weights are projected. Extra keyword
    # arguments (track_stats here) go to the optimizer.
    register()
    if args.optimizer == "tadamp":
        opt = timm.optim.create_optimizer_v2(model, "tadamp", lr=1e-3, weight_decay=1e-2, track_stats=True)
    else:
        opt = timm.optim.create_optimizer_v2(model, "tsgdp", lr=0.1, weight_decay=1e-4, track_stats=True)
    print(f"{type(opt).__module__}.{type(opt).__name__}: {opt.defaults['wd_ratio']=}, {opt.defaults['nesterov']=}")
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
