"""Compile AdamP's step with ``torch.compile(opt.step, fullgraph=True)``, or use ``fused=True``.

    python examples/compile_step.py                     # inductor: needs a C++ compiler on CPU, triton on CUDA
    python examples/compile_step.py --backend eager     # graph capture only: starts in seconds
    python examples/compile_step.py --fused             # AdamP(fused=True), no torch.compile in the loop

The scale-invariance decision is taken on the device (``torch.where``, never a
Python ``if`` on a tensor), so the whole step is one graph: ``fullgraph=True``
holds and there is no host-device sync. The learning rate is a 0-d tensor so
that the LR scheduler changes a tensor's value instead of a Python constant of
the graph (which would recompile the step every time the lr changes).

``fused=True`` is a C kernel on the CPU (built once per machine with the system
C compiler; also the CPU default) and a step the optimizer compiles itself on
other devices.

The same model is trained side by side with an uncompiled AdamP(foreach=False),
the per-tensor loop in the reference package's operation order, and the largest
difference between the two sets of weights is printed at the end.
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from torch_adamp import AdamP


def make_model(width: int = 16, num_classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, num_classes),
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="torch.compile and AdamP")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (inductor, aot_eager, eager)")
    parser.add_argument("--fused", action="store_true", help="AdamP(fused=True) instead of torch.compile")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for torch (default: 1, as torch-adamp's CLI: more threads are slower on small models)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    device = torch.device(args.device)
    model = make_model().to(device)
    reference = copy.deepcopy(model)

    def lr() -> torch.Tensor:  # a 0-d tensor lr: schedulers update it in place, no recompile
        return torch.tensor(1e-2, device=device)

    # capturable=True keeps the step counters on the device: needed for CUDA graphs
    # (torch.compile(mode="reduce-overhead")), harmless otherwise.
    options = dict(weight_decay=1e-2, capturable=device.type == "cuda")
    if args.fused:
        opt = AdamP(model.parameters(), lr=lr(), fused=True, **options)
    else:
        # foreach=True: the multi-tensor path, the GPU default, traced op by op. (The CPU default, a C kernel,
        # is one opaque custom op under torch.compile: also no graph break, but nothing for the compiler to fuse.)
        opt = AdamP(model.parameters(), lr=lr(), foreach=True, **options)
        # Compile before creating the scheduler: it wraps opt.step in a function that dynamo does not trace.
        step = torch.compile(opt.step, fullgraph=True, backend=args.backend)
        # ... and so it cannot see the compiled step being called, and warns once, wrongly, about the order.
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
    eager = AdamP(reference.parameters(), lr=lr(), foreach=False, **options)  # the reference-order loop
    schedulers = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=args.steps) for o in (opt, eager)]
    if args.fused:
        step = opt.step  # after the scheduler: its wrapper records the call

    start = time.perf_counter()
    for i in range(args.steps):
        x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
        y = torch.randint(0, 10, (args.batch_size,), device=device)
        for m, o, s in ((model, opt, step), (reference, eager, eager.step)):
            loss = F.cross_entropy(m(x), y)
            o.zero_grad(set_to_none=True)
            loss.backward()
            s()
        for sched in schedulers:
            sched.step()
        if i < 2:  # the first two steps compile (state initialisation, then the steady state)
            print(f"step {i}: {time.perf_counter() - start:.1f} s since start")
    elapsed = time.perf_counter() - start

    max_diff = max((a - b).abs().max().item() for a, b in zip(model.parameters(), reference.parameters(), strict=True))
    print(f"{args.steps} steps in {elapsed:.1f} s; largest difference to AdamP(foreach=False): {max_diff:.2e}")
    return {"max_diff": max_diff, "loss": loss.item()}


if __name__ == "__main__":
    main()
