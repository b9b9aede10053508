"""Log the optimizer's statistics (weight norms, effective step sizes, projections) to TensorBoard and CSV.

    python examples/log_stats.py --csv stats.csv --logdir runs/adamp   # AdamP, views found on the model, 7 s CPU
    python examples/log_stats.py --csv off.csv --logdir runs/off --projection off  # same, never projected (AdamW)
    tensorboard --logdir runs

A small CNN (conv + BatchNorm blocks, a linear classifier) learns a fixed
random labelling of synthetic images. ``param_groups(model, wd, example_inputs=x)``
finds which weights are scale-invariant (the convs, per channel) and
``track_stats``, turned on for the logged steps only, records per parameter
the projection view, ``||w||``, the angle ``w`` turned by (the effective step
size) and ``lr / ||w||^2``. With ``--projection off`` the weight norms of the
convs grow and their angular updates shrink faster: the effect the paper is about.

TensorBoard is optional (``pip install tensorboard``); without it only the CSV is written.
"""

from __future__ import annotations

import argparse
import csv
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from torch_adamp import SGDP, AdamP, param_groups


def make_model(width: int = 16, classes: int = 10) -> nn.Module:
    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)]

    return nn.Sequential(*block(3, width), *block(width, 2 * width), nn.Flatten(), nn.LazyLinear(classes))


def open_writer(logdir: str | None) -> Any:
    """A TensorBoard ``SummaryWriter``, or None (no logdir, or tensorboard not installed)."""
    if not logdir:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("tensorboard is not installed (pip install tensorboard): writing the CSV only")
        return None
    return SummaryWriter(logdir)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--optimizer", choices=["adamp", "sgdp"], default="adamp")
    parser.add_argument(
        "--projection",
        choices=["found", "auto", "off"],
        default="found",
        help=("found: scale_invariant per weight from find_scale_invariant; auto: the paper's cosine test; off: never"),
    )
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--csv", default=None, help="CSV file to write (one row per logged step)")
    parser.add_argument("--logdir", default=None, help="TensorBoard log directory")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for torch (default: 1, as torch-adamp's CLI: more threads are slower on small models)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = make_model(args.width)
    images, labels = torch.randn(args.samples, 3, 16, 16), torch.randint(0, 10, (args.samples,))
    model(images[:2])  # materialise the lazy classifier
    wd = 5e-4 if args.optimizer == "sgdp" else 1e-2
    groups = param_groups(model, wd, example_inputs=images[:64] if args.projection == "found" else None)
    if args.projection == "off":
        for g in groups:
            g["scale_invariant"] = False
    opt: AdamP | SGDP
    if args.optimizer == "adamp":
        opt = AdamP(groups, lr=1e-3)
    else:
        opt = SGDP(groups, lr=0.05, momentum=0.9, nesterov=True)

    writer = open_writer(args.logdir)
    csv_file = open(args.csv, "w", newline="") if args.csv else None
    rows: csv.DictWriter | None = None
    stats: dict[str, float] = {}
    try:
        for step in range(1, args.steps + 1):
            idx = torch.randint(0, args.samples, (64,))
            loss = F.cross_entropy(model(images[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            log_now = step % args.log_every == 0 or step == args.steps
            for group in opt.param_groups:  # statistics only for the steps we log: no cost on the others
                group["track_stats"] = log_now
            opt.step()
            if not log_now:
                continue
            stats = {"loss": loss.item(), **opt.stats()}  # stats(): the only host sync of track_stats
            if csv_file is not None:
                if rows is None:  # keys are stable: the first row fixes the header
                    rows = csv.DictWriter(csv_file, fieldnames=["step", *stats])
                    rows.writeheader()
                rows.writerow({"step": step, **stats})
            if writer is not None:
                for key, value in stats.items():
                    writer.add_scalar(key, value, step)  # one section per parameter: <name>/<metric>
                for metric in ("weight_norm", "angular_update"):  # one chart per metric, all weights
                    writer.add_scalars(
                        metric, {k.split("/")[0]: v for k, v in stats.items() if k.endswith(metric)}, step
                    )
        for name in (n for n, p in model.named_parameters() if p.dim() > 1):
            print(
                f"{name}: view {stats[name + '/view']:.0f}  |w| {stats[name + '/weight_norm']:.3f}  "
                f"angle {stats[name + '/angular_update']:.2e} rad  lr/|w|^2 {stats[name + '/lr_over_norm_sq']:.2e}"
            )
        print(f"loss {stats['loss']:.3f}  projected_fraction {stats['projected_fraction']:.2f}")
    finally:
        if csv_file is not None:
            csv_file.close()
        if writer is not None:
            writer.close()
    return stats


if __name__ == "__main__":
    main()
