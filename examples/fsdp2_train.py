"""Train a small model with FSDP2 (``fully_shard``) and AdamP or SGDP.

Launch with torchrun, e.g. on CPU (gloo) or GPUs (nccl), chosen automatically::

    torchrun --nproc_per_node 2 examples/fsdp2_train.py
    torchrun --nproc_per_node 2 examples/fsdp2_train.py --optimizer sgdp --steps 50 --checkpoint-dir /tmp/ckpt

Parameters, gradients and optimizer states are DTensors sharded over the
ranks. torch_adamp runs the step on the local shards and exchanges what the
scale-invariance test and the layer-view projection need in ONE small
all_reduce per step, so the result equals unsharded training (see
docs/distributed.md). The script prints, on rank 0, the loss and which view
the projection used per weight (channel for the conv before BatchNorm, layer
for the linear before LayerNorm, none for the plain layers), and can save /
resume a distributed checkpoint.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard

from torch_adamp import SGDP, AdamP


class Net(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width, bias=False), nn.LayerNorm(2 * width), nn.ReLU())
        self.head = nn.Linear(2 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mlp(self.conv(x).mean((2, 3))))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizer", choices=["adamp", "sgdp"], default="adamp")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16, help="per rank")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--checkpoint-dir", default=None, help="save here at the end (resume from it if present)")
    args = parser.parse_args(argv)

    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # same initial weights on every rank
    model = Net(args.width).to(device)
    for block in (model.conv, model.mlp):
        fully_shard(block)
    fully_shard(model)

    # the usual two groups: weight decay for weights, none for biases and norm parameters
    named = list(model.named_parameters())
    groups = [
        {"params": [(n, p) for n, p in named if p.dim() > 1]},
        {"params": [(n, p) for n, p in named if p.dim() <= 1], "weight_decay": 0.0},
    ]
    if args.optimizer == "adamp":
        opt: torch.optim.Optimizer = AdamP(groups, lr=1e-3, weight_decay=1e-2, track_stats=True)
    else:
        opt = SGDP(groups, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4, track_stats=True)

    start = 0
    if args.checkpoint_dir and os.path.exists(os.path.join(args.checkpoint_dir, ".metadata")):
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt), "step": 0}
        dcp.load(state, checkpoint_id=args.checkpoint_dir)
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, opt, state["optim"])
        start = int(state["step"])
        if rank == 0:
            print(f"resumed from {args.checkpoint_dir} at step {start}")

    gen = torch.Generator().manual_seed(1234 + rank)  # each rank its own data
    target = torch.randn(10, 3, generator=torch.Generator().manual_seed(7))
    for step in range(start, start + args.steps):
        x = torch.randn(args.batch_size, 3, 8, 8, generator=gen)
        y = (x.mean((2, 3)) @ target.T).argmax(1)
        loss = F.cross_entropy(model(x.to(device)), y.to(device))
        loss.backward()
        opt.step()
        opt.zero_grad()
        if rank == 0 and (step % 10 == 0 or step == start + args.steps - 1):
            print(f"step {step:4d}  loss {loss.item():.4f}")

    stats = opt.stats()  # host sync here only
    if rank == 0:
        names = {0: "none", 1: "channel", 2: "layer"}
        weights = [n for n, p in named if p.dim() > 1]  # 1-D parameters are never projected
        print("projection view of the last step:", {n: names[int(stats[f"{n}/view"])] for n in weights})
    if args.checkpoint_dir:
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        dcp.save({**state, "step": start + args.steps}, checkpoint_id=args.checkpoint_dir)
        if rank == 0:
            print(f"saved to {args.checkpoint_dir}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
