"""Host work per step: AdamP / SGDP against torch's fused AdamW / SGD, on tensors too small to compute.

What a fast device kernel would wait on: the Python and dispatch work of ``optimizer.step()``. Every
dimension of every parameter is capped at 2 (ResNet-50's 161-tensor layout, 4-D convs and all, and 1,000
tensors of 2 x 2), so the arithmetic is negligible and a step's time is its host work. Each round steps
every optimizer once, in an order that rotates; the table shows the median microseconds per step and the
median of the per-round ratios to torch's fused optimizer of the same family (AdamW for AdamP, SGD with
momentum for SGDP), measured in one run. Run from a clone::

    python benchmarks/host_overhead.py [--rounds 200] [--threads 1]

``--against DIR`` puts a second copy of torch_adamp (``DIR/src``, e.g. a worktree of an older commit) in
the same run, for before/after ratios measured side by side.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_time


def tiny(shapes: Sequence[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """Every dimension capped at 2: the same tensors, the same dimensions, no arithmetic to speak of."""
    return [tuple(min(d, 2) for d in s) for s in shapes]


SETS: dict[str, Callable[[], list[tuple[int, ...]]]] = {
    "resnet50": lambda: tiny(step_time.resnet50_shapes()),
    "1000": lambda: [(2, 2)] * 1000,
}


def params_for(shapes: Sequence[tuple[int, ...]], seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn(s, generator=gen))
        p.grad = torch.randn(s, generator=gen)
        out.append(p)
    return out


def load_other(root: str) -> Any:
    """A second torch_adamp from ``root/src``, imported under its own name beside this one."""
    src = Path(root) / "src"
    saved = {k: v for k, v in sys.modules.items() if k == "torch_adamp" or k.startswith("torch_adamp.")}
    for k in saved:
        del sys.modules[k]
    sys.path.insert(0, str(src))
    try:
        module = importlib.import_module("torch_adamp")
    finally:
        sys.path.remove(str(src))
        other = {k: v for k, v in sys.modules.items() if k == "torch_adamp" or k.startswith("torch_adamp.")}
        for k in other:
            del sys.modules[k]
        sys.modules.update(saved)
    return module


def makers(modules: dict[str, Any]) -> dict[str, tuple[str, Callable[[list[Tensor]], torch.optim.Optimizer]]]:
    """``label: (family, make)``."""
    out: dict[str, tuple[str, Callable[[list[Tensor]], torch.optim.Optimizer]]] = {
        "torch AdamW(fused=True)": ("adam", lambda ps: torch.optim.AdamW(ps, lr=1e-10, fused=True)),
        "torch SGD(fused=True)": ("sgd", lambda ps: torch.optim.SGD(ps, lr=1e-10, momentum=0.9, fused=True)),
    }
    for tag, m in modules.items():
        out[f"AdamP {tag}"] = ("adam", lambda ps, m=m: m.AdamP(ps, lr=1e-10, weight_decay=1e-2))
        out[f"SGDP {tag}"] = ("sgd", lambda ps, m=m: m.SGDP(ps, lr=1e-10, momentum=0.9))
    return out


def run(shapes: list[tuple[int, ...]], modules: dict[str, Any], rounds: int, warmup: int) -> dict[str, Any]:
    entries = makers(modules)
    opts = {}
    for label, (_, make) in entries.items():
        ps = params_for(shapes)
        opts[label] = make(ps)
        for _ in range(warmup):
            opts[label].step()
    labels = list(opts)
    times: dict[str, list[float]] = {k: [] for k in labels}
    for r in range(rounds):
        order = labels[r % len(labels) :] + labels[: r % len(labels)]
        for label in order:
            start = time.perf_counter()
            opts[label].step()
            times[label].append(time.perf_counter() - start)
    base = {"adam": "torch AdamW(fused=True)", "sgd": "torch SGD(fused=True)"}
    out = {}
    for label in labels:
        family = entries[label][0]
        ratios = [a / b for a, b in zip(times[label], times[base[family]], strict=True)]
        out[label] = (statistics.median(times[label]) * 1e6, statistics.median(ratios))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sets", default=",".join(SETS), help=f"comma-separated, of {', '.join(SETS)}")
    ap.add_argument("--against", default=None, help="a second torch_adamp checkout (its src/), measured beside")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import torch_adamp

    modules = {"(this)": torch_adamp}
    if args.against:
        modules[f"({args.against})"] = load_other(args.against)
    print(f"host work per step: torch {torch.__version__}, {step_time._cpu_name()}, {args.threads} thread(s)")
    for name in args.sets.split(","):
        shapes = SETS[name]()
        result = run(shapes, modules, args.rounds, args.warmup)
        print(f"\n{name}: {len(shapes)} tensors of at most 2 per dimension, median of {args.rounds} rounds")
        print(f"{'optimizer':<40} {'us/step':>9} {'us/tensor':>10} {'ratio':>7}")
        for label, (us, ratio) in result.items():
            print(f"{label:<40} {us:9.0f} {us / len(shapes):10.2f} {ratio:7.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
