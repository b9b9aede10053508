"""Train a small model with DeepSpeed ZeRO (stage 1, 2 or 3) and AdamP or SGDP.

Launch with torchrun (or the ``deepspeed`` launcher); on CPU set
``DS_ACCELERATOR=cpu`` (this script does when no GPU is present)::

    torchrun --nproc_per_node 2 examples/deepspeed_zero.py
    torchrun --nproc_per_node 2 examples/deepspeed_zero.py --stage 3 --optimizer sgdp --checkpoint-dir /tmp/ckpt

Nothing torch_adamp-specific is needed: pass the optimizer to
``deepspeed.initialize``. DeepSpeed replaces the optimizer's parameters by flat
fp32 partitions; torch_adamp recognises them at the first step from the model
parameters' DeepSpeed attributes, computes per-row partial sums on its piece
and exchanges them in ONE all_reduce per step, so the result equals unsharded
training (see docs/distributed.md). Rank 0 prints the loss and the view the
projection took per weight (channel for the conv before BatchNorm, layer for
the linear before LayerNorm, none for the plain layers).
"""

from __future__ import annotations

import argparse
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed
import torch.nn.functional as F
from torch import nn

from torch_adamp import SGDP, AdamP, zero


class Net(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width * 49, 2 * width + 1, bias=False)
        self.ln = nn.LayerNorm(2 * width + 1)
        self.head = nn.Linear(2 * width + 1, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn(self.conv(x))), 2).flatten(1)
        return self.head(F.relu(self.ln(self.fc(x))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", type=int, default=2, choices=(1, 2, 3))
    ap.add_argument("--optimizer", choices=("adamp", "sgdp"), default="adamp")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--width", type=int, default=7)
    ap.add_argument("--checkpoint-dir", default=None, help="save a DeepSpeed checkpoint at the end, then reload it")
    args = ap.parse_args()

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    rank = torch.distributed.get_rank()
    torch.manual_seed(0)
    model = Net(args.width)
    groups = [  # the usual split: weight decay on the weights, none on biases and norm gains
        {"params": [(n, p) for n, p in model.named_parameters() if p.dim() > 1]},
        {"params": [(n, p) for n, p in model.named_parameters() if p.dim() <= 1], "weight_decay": 0.0},
    ]
    if args.optimizer == "adamp":
        opt = AdamP(groups, lr=1e-3, weight_decay=1e-2)
    else:
        opt = SGDP(groups, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)
    config = {
        "train_micro_batch_size_per_gpu": 16,
        "zero_optimization": {"stage": args.stage},
        "zero_allow_untested_optimizer": True,  # DeepSpeed's warning for any optimizer it does not ship
        "gradient_clipping": 1.0,
        "steps_per_print": 10**9,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    gen = torch.Generator().manual_seed(1 + rank)  # each rank its own batches
    for step in range(args.steps):
        x = torch.randn(16, 1, 14, 14, generator=gen).to(engine.device)
        y = torch.randint(0, 10, (16,), generator=gen).to(engine.device)
        loss = F.cross_entropy(engine(x), y)
        engine.backward(loss)
        engine.step()
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            shown = ", ".join(f"{n}: {v}" for n, v in zero.last_views(opt).items())  # one host sync
            print(f"step {step:3d}  loss {loss.item():.4f}  projected views: {shown}", flush=True)
    if args.checkpoint_dir:
        engine.save_checkpoint(args.checkpoint_dir, tag="last")
        engine.load_checkpoint(args.checkpoint_dir, tag="last")
        if rank == 0:
            print(f"saved and reloaded {args.checkpoint_dir}", flush=True)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
