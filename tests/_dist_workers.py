"""Multi-process scenarios of tests/test_distributed.py (2 ranks, gloo, CPU).

:func:`launch` spawns the ranks once and runs a list of scenarios in them, one
after the other, in the same process group; each scenario returns a
picklable dict (rank 0's and rank 1's are both kept) or records its
traceback, so one failing scenario does not hide the others. Everything is
deterministic: fixed seeds, fixed per-rank batches.

Unsharded references. FSDP2 averages the gradients of the ranks
(reduce-scatter, then divide by the world size), and BatchNorm normalises
with the statistics of each rank's own sub-batch. The single-process
reference therefore runs the same model on the same per-rank sub-batches,
one forward per sub-batch (so BatchNorm sees the same batches), and
back-propagates the mean of the per-rank losses: the same gradient as FSDP2 up
to rounding (the test checks the gradients first).
"""

from __future__ import annotations

import copy
import os
import pickle
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

import torch_adamp
from torch_adamp import SGDP, AdamP

WORLD = 2
STEPS = 20

# ----------------------------------------------------------------------------------------
# launching
# ----------------------------------------------------------------------------------------


def launch(scenarios: list[str], timeout: float = 240.0) -> dict[str, list[dict[str, Any]]]:
    """Run ``scenarios`` (names of functions below) in 2 spawned ranks; ``{name: [rank0, rank1]}``."""
    return spawn_ranks(_worker, scenarios, WORLD, "distributed scenarios", timeout)


def spawn_ranks(
    worker: Callable[[int, str, list[str]], None], scenarios: list[str], world: int, what: str, timeout: float
) -> dict[str, list[dict[str, Any]]]:
    """Run ``worker(rank, tmp, scenarios)`` in ``world`` spawned ranks; each pickles ``{name: result}`` to
    ``tmp/rank{rank}.pkl``. Returns ``{name: [result of rank 0, ...]}``; ranks still alive at the end are killed."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.start_processes(
            worker, args=(tmp, scenarios), nprocs=world, join=False, start_method="spawn", daemon=True
        )
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{what} did not finish in {timeout:.0f} s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        results = []
        for rank in range(world):
            with open(os.path.join(tmp, f"rank{rank}.pkl"), "rb") as f:
                results.append(pickle.load(f))
    return {name: [results[r][name] for r in range(world)] for name in scenarios}


def _worker(rank: int, tmp: str, scenarios: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{os.path.join(tmp, 'store')}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=60),
    )
    run_scenarios(globals(), rank, tmp, scenarios)


def run_scenarios(namespace: dict[str, Any], rank: int, tmp: str, scenarios: list[str]) -> None:
    """In a rank whose process group is up: each scenario (a function of ``namespace``) in turn, its result
    or its traceback and its time, a barrier after each; the results pickled for :func:`spawn_ranks`, and
    the process group destroyed."""
    out: dict[str, Any] = {}
    try:
        for name in scenarios:
            t0 = time.perf_counter()
            try:
                out[name] = namespace[name](rank, tmp)
            except Exception:
                out[name] = {"error": traceback.format_exc()}
            out[name]["seconds"] = time.perf_counter() - t0
            dist.barrier()
    finally:
        with open(os.path.join(tmp, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(out, f)
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------
# counting collectives
# ----------------------------------------------------------------------------------------

_COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "broadcast",
    "broadcast_object_list",
    "reduce",
    "all_to_all",
    "all_to_all_single",
    "barrier",
    "gather",
    "scatter",
    "send",
    "recv",
    "isend",
    "irecv",
    "batch_isend_irecv",
)


@contextmanager
def count_collectives(profile: bool = False) -> Iterator[Counter]:
    """Count collectives: calls of the ``torch.distributed`` functions, and (``profile``) c10d ops in the profiler.

    ``counts["python"]`` and ``counts["profiler"]`` are filled when the block exits;
    the profiler also sees collectives issued by DTensor (functional collectives).
    """
    counts: Counter = Counter()
    saved = {name: getattr(dist, name) for name in _COLLECTIVES}

    def wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            counts["python"] += 1
            counts[f"python:{name}"] += 1
            return fn(*args, **kwargs)

        return counted

    for name, fn in saved.items():
        setattr(dist, name, wrap(name, fn))
    try:
        if profile:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                yield counts
        else:
            yield counts
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)
    if profile:
        events = [e.name for e in prof.events() if e.name.startswith(("c10d::", "_c10d_functional::"))]
        counts["profiler"] = len(events)
        counts.update(f"profiler:{e}" for e in events)


# ----------------------------------------------------------------------------------------
# models and data
# ----------------------------------------------------------------------------------------


class Net(nn.Module):
    """Conv2d+BatchNorm (channel view), Linear+LayerNorm (layer view), a plain Linear, a (1, k) head.

    dim 0 of fc1 (7) and fc2 (5) is not divisible by 2; the head (1 row)
    leaves rank 1 an empty shard under Shard(0). dim 1 of conv (4) and fc1 (6)
    is even, as FSDP2 requires for ``Shard(1)`` (see :func:`shard_dim1`).
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.fc1 = nn.Linear(6, 7, bias=False)
        self.ln = nn.LayerNorm(7)
        self.fc2 = nn.Linear(7, 5)
        self.head = nn.Linear(5, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn(self.conv(x))).mean((2, 3))
        x = F.relu(self.ln(self.fc1(x)))
        x = torch.tanh(self.fc2(x))
        return self.head(x).squeeze(1)


