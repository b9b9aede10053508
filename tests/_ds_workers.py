"""Multi-process scenarios of tests/test_deepspeed.py (DeepSpeed ZeRO, 2 ranks, gloo, CPU).

:func:`launch` spawns the ranks once, initialises DeepSpeed's communication
on gloo once, and runs a list of scenarios in them; each returns a picklable
dict per rank or records its traceback.

References. DeepSpeed averages the gradients of the data-parallel ranks, so
the single-process reference runs the same model on the same per-rank
micro-batches, one forward per micro-batch (BatchNorm sees the same batches)
and back-propagates the mean of the per-rank losses; with gradient
accumulation, the mean over micro-batches too; with gradient clipping,
``clip_grad_norm_`` on that gradient (DeepSpeed's formula). The reference is
the same optimizer class with the same options on the unflattened model.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from _dist_workers import run_scenarios, spawn_ranks
from torch import Tensor, nn

import torch_adamp
from torch_adamp import SGDP, AdamP

WORLD = 2
STEPS = 12
MICRO = 4  # micro-batch per rank


def launch(scenarios: list[str], timeout: float = 240.0) -> dict[str, list[dict[str, Any]]]:
    """Run ``scenarios`` (names of functions below) in 2 spawned ranks; ``{name: [rank0, rank1]}``."""
    return spawn_ranks(_worker, scenarios, WORLD, "DeepSpeed scenarios", timeout)


def _worker(rank: int, tmp: str, scenarios: list[str]) -> None:
    os.environ.update(
        DS_ACCELERATOR="cpu", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD)
    )
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{os.path.join(tmp, 'store')}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=90),
    )
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")  # adopts the process group
    run_scenarios(globals(), rank, tmp, scenarios)


# ----------------------------------------------------------------------------------------
# model, data, reference
# ----------------------------------------------------------------------------------------


class Net(nn.Module):
    """Conv+BatchNorm, conv+GroupNorm (channel views), Linear+LayerNorm (layer view), a plain Linear, a head.

    Sizes are odd, so that the partition boundaries of 2 ranks fall inside rows.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 7, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(7)
        self.conv2 = nn.Conv2d(7, 6, 3, padding=1, bias=False)
        self.gn = nn.GroupNorm(3, 6)
        self.fc = nn.Linear(6 * 16, 13, bias=False)
        self.ln = nn.LayerNorm(13)
        self.mid = nn.Linear(13, 11)
        self.head = nn.Linear(11, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        x = torch.relu(self.gn(self.conv2(x)))
        x = nn.functional.avg_pool2d(x, 2).flatten(1)
        x = torch.relu(self.ln(self.fc(x)))
        return self.head(torch.tanh(self.mid(x)))


def _batch(step: int, rank: int, micro: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1000 * step + 10 * rank + micro)
    return torch.randn(MICRO, 3, 8, 8, generator=g), torch.randn(MICRO, 3, generator=g)


def _loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    bf16 = getattr(model, "bfloat16_enabled", lambda: False)()  # a DeepSpeed engine in bf16
    return (model(x.bfloat16() if bf16 else x).float() - y).square().mean()


OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    "adamp": (AdamP, {"lr": 2e-2, "weight_decay": 1e-2, "betas": (0.9, 0.99)}),
    "sgdp": (SGDP, {"lr": 0.1, "weight_decay": 1e-3, "momentum": 0.9, "nesterov": True}),
    "sgdp_plain": (SGDP, {"lr": 0.1, "weight_decay": 1e-3, "momentum": 0.9, "project_momentum": False}),
}


def _groups(model: nn.Module) -> list[dict[str, Any]]:
    decay = [p for p in model.parameters() if p.dim() > 1]
    rest = [p for p in model.parameters() if p.dim() <= 1]
    return [{"params": decay}, {"params": rest, "weight_decay": 0.0}]


