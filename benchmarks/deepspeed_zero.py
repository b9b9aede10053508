"""DeepSpeed ZeRO step time and memory: AdamP / SGDP against torch's AdamW / SGD under the same engine.

Run ``python benchmarks/deepspeed_zero.py`` from a clone (needs the ``deepspeed``
extra; ``--help`` for the options). It spawns 2 ranks (gloo, CPU,
``DS_ACCELERATOR=cpu``, one thread each), builds two DeepSpeed engines of the
same model and ZeRO stage, one with torch_adamp's optimizer and one with
torch's (``foreach=True``), and alternates their training steps in the same
run (forward, backward, ``engine.step()``). Reported, per rank 0, median over
the timed steps:

* ``opt.step()``: the time inside the optimizer's ``step()`` (all groups of
  one engine step, including torch_adamp's one ``all_reduce``), and its ratio
  to torch's;
* ``engine.step()``: the whole DeepSpeed step (gradient clipping, optimizer,
  the all-gather of the updated parameters);
* memory: optimizer-state bytes per parameter element of the partition, and
  what torch_adamp's ZeRO path keeps beyond that (its layout: a row index per
  local row, and the per-row sums of the step, 4 numbers per row of the
  group's weights).

Model: a conv + BatchNorm stem and a stack of Linear + LayerNorm blocks
(``--width``), so the projection fires in the channel and the layer view, and
partition boundaries cut rows.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from datetime import timedelta
from typing import Any

import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(64)
        self.proj = nn.Linear(64 * 16, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.Linear(width, 4 * width, bias=False), nn.LayerNorm(4 * width), nn.GELU(), nn.Linear(4 * width, width)
            )
            for _ in range(depth)
        )
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.avg_pool2d(torch.relu(self.bn(self.conv(x))), 2).flatten(1)
        x = self.proj(x)
        for b in self.blocks:
            x = x + b(x)
        return self.head(x)


def _groups(model: nn.Module) -> list[dict[str, Any]]:
    return [
        {"params": [p for p in model.parameters() if p.dim() > 1]},
        {"params": [p for p in model.parameters() if p.dim() <= 1], "weight_decay": 0.0},
    ]


def _worker(rank: int, tmp: str, args: argparse.Namespace) -> None:
    os.environ.update(DS_ACCELERATOR="cpu", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=2, timeout=timedelta(seconds=120)
    )
    import deepspeed

    import torch_adamp

    deepspeed.init_distributed(dist_backend="gloo")
    ours_cls, theirs_cls = (
        (torch_adamp.AdamP, torch.optim.AdamW) if args.optimizer == "adamp" else (torch_adamp.SGDP, torch.optim.SGD)
    )
    kw: dict[str, Any] = {"lr": 1e-3, "weight_decay": 1e-2}
    if args.optimizer == "sgdp":
        kw.update(lr=0.01, momentum=0.9)
    engines, opts, times = {}, {}, {}
    for name, cls, extra in (("torch_adamp", ours_cls, {}), ("torch", theirs_cls, {"foreach": True})):
        torch.manual_seed(0)
        model = Net(args.width, args.depth)
        opt = cls(_groups(model), **kw, **extra)
        config = {
            "train_micro_batch_size_per_gpu": args.batch,
            "zero_optimization": {"stage": args.stage},
            "zero_allow_untested_optimizer": True,
            "gradient_clipping": 1.0,
            "steps_per_print": 10**9,
        }
        engines[name], _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
        opts[name] = opt
        times[name] = {"opt": [], "engine": []}
        inner = opt.step

        def timed(*a: Any, _inner: Any = inner, _rec: list[float] = times[name]["opt"], **k: Any) -> Any:
            t0 = time.perf_counter()
            out = _inner(*a, **k)
            _rec.append(time.perf_counter() - t0)
            return out

        opt.step = timed  # type: ignore[method-assign]
    numel = sum(p.numel() for p in Net(args.width, args.depth).parameters())
    gen = torch.Generator().manual_seed(rank)
    for _ in range(args.warmup + args.steps):
        x, y = torch.randn(args.batch, 3, 8, 8, generator=gen), torch.randint(0, 10, (args.batch,), generator=gen)
        for name, engine in engines.items():
            loss = nn.functional.cross_entropy(engine(x), y)
            engine.backward(loss)
            t0 = time.perf_counter()
            engine.step()
            times[name]["engine"].append(time.perf_counter() - t0)
    if rank == 0:
        n_opt_calls = len(times["torch_adamp"]["opt"]) // (args.warmup + args.steps)  # one per group (stage 1/2)
        print(
            f"ZeRO-{args.stage}, 2 ranks, {numel / 1e6:.2f}M parameters, {args.steps} timed steps, "
            f"{args.optimizer} vs torch {theirs_cls.__name__}"
        )
        med = {}
        for name in engines:
            t_opt = times[name]["opt"]
            per_step = [sum(t_opt[i * n_opt_calls : (i + 1) * n_opt_calls]) for i in range(len(t_opt) // n_opt_calls)]
            t_engine = times[name]["engine"][args.warmup :]
            med[name] = (statistics.median(per_step[args.warmup :]), statistics.median(t_engine))
        for name, (o, e) in med.items():
            print(
                f"  {name:12s} opt.step() {o * 1e3:8.2f} ms  ({o / med['torch'][0]:.2f}x)   "
                f"engine.step() {e * 1e3:8.2f} ms  ({e / med['torch'][1]:.2f}x)"
            )
        for name, opt in opts.items():
            state = sum(
                t.numel() * t.element_size()
                for s in opt.state.values()
                for t in s.values()
                if isinstance(t, torch.Tensor) and t.dim() > 0
            )
            local = sum(p.numel() for g in opt.param_groups for p in g["params"]) or 1
            print(f"  {name:12s} optimizer state {state / local:.2f} bytes per partition element")
        layouts = list(opts["torch_adamp"]._zero._layouts.values())
        kept = sum(lay.row_index.numel() * lay.row_index.element_size() for lay in layouts)
        rows = sum(lay.total_rows for lay in layouts)
        local = sum(lay.numel for lay in layouts)
        print(
            f"  torch_adamp ZeRO layout: {kept} bytes kept ({kept / local:.4f} per partition element, "
            f"{len([p for lay in layouts for p in lay.pieces])} pieces); per step a temporary of 4 x {rows} rows "
            f"x 4 bytes = {16 * rows} bytes of row sums"
        )
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", type=int, default=2, choices=(1, 2, 3))
    ap.add_argument("--optimizer", choices=("adamp", "sgdp"), default="adamp")
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_worker, args=(tmp, args), nprocs=2, start_method="spawn")


if __name__ == "__main__":
    main()
