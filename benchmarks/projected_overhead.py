"""Overhead of ``Projected``: ``Projected(AdamW(fused=True))`` against ``AdamW(fused=True)`` and ``AdamP``.

Run ``python benchmarks/projected_overhead.py`` from a clone (``--scale 4`` for a quick run). The
parameters and fixed gradients are those of ``benchmarks/step_time.py`` (ResNet-50's 161 tensors, every
conv weight with a gradient orthogonal to each output channel, so both AdamP and Projected project them;
lr 1e-10 so that the decisions stay put). The three optimizers are stepped **interleaved round-robin**
in one process, one thread; the table gives the median step time, its ratio to AdamW (median of the
per-round ratios), the bytes kept between steps (optimizer state, plus Projected's pre-step buffers)
and the peak temporary bytes of one step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_time

from torch_adamp import AdamP, Projected
from torch_adamp.projected import native as projected_native

HYPER = {"lr": step_time.LR, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2}


def kept_bytes(opt: torch.optim.Optimizer) -> int:
    extra = sum(b.numel() * b.element_size() for b in getattr(opt, "_pre", {}).values())
    inner = getattr(opt, "inner", opt)
    return step_time.state_bytes(inner) + extra


class TorchRowSums(Projected):
    """``Projected`` with its step by torch operations (the update materialised, four row reductions): the
    path off the CPU or without the native kernels, and every path before csrc/projected.h."""

    def step(self, closure: object = None) -> object:
        takes, rows = projected_native.takes, projected_native.row_sums
        projected_native.takes = lambda *args: False  # type: ignore[assignment]
        projected_native.row_sums = lambda *args: None  # type: ignore[assignment]
        try:
            return super().step()
        finally:
            projected_native.takes, projected_native.row_sums = takes, rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=int, default=1, help="divide every dimension >= 16 by this")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument(
        "--torch-row-sums",
        action="store_true",
        help="also Projected with its row sums by torch operations (no native kernel: the path before it)",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    params, _ = step_time.make_tensors(step_time.SETS["resnet50"], args.scale)
    makers = {
        "AdamW(fused=True)": lambda: torch.optim.AdamW(params, **HYPER, fused=True),
        "Projected(AdamW(fused=True))": lambda: Projected(torch.optim.AdamW(params, **HYPER, fused=True)),
        "AdamP (default: fused)": lambda: AdamP(params, **HYPER),
    }
    if args.torch_row_sums:
        makers["Projected, torch row sums"] = lambda: TorchRowSums(torch.optim.AdamW(params, **HYPER, fused=True))
    opts = {name: make() for name, make in makers.items()}
    times: dict[str, list[float]] = {name: [] for name in opts}
    for r in range(args.warmup + args.rounds):
        names = list(opts)
        names = names[r % len(names) :] + names[: r % len(names)]
        for name in names:
            t0 = time.perf_counter()
            opts[name].step()
            if r >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    base = "AdamW(fused=True)"
    n = sum(p.numel() for p in params)
    print(
        f"ResNet-50 shapes (scale {args.scale}): {len(params)} tensors, {n:,} parameters, 1 thread, "
        f"{args.rounds} rounds, torch {torch.__version__}"
    )
    print(f"{'optimizer':32s} {'median ms':>10s} {'x AdamW':>8s} {'kept MiB':>9s} {'peak tmp MiB':>13s}")
    for name, opt in opts.items():
        ratios = [t / b for t, b in zip(times[name], times[base], strict=True)]
        peak = step_time.peak_temporary_bytes(opt.step)
        print(
            f"{name:32s} {statistics.median(times[name]) * 1e3:10.2f} {statistics.median(ratios):8.2f} "
            f"{kept_bytes(opt) / 2**20:9.1f} {peak / 2**20:13.1f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