def _reference(opt_name: str, steps: int, accum: int = 1, clip: float = 0.0) -> tuple[nn.Module, list[list[int]]]:
    """The same optimizer on the whole model in this process; returns the model and the views of every step."""
    torch.manual_seed(0)
    model = Net()
    cls, kw = OPTIMIZERS[opt_name]
    opt = cls(_groups(model), **kw, track_stats=True)
    weights = [n for n, p in model.named_parameters() if p.dim() > 1]
    views = []
    for step in range(steps):
        opt.zero_grad()
        for micro in range(accum):
            losses = [_loss(model, *_batch(step, r, micro)) for r in range(WORLD)]
            (torch.stack(losses).mean() / accum).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        stats = opt.stats()
        order = [f"group0.param{i}" for i in range(len(weights))]
        views.append([int(stats[k + "/view"]) for k in order])
    return model, views


# ----------------------------------------------------------------------------------------
# instrumentation
# ----------------------------------------------------------------------------------------

COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
    "reduce_scatter",
    "broadcast",
    "reduce",
    "all_to_all_single",
    "barrier",
    "gather",
    "scatter",
)


@contextmanager
def _instrument(engine: Any, opt: torch.optim.Optimizer) -> Iterator[dict[str, Any]]:
    """Per ``engine.step()`` that steps the optimizer: the collectives issued inside ``opt.step()`` (DeepSpeed
    calls it once per parameter group) and the decisions of the ZeRO path."""
    from torch_adamp import zero

    rec: dict[str, Any] = {"collectives": [], "views": [], "inside": False, "fresh": False}
    saved = {n: getattr(dist, n) for n in COLLECTIVES}
    original_step = opt.step
    original_decide = zero.projection.RowDecision.finish

    def counting(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*a: Any, **k: Any) -> Any:
            if rec["inside"]:
                rec["collectives"][-1].append(name)
            return fn(*a, **k)

        return wrapped

    def step(*a: Any, **k: Any) -> Any:
        rec["inside"] = True
        if rec["fresh"]:
            rec["collectives"].append([])
            rec["views"].append([])
            rec["fresh"] = False
        try:
            return original_step(*a, **k)
        finally:
            rec["inside"] = False

    def decide(self: Any) -> Any:
        coef, view, row_sums = original_decide(self)
        rec["views"][-1].extend(view.tolist())
        return coef, view, row_sums

    engine_step = engine.step

    def outer(*a: Any, **k: Any) -> Any:
        rec["fresh"] = True
        return engine_step(*a, **k)

    for n in COLLECTIVES:
        setattr(dist, n, counting(n, saved[n]))
    engine.step = outer
    opt.step = step  # type: ignore[method-assign]
    zero.projection.RowDecision.finish = decide  # type: ignore[method-assign]
    try:
        yield rec
    finally:
        for n in COLLECTIVES:
            setattr(dist, n, saved[n])
        del opt.step
        del engine.step
        zero.projection.RowDecision.finish = original_decide  # type: ignore[method-assign]


def _engine(
    stage: int, opt_name: str, extra: dict[str, Any] | None = None, seed: int = 0
) -> tuple[Any, Any, nn.Module]:
    import deepspeed

    torch.manual_seed(seed)
    model = Net()
    cls, kw = OPTIMIZERS[opt_name]
    opt = cls(_groups(model), **kw)
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,  # DeepSpeed's default is 1.0
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    config.update(extra or {})
    if config.get("bf16", {}).get("enabled"):
        model.bfloat16()  # buffers too (BatchNorm's running statistics): CPU batch_norm wants one dtype
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    return engine, opt, model


def _train(engine: Any, rank: int, steps: int, start: int = 0, accum: int = 1) -> None:
    for step in range(start, start + steps):
        for micro in range(accum):
            loss = _loss(engine, *_batch(step, rank, micro))
            engine.backward(loss)
            engine.step()


def _full_params(engine: Any, model: nn.Module) -> dict[str, Tensor]:
    """The fp32 master parameters, gathered (a test-only collective per parameter)."""
    from deepspeed.utils import safe_get_full_fp32_param

    return {n: safe_get_full_fp32_param(p).detach().clone().float() for n, p in model.named_parameters()}


def _split_rows(opt: Any) -> int:
    """Rows cut by a partition boundary on this rank (pieces shorter than their weight's rows)."""
    cut = 0
    for layout in opt._zero._layouts.values():
        for _, k, length, i in layout.pieces:
            cut += k == 1 and length < max(1, _prod(layout.shapes[i][1:]))
    return cut


def _prod(s: tuple[int, ...]) -> int:
    out = 1
    for v in s:
        out *= v
    return out


