"""Mixed precision with AdamP: autocast + GradScaler, or parameters stored in bfloat16.

    python examples/amp_gradscaler.py                       # autocast(float16) + GradScaler, about 9 s of CPU time
    python examples/amp_gradscaler.py --mode bf16-params    # bfloat16 parameters, no scaler

Runs on CUDA when available, else on the CPU (autocast and GradScaler work there too). The task is
learnable (noisy images around a fixed template per class): the loss falls from 2.3 and the
held-out accuracy printed at the end is far above chance.

* ``amp``: float32 parameters, the forward under ``torch.autocast``, a
  ``torch.amp.GradScaler`` against float16 gradient underflow. The optimizer sees
  float32 parameters and unscaled gradients and needs nothing special:
  ``scaler.step(opt)`` skips the step when a gradient is inf/NaN (parameters and
  optimizer state untouched), and ``scaler.unscale_(opt)`` before gradient
  clipping works as with any torch optimizer.
* ``bf16-params``: the model itself in bfloat16 (half the memory for weights and
  gradients). AdamP computes the step in float32, keeps its moments in float32
  (``fp32_state=True``, the default; ``--fp32-state 0`` stores them in bfloat16),
  and rounds the result to nearest when writing the parameters back.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from torch_adamp import AdamP


def make_model(width: int = 32, num_classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, num_classes),
    )


def make_data(n: int, size: int, num_classes: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable task: noisy images around one fixed random template per class (``seed`` picks a draw)."""
    templates = torch.randn(num_classes, 3, size, size, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, num_classes, (n,), generator=g)
    return templates[y] + 1.0 * torch.randn(n, 3, size, size, generator=g), y


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="AdamP with autocast + GradScaler, or bfloat16 parameters")
    parser.add_argument("--mode", choices=["amp", "bf16-params"], default="amp")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--fp32-state", type=int, choices=[0, 1], default=1)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
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
    if args.mode == "bf16-params":
        model = model.to(torch.bfloat16)
    opt = AdamP(model.parameters(), lr=1e-2, weight_decay=1e-2, fp32_state=bool(args.fp32_state))
    # GradScaler matters for float16; with bfloat16 (or bfloat16 params) it is not needed.
    scaler = torch.amp.GradScaler(device.type, enabled=args.mode == "amp")
    param_dtype = next(model.parameters()).dtype

    losses: list[float] = []
    skipped = 0
    for step in range(1, args.steps + 1):
        x, y = (t.to(device) for t in make_data(args.batch_size, args.image_size, seed=step))
        if args.mode == "amp":
            with torch.autocast(device.type, dtype=torch.float16):
                loss = F.cross_entropy(model(x), y)
        else:
            loss = F.cross_entropy(model(x.to(param_dtype)), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()  # a no-op scale when the scaler is disabled
        scaler.unscale_(opt)  # real gradients, so that clipping sees their true norm
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        scale_before = scaler.get_scale()
        scaler.step(opt)  # skipped (state untouched) if a gradient is inf/NaN
        scaler.update()
        skipped += int(scaler.is_enabled() and scaler.get_scale() < scale_before)
        losses.append(loss.item())
        if step % 10 == 0 or step == args.steps:
            print(f"step {step:3d}  loss {loss.item():.4f}  scale {scaler.get_scale() if scaler.is_enabled() else '-'}")

    model.eval()
    with torch.no_grad():
        x, y = (t.to(device) for t in make_data(1000, args.image_size, seed=0))  # not among the training draws
        accuracy = float((model(x.to(param_dtype)).argmax(1) == y).float().mean())
    state = opt.state[next(model.parameters())]
    print(
        f"held-out accuracy {accuracy:.1%} (chance: 10%); parameters: {param_dtype}, optimizer moments: "
        f"{state['exp_avg'].dtype}, steps skipped by the scaler: {skipped}"
    )
    return {
        "losses": losses,
        "accuracy": accuracy,
        "param_dtype": param_dtype,
        "state_dtype": state["exp_avg"].dtype,
        "skipped": skipped,
    }


if __name__ == "__main__":
    main()