def make_net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def batch(step: int, rank: int, same: bool = False, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """The batch of ``rank`` at ``step`` (``same``: every rank gets rank 0's)."""
    g = torch.Generator().manual_seed(1000 * step + (0 if same else rank) + 17)
    return torch.randn(4, 4, 6, 6, generator=g).to(dtype), torch.randn(4, generator=g).to(dtype)


def shard_dim1(p: nn.Parameter) -> Any:
    """``shard_placement_fn`` sharding dim 1 where FSDP2 allows it (evenly divisible), else dim 0."""
    from torch.distributed.tensor import Shard

    return Shard(1) if p.dim() > 1 and p.shape[1] % WORLD == 0 else Shard(0)


def ref_backward(model: nn.Module, step: int, same: bool = False, dtype: torch.dtype = torch.float32) -> None:
    """Unsharded gradient: mean of the per-rank losses, one forward per rank's sub-batch."""
    losses = [F.mse_loss(model(x), y) for x, y in (batch(step, r, same, dtype) for r in range(WORLD))]
    (sum(losses) / WORLD).backward()


def rel(a: Tensor, b: Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def full(t: Tensor) -> Tensor:
    """The whole tensor (collective for a DTensor: every rank must call it)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def views_of(opt: torch.optim.Optimizer) -> dict[str, int]:
    return {k[: -len("/view")]: int(v) for k, v in opt.stats().items() if k.endswith("/view")}


OPTIMIZERS: dict[str, tuple[type, dict[str, Any]]] = {
    "adamp": (AdamP, {"lr": 5e-3, "weight_decay": 1e-2}),
    "sgdp": (SGDP, {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3}),
}


def _projected_adamw(params: Any, track_stats: bool = False, **kw: Any) -> torch.optim.Optimizer:
    return torch_adamp.Projected(torch.optim.AdamW(params, **kw), track_stats=track_stats)


OPTIMIZERS["projected_adamw"] = (_projected_adamw, {"lr": 5e-3, "weight_decay": 1e-2})  # type: ignore[assignment]


def _projected_adamw_corrected(params: Any, track_stats: bool = False, **kw: Any) -> torch.optim.Optimizer:
    return torch_adamp.Projected(
        torch.optim.AdamW(params, **kw), track_stats=track_stats, corrected_weight_decay="all", lr_max=2e-2
    )


# issue 27: the correction (k = lr / lr_max = 0.25), LionP, and the correction through Projected
OPTIMIZERS["adamp_corrected"] = (
    AdamP,
    {"lr": 5e-3, "weight_decay": 0.5, "corrected_weight_decay": True, "lr_max": 2e-2},
)
OPTIMIZERS["lionp"] = (torch_adamp.LionP, {"lr": 1e-3, "weight_decay": 0.1})
OPTIMIZERS["projected_adamw_corrected"] = (_projected_adamw_corrected, {"lr": 5e-3, "weight_decay": 0.5})  # type: ignore[assignment]


def make_opt(kind: str, params: Any, **kw: Any) -> torch.optim.Optimizer:
    cls, hyper = OPTIMIZERS[kind]
    return cls(params, **hyper, **kw)


# ----------------------------------------------------------------------------------------
# FSDP2 versus unsharded
# ----------------------------------------------------------------------------------------


def _fsdp2_vs_unsharded(
    rank: int, kind: str, dim1: bool = False, groups: bool = False, dtype: torch.dtype = torch.float32, **opt_kw: Any
) -> dict:
    from torch.distributed.fsdp import fully_shard

    ref = make_net().to(dtype)
    model = copy.deepcopy(ref)
    kw: dict[str, Any] = {"shard_placement_fn": shard_dim1} if dim1 else {}
    fully_shard(model.conv, **kw)
    fully_shard(model.fc1, **kw)
    fully_shard(model, **kw)

    def param_groups(m: nn.Module) -> Any:
        named = list(m.named_parameters())
        if not groups:
            return named
        by = lambda keep: [(n, p) for n, p in named if keep(n, p)]
        return [  # several groups that each hold sharded weights, and one without any
            {"params": by(lambda n, p: n.startswith("conv")), "lr": 2e-2 if kind != "sgdp" else 0.2},
            {"params": by(lambda n, p: n.startswith("fc1")), "weight_decay": 0.0},
            {"params": by(lambda n, p: p.dim() > 1 and n.startswith(("fc2", "head")))},
            {"params": by(lambda n, p: p.dim() <= 1 and not n.startswith(("conv", "fc1"))), "weight_decay": 0.0},
        ]

    opt = make_opt(kind, param_groups(model), track_stats=True, **opt_kw)
    opt_ref = make_opt(kind, param_groups(ref), track_stats=True, **opt_kw)
    names = [n for n, _ in model.named_parameters()]
    placements = {n: str(p.placements) for n, p in model.named_parameters()}
    local_shapes = {n: tuple(p.to_local().shape) for n, p in model.named_parameters()}

    grad_rel = 0.0
    views: list[dict[str, int]] = []
    views_ref: list[dict[str, int]] = []
    counts: list[int] = []
    for step in range(STEPS):
        x, y = batch(step, rank, dtype=dtype)
        F.mse_loss(model(x), y).backward()
        ref_backward(ref, step, dtype=dtype)
        if step == 0:
            for (_, p), (_, q) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
                grad_rel = max(grad_rel, rel(full(p.grad), q.grad))
        with count_collectives() as c:
            opt.step()
        counts.append(c["python"])
        opt_ref.step()
        views.append(views_of(opt))
        views_ref.append(views_of(opt_ref))
        opt.zero_grad()
        opt_ref.zero_grad()
    pairs = [(n, full(p), q) for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters(), strict=True)]
    diffs = {n: rel(p, q) for n, p, q in pairs}
    return {
        "n_groups": len(opt.param_groups),
        "model_rel": rel(torch.cat([p.flatten() for _, p, _ in pairs]), torch.cat([q.flatten() for _, _, q in pairs])),
        "names": names,
        "placements": placements,
        "local_shapes": local_shapes,
        "grad_rel": grad_rel,
        "param_rel": diffs,
        "max_rel": max(diffs.values()),
        "views": views,
        "views_ref": views_ref,
        "collectives_with_stats": counts,
    }


def fsdp2_projected_adamw(rank: int, tmp: str) -> dict:
    return _fsdp2_vs_unsharded(rank, "projected_adamw")


def fsdp2_projected_adamw_groups(rank: int, tmp: str) -> dict:
    return _fsdp2_vs_unsharded(rank, "projected_adamw", dim1=True, groups=True)


def fsdp2_adamp(rank: int, tmp: str) -> dict:
    return _fsdp2_vs_unsharded(rank, "adamp")


def fsdp2_sgdp(rank: int, tmp: str) -> dict:
    return _fsdp2_vs_unsharded(rank, "sgdp")


def fsdp2_adamp_shard1(rank: int, tmp: str) -> dict:
    return _fsdp2_vs_unsharded(rank, "adamp", dim1=True, nesterov=True)


def fsdp2_sgdp_shard1(rank: int, tmp: str) -> dict:
    return _fsdp2_vs_unsharded(rank, "sgdp", dim1=True, nesterov=True)


def fsdp2_adamp_groups(rank: int, tmp: str) -> dict:
    return _fsdp2_vs_unsharded(rank, "adamp", groups=True)


def fsdp2_adamp_corrected(rank: int, tmp: str) -> dict:
    return _fsdp2_vs_unsharded(rank, "adamp_corrected")


def fsdp2_lionp(rank: int, tmp: str) -> dict:
    return _fsdp2_vs_unsharded(rank, "lionp", dim1=True)


def fsdp2_projected_adamw_corrected(rank: int, tmp: str) -> dict:
    return _fsdp2_vs_unsharded(rank, "projected_adamw_corrected")


def fsdp2_orthograd(rank: int, tmp: str) -> dict:
    """OrthoGrad(AdamW) on FSDP2 (Shard(0) and Shard(1)) against the unsharded model: its per-tensor sums in
    one collective per step."""
    from torch.distributed.fsdp import fully_shard

    ref = make_net()
    model = copy.deepcopy(ref)
    fully_shard(model.conv, shard_placement_fn=shard_dim1)
    fully_shard(model)
    opt = torch_adamp.OrthoGrad(torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=1e-2))
    opt_ref = torch_adamp.OrthoGrad(torch.optim.AdamW(ref.parameters(), lr=5e-3, weight_decay=1e-2))
    counts = []
    for step in range(STEPS):
        x, y = batch(step, rank)
        F.mse_loss(model(x), y).backward()
        ref_backward(ref, step)
        with count_collectives() as c:
            opt.step()
        counts.append(c["python"])
        opt_ref.step()
        opt.zero_grad()
        opt_ref.zero_grad()
    pairs = [(full(p), q) for p, q in zip(model.parameters(), ref.parameters(), strict=True)]
    return {
        "model_rel": rel(torch.cat([p.flatten() for p, _ in pairs]), torch.cat([q.flatten() for _, q in pairs])),
        "collectives": counts,
        "placements": {n: str(p.placements) for n, p in model.named_parameters()},
    }


def fsdp2_adamp_f64(rank: int, tmp: str) -> dict:
    return _fsdp2_vs_unsharded(rank, "adamp", dtype=torch.float64)


def fsdp2_sgdp_f64(rank: int, tmp: str) -> dict:
    return _fsdp2_vs_unsharded(rank, "sgdp", dtype=torch.float64)


def fsdp2_adamp_shard1_f64(rank: int, tmp: str) -> dict:
    return _fsdp2_vs_unsharded(rank, "adamp", dim1=True, nesterov=True, dtype=torch.float64)


def fsdp2_sgdp_shard1_f64(rank: int, tmp: str) -> dict:
    return _fsdp2_vs_unsharded(rank, "sgdp", dim1=True, nesterov=True, dtype=torch.float64)


def fsdp2_adamp_no_reduce_f64(rank: int, tmp: str) -> dict:
    """Negative control: the same run with the optimizer's collective removed (local math on shards)."""
    import torch_adamp.distributed as tad

    saved = tad._all_reduce
    tad._all_reduce = lambda packed, group: None
    try:
        return _fsdp2_vs_unsharded(rank, "adamp", dtype=torch.float64)
    finally:
        tad._all_reduce = saved


def fsdp2_sgdp_single_tensor(rank: int, tmp: str) -> dict:
    """``foreach=False`` must not run local math on shards: DTensor steps take the sharded path."""
    return _fsdp2_vs_unsharded(rank, "sgdp", foreach=False)


# ----------------------------------------------------------------------------------------
# collectives per step (no statistics)
# ----------------------------------------------------------------------------------------


def fsdp2_collectives(rank: int, tmp: str) -> dict:
    from torch.distributed.fsdp import fully_shard

    out: dict[str, Any] = {}
    configs: dict[str, tuple[str, bool, bool]] = {
        "adamp": ("adamp", False, False),
        "sgdp": ("sgdp", False, False),
        "adamp_groups": ("adamp", True, False),
        "sgdp_groups_shard1": ("sgdp", True, True),
    }
    for label, (kind, groups, dim1) in configs.items():
        model = make_net()
        kw: dict[str, Any] = {"shard_placement_fn": shard_dim1} if dim1 else {}
        fully_shard(model.conv, **kw)
        fully_shard(model, **kw)
        if groups:
            params: Any = [{"params": [p], "lr": 1e-2 * (i + 1)} for i, p in enumerate(model.parameters())]
        else:
            params = model.parameters()
        opt = make_opt(kind, params)
        per_step = []
        for step in range(3):
            x, y = batch(step, rank)
            F.mse_loss(model(x), y).backward()
            with count_collectives(profile=True) as c:
                opt.step()
            per_step.append(dict(c))
            opt.zero_grad()
        out[label] = per_step
    return out


# ----------------------------------------------------------------------------------------
# DTensor placements without FSDP: mixed groups, Replicate, HSDP meshes, half precision
# ----------------------------------------------------------------------------------------


def _orth_rows(g: Tensor, p: Tensor) -> Tensor:
    p2, g2 = p.reshape(p.shape[0], -1), g.reshape(p.shape[0], -1)
    return (g2 - (g2 * p2).sum(1, keepdim=True) / (p2 * p2).sum(1, keepdim=True) * p2).reshape(p.shape)


def _orth_all(g: Tensor, p: Tensor) -> Tensor:
    return g - (g * p).sum() / (p * p).sum() * p


def _dtensor_case(rank: int, mesh_shape: tuple[int, ...], dtype: torch.dtype, **opt_kw: Any) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", mesh_shape)
    shard = [Replicate()] * (len(mesh_shape) - 1)
    torch.manual_seed(3)
    # name: (shape, placements or None for a plain tensor, gradient kind)
    spec = {
        "conv_s0": ((5, 3, 2, 2), [*shard, Shard(0)], "channel"),
        "lin_s0": ((7, 4), [*shard, Shard(0)], "layer"),
        "plain_s0": ((5, 6), [*shard, Shard(0)], "random"),
        "head_s0": ((1, 6), [*shard, Shard(0)], "random"),
        "conv_s1": ((4, 3, 2), [*shard, Shard(1)], "channel"),
        "lin_s2": ((3, 2, 5), [*shard, Shard(2)], "layer"),
        "bias_s0": ((5,), [*shard, Shard(0)], "random"),
        "lin_repl": ((6, 3), [Replicate()] * len(mesh_shape), "layer"),
        "lin_plain": ((4, 5), None, "channel"),
        "plain_plain": ((3, 5), None, "random"),
    }
    fulls = {n: torch.randn(shape, dtype=torch.float64).to(dtype) for n, (shape, _, _) in spec.items()}
    ref = {n: t.clone() for n, t in fulls.items()}

    def make(n: str) -> Tensor:
        pl = spec[n][1]
        t = fulls[n] if pl is None else distribute_tensor(fulls[n], mesh, pl, src_data_rank=None)
        return nn.Parameter(t)

    params = {n: make(n) for n in spec}
    ref_params = {n: nn.Parameter(t) for n, t in ref.items()}
    opt = AdamP(list(params.items()), lr=1e-2, weight_decay=0.1, track_stats=True, **opt_kw)
    opt_ref = AdamP(list(ref_params.items()), lr=1e-2, weight_decay=0.1, track_stats=True)
    views, views_ref, counts = [], [], []
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        for n, (shape, pl, kind) in spec.items():
            q = ref_params[n].detach().double()
            r = torch.randn(shape, generator=g, dtype=torch.float64)
            grad = {"channel": _orth_rows, "layer": _orth_all}.get(kind, lambda r, q: r)(r, q).to(dtype)
            ref_params[n].grad = grad.clone()
            params[n].grad = grad.clone() if pl is None else distribute_tensor(grad, mesh, pl, src_data_rank=None)
        with count_collectives() as c:
            opt.step()
        counts.append(c["python"])
        opt_ref.step()
        views.append(views_of(opt))
        views_ref.append(views_of(opt_ref))
    return {
        "param_rel": {n: rel(full(params[n]), ref_params[n]) for n in spec},
        "views": views,
        "views_ref": views_ref,
        "collectives_with_stats": counts,
        "local_shapes": {n: tuple(getattr(p, "_local_tensor", p).shape) for n, p in params.items()},
    }


def dtensor_mixed(rank: int, tmp: str) -> dict:
    return _dtensor_case(rank, (WORLD,), torch.float32)


def dtensor_mixed_single_tensor(rank: int, tmp: str) -> dict:
    return _dtensor_case(rank, (WORLD,), torch.float32, foreach=False)


def dtensor_mixed_bf16(rank: int, tmp: str) -> dict:
    return _dtensor_case(rank, (WORLD,), torch.bfloat16)


def dtensor_hsdp_1x2(rank: int, tmp: str) -> dict:
    """HSDP mesh (replicate 1, shard 2): placements (Replicate(), Shard(d)), reduce over the shard dim."""
    return _dtensor_case(rank, (1, WORLD), torch.float32)


def dtensor_hsdp_2x1(rank: int, tmp: str) -> dict:
    """HSDP mesh (replicate 2, shard 1): nothing is split, so nothing may be summed (no collective)."""
    return _dtensor_case(rank, (WORLD, 1), torch.float32)


# ----------------------------------------------------------------------------------------
# DDP and ZeroRedundancyOptimizer
# ----------------------------------------------------------------------------------------


def _replicated_vs_single(rank: int, kind: str, zero: bool) -> dict:
    """Every rank gets the same batch, so the averaged gradient is exactly the single-process one."""
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    ref = make_net()
    model = DDP(copy.deepcopy(ref))
    if zero:
        cls, hyper = OPTIMIZERS[kind]
        opt: torch.optim.Optimizer = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=cls, **hyper)
    else:
        opt = make_opt(kind, model.parameters())
    opt_ref = make_opt(kind, ref.parameters())
    for step in range(STEPS):
        x, y = batch(step, rank, same=True)
        F.mse_loss(model(x), y).backward()
        F.mse_loss(ref(x), y).backward()
        opt.step()
        opt_ref.step()
        opt.zero_grad()
        opt_ref.zero_grad()
    pairs = list(zip(model.module.parameters(), ref.parameters(), strict=True))
    return {
        "bitwise": all(torch.equal(p, q) for p, q in pairs),
        "max_rel": max(rel(p, q) for p, q in pairs),
    }


def ddp_adamp(rank: int, tmp: str) -> dict:
    return _replicated_vs_single(rank, "adamp", zero=False)


def ddp_sgdp(rank: int, tmp: str) -> dict:
    return _replicated_vs_single(rank, "sgdp", zero=False)


def zero_adamp(rank: int, tmp: str) -> dict:
    return _replicated_vs_single(rank, "adamp", zero=True)


def zero_sgdp(rank: int, tmp: str) -> dict:
    return _replicated_vs_single(rank, "sgdp", zero=True)


# ----------------------------------------------------------------------------------------
# FSDP1 (flat parameters) is refused
# ----------------------------------------------------------------------------------------


def fsdp1_refused(rank: int, tmp: str) -> dict:
    """FSDP1 runs on CPU in torch 2.13 when given ``device_id=torch.device("cpu")``."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    out: dict[str, Any] = {}
    for use_orig in (False, True):
        model = FSDP(make_net(), use_orig_params=use_orig, device_id=torch.device("cpu"))
        for kind in ("adamp", "sgdp"):
            try:
                make_opt(kind, model.named_parameters())
                out[f"{kind}_orig{use_orig}"] = None
            except torch_adamp.distributed.FlatParameterError as e:
                out[f"{kind}_orig{use_orig}"] = str(e)
        # the explicit opt-out: no projection wanted
        opt = make_opt("adamp", [{"params": model.parameters(), "scale_invariant": False}])
        x, y = batch(0, rank)
        F.mse_loss(model(x), y).backward()
        opt.step()
        out[f"opt_out_orig{use_orig}_steps"] = True
    return out


# ----------------------------------------------------------------------------------------
# distributed checkpointing
# ----------------------------------------------------------------------------------------


def fsdp2_checkpoint(rank: int, tmp: str) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.fsdp import fully_shard

    out: dict[str, Any] = {}
    for kind in ("adamp", "sgdp"):

        def build(kind: str = kind) -> tuple[nn.Module, torch.optim.Optimizer]:
            model = make_net(seed=5)  # a different init: the load must overwrite it
            fully_shard(model.conv)
            fully_shard(model)
            return model, make_opt(kind, model.parameters())

        def train(model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
            for step in steps:
                x, y = batch(step, rank)
                F.mse_loss(model(x), y).backward()
                opt.step()
                opt.zero_grad()

        model, opt = build()
        train(model, opt, range(5))
        path = os.path.join(tmp, f"ckpt_{kind}")
        dcp.save(
            {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=path
        )
        train(model, opt, range(5, 10))
        expected = [full(p).clone() for p in model.parameters()]

        model2, opt2 = build()  # fresh: empty optimizer state
        state = {"model": get_model_state_dict(model2), "optim": get_optimizer_state_dict(model2, opt2)}
        dcp.load(state, checkpoint_id=path)
        set_model_state_dict(model2, state["model"])
        set_optimizer_state_dict(model2, opt2, state["optim"])
        train(model2, opt2, range(5, 10))
        got = [full(p) for p in model2.parameters()]
        out[f"{kind}_max_rel"] = max(rel(a, b) for a, b in zip(got, expected, strict=True))
        out[f"{kind}_bitwise"] = all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
        st = next(iter(opt2.state.values()))
        out[f"{kind}_state_types"] = {k: type(v).__name__ for k, v in st.items()}

    # a plain (unsharded) optimizer state loaded with load_state_dict: refused at the step, clearly
    plain = make_net()
    plain_opt = make_opt("adamp", plain.parameters())
    F.mse_loss(plain(batch(0, 0)[0]), batch(0, 0)[1]).backward()
    plain_opt.step()
    model3, opt3 = build("adamp")
    opt3.load_state_dict(plain_opt.state_dict())
    x, y = batch(0, rank)
    F.mse_loss(model3(x), y).backward()
    try:
        opt3.step()
        out["plain_state_error"] = None
    except ValueError as e:
        out["plain_state_error"] = str(e)
    return out


ALL = [
    "fsdp2_projected_adamw",
    "fsdp2_projected_adamw_groups",
    "fsdp2_adamp",
    "fsdp2_sgdp",
    "fsdp2_adamp_shard1",
    "fsdp2_sgdp_shard1",
    "fsdp2_adamp_f64",
    "fsdp2_sgdp_f64",
    "fsdp2_adamp_shard1_f64",
    "fsdp2_sgdp_shard1_f64",
    "fsdp2_adamp_no_reduce_f64",
    "fsdp2_adamp_groups",
    "fsdp2_sgdp_single_tensor",
    "fsdp2_collectives",
    "dtensor_mixed",
    "dtensor_mixed_single_tensor",
    "dtensor_mixed_bf16",
    "dtensor_hsdp_1x2",
    "dtensor_hsdp_2x1",
    "ddp_adamp",
    "ddp_sgdp",
    "zero_adamp",
    "zero_sgdp",
    "fsdp1_refused",
    "fsdp2_checkpoint",
    "fsdp2_adamp_corrected",
    "fsdp2_lionp",
    "fsdp2_projected_adamw_corrected",
    "fsdp2_orthograd",
]