# ----------------------------------------------------------------------------------------
# scenarios
# ----------------------------------------------------------------------------------------


def _versus_reference(
    rank: int, stage: int, opt_name: str, extra: dict[str, Any] | None = None, accum: int = 1, clip: float = 0.0
) -> dict[str, Any]:
    engine, opt, model = _engine(stage, opt_name, extra)
    with _instrument(engine, opt) as rec:
        _train(engine, rank, STEPS, accum=accum)
    ds = _full_params(engine, model)
    out: dict[str, Any] = {
        "collectives": rec["collectives"],
        "views": [v for v in rec["views"]],
        "split_rows": _split_rows(opt),
        "group_numels": [[p.numel() for p in g["params"]] for g in opt.param_groups],
    }
    if rank == 0:
        ref, views = _reference(opt_name, STEPS, accum=accum, clip=clip)
        out["ref_views"] = views
        out["rel"] = {
            n: ((ds[n] - p.detach()).norm() / p.detach().norm().clamp_min(1e-30)).item()
            for n, p in ref.named_parameters()
        }
    return out


def _make(stage: int, opt_name: str, **kw: Any) -> Callable[[int, str], dict[str, Any]]:
    def run(rank: int, tmp: str) -> dict[str, Any]:
        return _versus_reference(rank, stage, opt_name, **kw)

    return run


for _stage in (1, 2, 3):
    for _opt in ("adamp", "sgdp"):
        globals()[f"zero{_stage}_{_opt}"] = _make(_stage, _opt)
zero2_sgdp_plain = _make(2, "sgdp_plain")
zero2_adamp_accum = _make(2, "adamp", extra={"gradient_accumulation_steps": 2}, accum=2)
zero1_sgdp_clip = _make(1, "sgdp", extra={"gradient_clipping": 0.05}, clip=0.05)
zero3_adamp_clip = _make(3, "adamp", extra={"gradient_clipping": 0.05}, clip=0.05)

VERSUS_REFERENCE = [f"zero{s}_{o}" for s in (1, 2, 3) for o in ("adamp", "sgdp")] + [
    "zero2_sgdp_plain",
    "zero2_adamp_accum",
    "zero1_sgdp_clip",
    "zero3_adamp_clip",
]


def _checkpoint(rank: int, tmp: str, stage: int, opt_name: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Save after 5 steps; continuing and resuming in a fresh engine give bitwise the same next 5 steps."""
    path = os.path.join(tmp, f"ckpt_{stage}_{opt_name}_{bool(extra)}")
    engine, _, model = _engine(stage, opt_name, extra)
    _train(engine, rank, 5)
    engine.save_checkpoint(path, tag="t5")
    _train(engine, rank, 5, start=5)
    continued = _full_params(engine, model)
    engine2, opt2, model2 = _engine(stage, opt_name, extra, seed=123)  # other initial values
    engine2.load_checkpoint(path, tag="t5")
    with _instrument(engine2, opt2) as rec:
        _train(engine2, rank, 5, start=5)
    resumed = _full_params(engine2, model2)
    return {
        "equal": {n: bool(torch.equal(continued[n], resumed[n])) for n in continued},
        "collectives": rec["collectives"],
        "views": rec["views"],
    }


def zero2_adamp_checkpoint(rank: int, tmp: str) -> dict[str, Any]:
    return _checkpoint(rank, tmp, 2, "adamp")


def zero3_sgdp_checkpoint(rank: int, tmp: str) -> dict[str, Any]:
    return _checkpoint(rank, tmp, 3, "sgdp")


def zero1_adamp_bf16_checkpoint(rank: int, tmp: str) -> dict[str, Any]:
    return _checkpoint(rank, tmp, 1, "adamp", {"bf16": {"enabled": True}})


def _same_gradient(rank: int, tmp: str, stage: int, opt_name: str, extra: dict[str, Any]) -> dict[str, Any]:
    """bf16: DeepSpeed's fp32 master step against the same optimizer on whole tensors fed the same gradients."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

    engine, opt, model = _engine(stage, opt_name, extra)
    names = [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    ref_params = {n: nn.Parameter(safe_get_full_fp32_param(p).detach().clone().float()) for n, p in params.items()}
    cls, kw = OPTIMIZERS[opt_name]
    ref = cls(
        [
            {"params": [ref_params[n] for n in names if ref_params[n].dim() > 1]},
            {"params": [ref_params[n] for n in names if ref_params[n].dim() <= 1], "weight_decay": 0.0},
        ],
        **kw,
        track_stats=True,
    )
    worst = 0.0
    views, ref_views = [], []
    with _instrument(engine, opt) as rec:
        for step in range(STEPS):
            loss = _loss(engine, *_batch(step, rank))
            engine.backward(loss)
            for n in names:
                ref_params[n].grad = safe_get_full_grad(params[n]).detach().clone().float()
            ref.step()
            stats = ref.stats()
            ref_views.append([int(stats[f"group0.param{i}/view"]) for i in range(len(ref.param_groups[0]["params"]))])
            engine.step()
            for n in names:
                got = safe_get_full_fp32_param(params[n]).float()
                want = ref_params[n].detach()
                worst = max(worst, ((got - want).norm() / want.norm().clamp_min(1e-30)).item())
                ref_params[n].data.copy_(got)  # follow DeepSpeed's trajectory: rounding does not accumulate
    views = rec["views"]
    return {"worst_step_rel": worst, "views": views, "ref_views": ref_views, "collectives": rec["collectives"]}


def zero2_adamp_bf16(rank: int, tmp: str) -> dict[str, Any]:
    return _same_gradient(rank, tmp, 2, "adamp", {"bf16": {"enabled": True}})


def zero3_sgdp_bf16(rank: int, tmp: str) -> dict[str, Any]:
    return _same_gradient(rank, tmp, 3, "sgdp", {"bf16": {"enabled": True}})


def zero2_refusal(rank: int, tmp: str) -> dict[str, Any]:
    """A ZeRO partition whose layout the optimizer cannot see (the mappings removed) is refused, naming it."""
    engine, _, model = _engine(2, "adamp")
    for p in model.parameters():
        del p._hp_mapping
    loss = _loss(engine, *_batch(0, rank))
    engine.backward(loss)
    try:
        engine.step()
    except torch_adamp.distributed.FlatParameterError as e:
        return {"raised": str(e)}
    return {"raised": None}


def zero2_opt_out(rank: int, tmp: str) -> dict[str, Any]:
    """scale_invariant=False: no projection wanted, the partition is stepped elementwise (AdamW), no collective."""
    import deepspeed

    torch.manual_seed(0)
    model = Net()
    opt = AdamP(model.parameters(), lr=1e-2, weight_decay=1e-2, scale_invariant=False)
    ref_model = copy.deepcopy(model)
    ref = torch.optim.AdamW(ref_model.parameters(), lr=1e-2, weight_decay=1e-2)
    config = {
        "train_micro_batch_size_per_gpu": MICRO,
        "zero_optimization": {"stage": 2},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "gradient_clipping": 0.0,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    with _instrument(engine, opt) as rec:
        _train(engine, rank, 3)
    for step in range(3):
        ref.zero_grad()
        torch.stack([_loss(ref_model, *_batch(step, r)) for r in range(WORLD)]).mean().backward()
        ref.step()
    ds = _full_params(engine, model)
    rel = max(((ds[n] - p).norm() / p.norm()).item() for n, p in ref_model.named_parameters())
    return {"collectives": rec["collectives"], "rel": rel}


ALL = [
    *VERSUS_REFERENCE,
    "zero2_adamp_checkpoint",
    "zero3_sgdp_checkpoint",
    "zero1_adamp_bf16_checkpoint",
    "zero2_adamp_bf16",
    "zero3_sgdp_bf16",
    "zero2_refusal",
    "zero2_opt_out",
]


def zero2_adamp_no_collective(rank: int, tmp: str) -> dict[str, Any]:
    """Negative control: the same run with the optimizer's collective removed drifts from the reference."""
    from torch_adamp import zero

    saved = zero._all_reduce
    zero._all_reduce = lambda t, group: None  # type: ignore[assignment]
    try:
        return _versus_reference(rank, 2, "adamp")
    finally:
        zero._all_reduce = saved  # type: ignore[assignment]


ALL.append("zero2_adamp_no_collective")
