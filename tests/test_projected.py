"""``Projected(inner)``: AdamP's projection around any optimizer.

Anchors: ``Projected(AdamW) == AdamP`` and ``Projected(SGD(nesterov)) == SGDP(project_momentum=False)``,
one step from a shared state, on every path of both sides, with identical decisions; then the
contract (shared containers, untouched weights bit for bit, reused buffers, no host sync, compile).
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from helpers import PATHS, one_rank_zero_partition, path_kwargs
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

import torch_adamp
from torch_adamp import SGDP, AdamP, Projected, projection
from torch_adamp.engine import native as native_backend
from torch_adamp.projected import native as projected_native

SHAPES = ((8, 3, 3, 3), (6, 4, 3, 3), (10, 5), (12, 7), (7,))
INNER = {"single": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def _params(dtype: torch.dtype = torch.float32) -> list[nn.Parameter]:
    torch.manual_seed(0)
    return [nn.Parameter(torch.randn(s, dtype=dtype)) for s in SHAPES]


def _grads(params: list[nn.Parameter], step: int) -> list[Tensor]:
    """Gradients with every decision occurring: orthogonal per channel (tensor 0), to the whole tensor
    (tensor 1: channel test fails, layer passes), and generic (the others: not projected)."""
    g = torch.Generator().manual_seed(100 + step)
    out = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
    w0, g0 = params[0].detach().reshape(8, -1), out[0].reshape(8, -1)
    g0 -= (g0 * w0).sum(1, keepdim=True) / (w0 * w0).sum(1, keepdim=True) * w0
    w1 = params[1].detach()
    out[1] = out[1] - (out[1] * w1).sum() / (w1 * w1).sum() * w1
    out[1].reshape(6, -1)[:, 0] += 3 * w1.reshape(6, -1)[:, 0].sign()  # per-row cosines above the channel threshold
    out[1] = out[1] - (out[1] * w1).sum() / (w1 * w1).sum() * w1
    out[2] = out[2] + params[2].detach()  # a large radial part: neither view
    return out


@pytest.fixture(params=["plain", "rows", "torch"])
def row_sums(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The three ways Projected computes its step: ``plain`` (the CPU default for plain float tensors: the
    copy, row sums and decision before the inner step, the projection after it by csrc/projected.h),
    ``rows`` (the decision after the step from the native one-sweep row sums: sharded or half-precision
    tensors) and ``torch`` (torch operations: other devices, no C compiler). The test fails if the native
    way it names never ran."""
    if request.param != "plain":
        monkeypatch.setattr(projected_native, "takes", lambda *args: False)
    if request.param == "torch":
        monkeypatch.setattr(projected_native, "row_sums", lambda *args: None)
        yield "torch"
        return
    if not native_backend.available():
        pytest.skip("no native kernels")
    name = "before" if request.param == "plain" else "row_sums"
    native, used = getattr(projected_native, name), []

    def spy(*args: Any) -> Tensor | None:
        out = native(*args)
        used.append(out is not None)
        return out

    monkeypatch.setattr(projected_native, name, spy)
    yield str(request.param)
    assert any(used)


def _views(opt: Any) -> dict[str, float]:
    return {k: v for k, v in opt.stats().items() if k.endswith("/view")}


def _rel(a: Tensor, b: Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _set_grads(params: list[nn.Parameter], grads: list[Tensor]) -> None:
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("inner", sorted(INNER))
@pytest.mark.parametrize("path", sorted(PATHS))
def test_projected_adamw_is_adamp(path: str, inner: str, weight_decay: float, row_sums: str) -> None:
    pa, pb = _params(), _params()
    hyper = {"lr": 0.05, "betas": (0.8, 0.95), "eps": 1e-8, "weight_decay": weight_decay}
    a = AdamP(pa, **hyper, track_stats=True, **path_kwargs(path))
    b = Projected(torch.optim.AdamW(pb, **hyper, **INNER[inner]), track_stats=True)
    seen = set()
    for step in range(4):
        grads = _grads(pa, step)
        _set_grads(pa, grads)
        _set_grads(pb, grads)
        with torch.no_grad():  # a shared state: the next comparison is of one step
            for p, q in zip(pa, pb, strict=True):
                q.copy_(p)
                if step:
                    for k in ("exp_avg", "exp_avg_sq", "step"):
                        b.state[q][k].copy_(a.state[p][k])
        a.step()
        b.step()
        assert _views(a) == _views(b)
        seen |= set(_views(a).values())
        for p, q in zip(pa, pb, strict=True):
            assert _rel(q, p) <= 1e-6
    assert seen == {0.0, 1.0, 2.0}  # none, channel and layer all occurred


def test_projected_adamw_update_is_adamp_update_float64(row_sums: str) -> None:
    """In float64 the recovered update itself matches (float32 recovers it to eps32 |w| / |update|)."""
    pa, pb = _params(torch.float64), _params(torch.float64)
    hyper = {"lr": 1e-3, "weight_decay": 0.1}
    a, b = AdamP(pa, **hyper, foreach=True), Projected(torch.optim.AdamW(pb, **hyper, foreach=True))
    for step in range(3):
        grads = _grads(pa, step)
        _set_grads(pa, grads)
        _set_grads(pb, grads)
        w0 = [p.detach().clone() for p in pa]
        a.step()
        b.step()
        for w, p, q in zip(w0, pa, pb, strict=True):
            assert _rel(q - w, p - w) <= 1e-9


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("inner", ["single", "foreach"])
@pytest.mark.parametrize("path", sorted(PATHS))
def test_projected_sgd_is_sgdp_without_momentum_projection(
    path: str, inner: str, nesterov: bool, row_sums: str
) -> None:
    """With dampening 0, torch's first-step buffer ``b = g`` equals SGDP's ``b = momentum * 0 + g``: equal
    from step 1. Each later step starts from a shared state (weights and buffer copied)."""
    pa, pb = _params(), _params()
    a = SGDP(pa, lr=0.1, momentum=0.9, nesterov=nesterov, project_momentum=False, track_stats=True, **PATHS[path])
    b = Projected(torch.optim.SGD(pb, lr=0.1, momentum=0.9, nesterov=nesterov, **INNER[inner]), track_stats=True)
    for step in range(4):
        grads = _grads(pa, step)
        _set_grads(pa, grads)
        _set_grads(pb, grads)
        with torch.no_grad():
            for p, q in zip(pa, pb, strict=True):
                q.copy_(p)
                if step:
                    b.state[q]["momentum_buffer"].copy_(a.state[p]["momentum"])
        a.step()
        b.step()
        assert _views(a) == _views(b)
        for p, q in zip(pa, pb, strict=True):
            assert _rel(q, p) <= 1e-6
            assert torch.equal(b.state[q]["momentum_buffer"], a.state[p]["momentum"])  # buffer never projected


def test_projected_sgd_with_dampening_matches_from_step_two() -> None:
    """torch's SGD sets ``b = g`` at its first step, SGDP ``b = (1 - dampening) g``: the first steps differ;
    from the same buffer on, every step is equal."""
    pa, pb = _params(), _params()
    a = SGDP(pa, lr=0.1, momentum=0.9, dampening=0.5, project_momentum=False, foreach=True)
    b = Projected(torch.optim.SGD(pb, lr=0.1, momentum=0.9, dampening=0.5))
    for step in range(3):
        grads = _grads(pa, step)
        _set_grads(pa, grads)
        _set_grads(pb, grads)
        with torch.no_grad():
            for p, q in zip(pa, pb, strict=True):
                q.copy_(p)
                if step:
                    b.state[q]["momentum_buffer"].copy_(a.state[p]["momentum"])
        a.step()
        b.step()
        rels = [_rel(q, p) for p, q in zip(pa, pb, strict=True)]
        if step == 0:
            assert max(rels) > 1e-4  # the documented first-step difference is real
        else:
            assert max(rels) <= 1e-6


def test_not_projected_weights_keep_the_inner_result_bitwise(row_sums: str) -> None:
    pa, pb = _params(), _params()
    inner_a = torch.optim.AdamW(pa, lr=0.05, weight_decay=0.1)
    b = Projected(torch.optim.AdamW(pb, lr=0.05, weight_decay=0.1), track_stats=True)
    ever: set[int] = set()
    for step in range(3):
        grads = _grads(pa, step)
        _set_grads(pa, grads)
        _set_grads(pb, grads)
        inner_a.step()
        b.step()
        views = list(_views(b).values())
        ever |= {i for i, v in enumerate(views) if v}
        for i, (p, q) in enumerate(zip(pa, pb, strict=True)):
            assert torch.equal(p, q) == (i not in ever)
    assert ever != set(range(len(pa)))


def test_radial_component_removed_with_coupled_decay() -> None:
    """SGD's L2 term is part of the update: for a projected weight (channel view) the step has no radial part."""
    params = _params()
    p = params[0]
    opt = Projected(torch.optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=0.5))
    for step in range(3):
        p.grad = _grads(params, step)[0]
        w0 = p.detach().clone()
        opt.step()
        delta = (p.detach() - w0).reshape(8, -1)
        radial = (delta * w0.reshape(8, -1)).sum(1) / w0.reshape(8, -1).norm(dim=1)
        assert radial.abs().max() <= 1e-5 * delta.norm(dim=1).max()
        assert (p.detach() - w0).abs().max() > 0


def test_shares_groups_state_and_works_with_schedulers_and_state_dicts() -> None:
    params = _params()
    inner = torch.optim.AdamW(params, lr=0.1, weight_decay=0.1)
    opt = Projected(inner, delta=0.2)
    assert opt.param_groups is inner.param_groups and opt.state is inner.state
    assert inner.param_groups[0]["delta"] == 0.2 and inner.param_groups[0]["projection_eps"] == 1e-8
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    _set_grads(params, _grads(params, 0))
    opt.step()
    sched.step()
    assert inner.param_groups[0]["lr"] == pytest.approx(0.05)
    saved = copy.deepcopy(opt.state_dict())
    clone_params = [nn.Parameter(p.detach().clone()) for p in params]
    other = Projected(torch.optim.AdamW(clone_params, lr=0.1))
    other.load_state_dict(saved)
    assert other.param_groups[0]["lr"] == pytest.approx(0.05) and other.param_groups[0]["weight_decay"] == 0.1
    grads = _grads(params, 1)
    _set_grads(params, grads)
    _set_grads(clone_params, grads)
    opt.step()
    other.step()
    for p, q in zip(params, clone_params, strict=True):
        assert torch.equal(p, q)
    opt.zero_grad()
    assert all(p.grad is None for p in params)
    opt.add_param_group({"params": [nn.Parameter(torch.randn(3, 3))], "scale_invariant": False})
    assert inner.param_groups[1]["delta"] == 0.2 and inner.param_groups[1]["scale_invariant"] is False


def test_buffers_only_for_candidates_and_reused() -> None:
    params = _params()
    opt = Projected(torch.optim.AdamW([{"params": params[:3]}, {"params": params[3:], "scale_invariant": False}]))
    ptrs = None
    for step in range(3):
        _set_grads(params, _grads(params, step))
        opt.step()
        now = {id(p): b.data_ptr() for p, b in opt._pre.items()}
        assert set(now) == {id(p) for p in params[:3]}  # ndim >= 2 in a projected group, nothing else
        assert ptrs is None or now == ptrs
        ptrs = now
    assert "exp_avg" in opt.state_dict()["state"][0] and len(opt.state_dict()["state"][0]) == 3  # no buffer in it


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def test_no_host_sync_added_to_the_inner_step() -> None:
    counts = {}
    for wrapped in (False, True):
        params = _params()
        inner = torch.optim.AdamW(params, lr=0.1, weight_decay=0.1, foreach=True)
        opt: torch.optim.Optimizer = Projected(inner) if wrapped else inner
        _set_grads(params, _grads(params, 0))
        opt.step()
        with torch.no_grad(), _CountOps() as c:
            opt.step()
        counts[wrapped] = c.ops
    extra = counts[True] - counts[False]
    assert extra and counts[False] - counts[True] == Counter()
    assert "aten._local_scalar_dense.default" not in extra


class _PlainSGD(torch.optim.Optimizer):
    """A minimal optimizer whose step compiles with ``fullgraph=True`` (torch.optim's graph-break by design)."""

    def __init__(self, params: Any, lr: float, weight_decay: float) -> None:
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for g in self.param_groups:
            ps = [p for p in g["params"] if p.grad is not None]
            torch._foreach_mul_(ps, 1 - g["lr"] * g["weight_decay"])
            torch._foreach_add_(ps, [p.grad for p in ps], alpha=-g["lr"])


def test_compiles_fullgraph() -> None:
    pa, pb = _params(), _params()
    a = Projected(_PlainSGD(pa, lr=0.1, weight_decay=0.1), decoupled_weight_decay=True)
    b = Projected(_PlainSGD(pb, lr=0.1, weight_decay=0.1), decoupled_weight_decay=True)
    step = torch.compile(b.step, fullgraph=True, backend="aot_eager")
    for k in range(2):
        grads = _grads(pa, k)
        _set_grads(pa, grads)
        _set_grads(pb, grads)
        a.step()
        step()
        for p, q in zip(pa, pb, strict=True):
            assert _rel(q, p) <= 1e-6


def test_compiled_adamw_inner_is_adamp() -> None:
    """torch.optim's step graph-breaks around its body (torch's own choice); the rest compiles."""
    pa, pb = _params(), _params()
    a = AdamP(pa, lr=0.05, weight_decay=0.1, foreach=True)
    b = Projected(torch.optim.AdamW(pb, lr=0.05, weight_decay=0.1, foreach=True))
    step = torch.compile(b.step, backend="aot_eager")
    for k in range(2):
        grads = _grads(pa, k)
        _set_grads(pa, grads)
        _set_grads(pb, grads)
        a.step()
        step()
        for p, q in zip(pa, pb, strict=True):
            assert _rel(q, p) <= 1e-6


def test_half_precision_runs_in_float32() -> None:
    pa, pb = _params(torch.bfloat16), _params(torch.bfloat16)
    inner_a = torch.optim.AdamW(pa, lr=0.05, foreach=True)
    b = Projected(torch.optim.AdamW(pb, lr=0.05, foreach=True), track_stats=True)
    grads = _grads(pa, 0)
    _set_grads(pa, grads)
    _set_grads(pb, grads)
    inner_a.step()
    b.step()
    assert all(p.dtype == torch.bfloat16 for p in pb)
    views = list(_views(b).values())
    assert views[0] == 1.0 and torch.equal(pa[-1], pb[-1])
    w = pb[0].detach().float()
    assert not torch.equal(pa[0], pb[0]) and w.norm() < pa[0].detach().float().norm()


def test_stats_and_named_parameters() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(2, 3, 6, 6))
    opt = Projected(torch.optim.AdamW(model.named_parameters(), lr=0.01), track_stats=True)
    model(torch.randn(4, 3, 6, 6)).square().mean().backward()
    opt.step()
    s = opt.stats()
    assert s["0.weight/view"] == 1.0  # the conv before BatchNorm: scale-invariant per channel
    assert s["0.weight/weight_norm"] == pytest.approx(model[0].weight.norm().item(), rel=1e-6)
    assert 0 < s["projected_fraction"] < 1


def test_bad_arguments_are_refused() -> None:
    params = _params()
    with pytest.raises(TypeError, match=r"torch\.optim\.Optimizer"):
        Projected(params)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="wd_ratio"):
        Projected(torch.optim.AdamW(params), wd_ratio=2.0)
    with pytest.raises(ValueError, match="scale_invariant"):
        Projected(torch.optim.AdamW(params), scale_invariant=True)
    with pytest.raises(ValueError, match="already"):
        Projected(Projected(torch.optim.AdamW(params)))

    class Custom(torch.optim.SGD):
        pass

    with pytest.raises(ValueError, match="decoupled_weight_decay"):
        Projected(Custom(params, lr=0.1, weight_decay=0.1))
    Projected(Custom(params, lr=0.1, weight_decay=0.1), decoupled_weight_decay=False)
    Projected(Custom(params, lr=0.1))  # no decay: nothing to know


def _lion(params: Any, **kw: Any) -> torch.optim.Optimizer:
    lion = pytest.importorskip("lion_pytorch")
    return lion.Lion(params, **kw)


INNERS = {
    "adafactor": lambda ps: torch.optim.Adafactor(ps, lr=1e-2, weight_decay=0.1),
    "radam": lambda ps: torch.optim.RAdam(ps, lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True),
    "nadam": lambda ps: torch.optim.NAdam(ps, lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True),
    "lion": lambda ps: _lion(ps, lr=1e-3, weight_decay=0.1),
}


@pytest.mark.parametrize("name", sorted(INNERS))
def test_any_inner_projected_step_is_tangent_plus_reduced_decay(name: str) -> None:
    """For a weight projected in the channel view: w_new = (1 - lr wd wd_ratio) w - t with t orthogonal to
    every row of w; the weights that are not projected get the inner optimizer's step unchanged."""
    pa, pb = _params(), _params()
    ref, opt = INNERS[name](pa), Projected(INNERS[name](pb), track_stats=True)
    lr = opt.param_groups[0]["lr"]
    for step in range(3):
        grads = _grads(pb, step)
        _set_grads(pa, grads)
        _set_grads(pb, grads)
        with torch.no_grad():
            for p, q in zip(pa, pb, strict=True):
                p.copy_(q)
        w0 = pb[0].detach().clone()
        ref.step()
        opt.step()
        assert opt.stats()["group0.param0/view"] == 1.0
        t = ((1 - lr * 0.1 * 0.1) * w0 - pb[0].detach()).reshape(8, -1)
        rows = w0.reshape(8, -1)
        radial = (t * rows).sum(1) / rows.norm(dim=1)
        assert radial.abs().max() <= 1e-4 * t.norm(dim=1).max()
        assert t.norm() > 0 and not torch.equal(pa[0], pb[0])
        # the inner's own decay is radial: with it, the unwrapped step would have shrunk w further
        assert pa[0].norm() < pb[0].norm()
        assert torch.equal(pa[-1], pb[-1])  # the bias: never projected


def test_grad_scaler_unscales_and_skips_like_the_inner_optimizer() -> None:
    pa, pb = _params(), _params()
    a = Projected(torch.optim.AdamW(pa, lr=0.05, weight_decay=0.1))
    b = Projected(torch.optim.AdamW(pb, lr=0.05, weight_decay=0.1))
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for step in range(2):
        grads = _grads(pa, step)
        _set_grads(pa, grads)
        scale = scaler.scale(torch.ones(()))  # what scaler.scale(loss) does before backward
        for q, g in zip(pb, grads, strict=True):
            q.grad = g * scale
        a.step()
        scaler.step(b)  # unscales b's gradients through the shared param_groups, then steps
        scaler.update()
        for p, q in zip(pa, pb, strict=True):
            assert _rel(q, p) <= 1e-6
    before = [q.detach().clone() for q in pb]
    scaler.scale(torch.ones(()))
    for q in pb:
        q.grad = torch.full_like(q, float("inf"))
    scaler.step(b)  # an inf gradient: the step is skipped
    assert all(torch.equal(q, w) for q, w in zip(pb, before, strict=True))


def _adamw8bit(params: Any, **kw: Any) -> torch.optim.Optimizer:
    """torchao's AdamW8bit (skipped without torchao). Its step compiles each parameter's update, which takes
    minutes to warm up on a CPU: the test replaces ``torch.compile`` by the identity, the same math eagerly
    through the same 8-bit state."""
    optim = pytest.importorskip("torchao.optim")
    return optim.AdamW8bit(params, **kw)


EIGHT_BIT_SHAPES = ((16, 32, 3, 3), (32, 16, 3, 3), (64, 128), (16,))


@pytest.mark.parametrize("name", ["lion", "adamw8bit"])
def test_projected_step_is_the_projection_of_the_inner_step(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """From the same weights and state, ``Projected(inner)`` gives the inner optimizer's own step with the
    radial part removed (per row for tensor 0, whose gradient is orthogonal to every row; the whole tensor
    for tensor 1; nothing for the others) and its decoupled decay times wd_ratio, within float32 rounding.
    Lion's and AdamW8bit's states do not depend on the weights, so the two runs keep the same state. With
    AdamW8bit the weights have at least 4096 elements, so that their moments are 8-bit (torchao)."""
    if name == "adamw8bit":
        monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
        make = lambda ps: _adamw8bit(ps, lr=1e-2, weight_decay=0.1)
    else:
        make = lambda ps: _lion(ps, lr=1e-3, weight_decay=0.1)
    torch.manual_seed(0)
    pa = [nn.Parameter(torch.randn(s)) for s in EIGHT_BIT_SHAPES]
    pb = [nn.Parameter(p.detach().clone()) for p in pa]
    ref, opt = make(pa), Projected(make(pb), track_stats=True)
    lr, wd, ratio = 0.0, 0.1, 0.1
    for step in range(3):
        lr = opt.param_groups[0]["lr"]
        grads = _orthogonal_grads(pa, step)
        _set_grads(pa, grads)
        _set_grads(pb, grads)
        w0 = [p.detach().clone() for p in pb]
        ref.step()
        opt.step()
        assert list(_views(opt).values()) == [1.0, 2.0, 0.0, 0.0]
        if name == "adamw8bit" and step == 0:
            assert type(ref.state[pa[0]]["exp_avg"]).__name__ == "OptimState8bit"
        for i, (w, p, q) in enumerate(zip(w0, pa, pb, strict=True)):
            if i >= 2:
                assert torch.equal(p, q)  # not projected: the inner result bit for bit
                continue
            d = ((1 - lr * wd) * w - p.detach()).double()
            rows = w.double().reshape(w.shape[0], -1) if i == 0 else w.double().reshape(1, -1)
            dr = d.reshape(rows.shape)
            c = (rows * dr).sum(1, keepdim=True) / (rows.norm(dim=1, keepdim=True) + 1e-8) ** 2
            expected = ((1 - lr * wd * ratio) * rows - (dr - c * rows)).reshape(w.shape)
            assert _rel(q.detach(), expected) <= 1e-6
            assert _rel(q.detach() - w, expected - w.double()) <= 1e-4  # the step itself, not only the weight
        with torch.no_grad():
            for p, q in zip(pa, pb, strict=True):
                p.copy_(q)  # the same weights again for the next step


def _orthogonal_grads(params: list[nn.Parameter], step: int) -> list[Tensor]:
    """Tensor 0: orthogonal to each row (channel view); tensor 1: to the whole tensor but not its rows
    (layer view); tensor 2 with a large radial part (not projected); the others generic."""
    g = torch.Generator().manual_seed(200 + step)
    out = [torch.randn(p.shape, generator=g) for p in params]
    w0, g0 = params[0].detach().reshape(params[0].shape[0], -1), out[0].reshape(params[0].shape[0], -1)
    g0 -= (g0 * w0).sum(1, keepdim=True) / (w0 * w0).sum(1, keepdim=True) * w0
    w1 = params[1].detach()
    out[1].reshape(w1.shape[0], -1)[:, 0] += 3 * w1.reshape(w1.shape[0], -1)[:, 0].sign()
    out[1] = out[1] - (out[1] * w1).sum() / (w1 * w1).sum() * w1
    out[2] = out[2] + params[2].detach()  # a large radial part: neither view
    return out


@pytest.mark.skipif(not native_backend.available(), reason="no native kernels")
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_row_sums_are_the_torch_row_sums(dtype: torch.dtype, threads: int) -> None:
    """The kernel's one sweep gives the row sums of (w_b, g, scale w_b - w_a) that torch computes from the
    materialised update (to float rounding: another summation order), with rows large enough to be split
    across threads; tensors it cannot read as raw buffers are left to torch (``None``)."""
    torch.manual_seed(0)
    shapes = ((3, 5), (40, 1000), (7, 2, 3, 3), (1, 9))
    wb = [torch.randn(s, dtype=dtype) for s in shapes]
    g = [torch.randn(s, dtype=dtype) for s in shapes]
    wa = [w - 1e-3 * torch.randn(s, dtype=dtype) for w, s in zip(wb, shapes, strict=True)]
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for scale in (1.0, 0.999):
            got = projected_native.row_sums(wb, g, wa, scale)
            assert got is not None and got.dtype == dtype and got.shape == (sum(s[0] for s in shapes), 4)
            if scale == 1.0:
                u = torch._foreach_sub(wb, wa)
            else:
                u = torch._foreach_mul(wb, scale)
                torch._foreach_sub_(u, wa)
            want = projection.channel_row_sums(wb, g, u)
            tol = 1e-5 if dtype == torch.float32 else 1e-13
            nw, ng, nu = (torch.cat([x.reshape(x.shape[0], -1).norm(dim=1) for x in xs]) for xs in (wb, g, u))
            bound = torch.stack([nw * ng, nw * nw, ng * ng, nw * nu], 1)  # |<a,b>| <= |a| |b|
            assert ((got - want).abs() <= tol * bound).all()
            # the two-sweep form: the copy and the first three sums before the step, the projection after it
            bufs = [torch.empty_like(w) for w in wb]
            before = projected_native.before(wb, g, bufs)
            assert all(torch.equal(b, w) for b, w in zip(bufs, wb, strict=True))
            assert ((before[:, :3] - want[:, :3]).abs() <= tol * bound[:, :3]).all() and not before[:, 3].any()
            for mode in ("channel", "layer", False):
                decision = projection.RowDecision(want, [w.shape for w in wb], delta=0.1, eps=1e-8, mode=mode)
                coefs, view, _ = decision.coefficients()
                projected = [(view[i] > 0).to(dtype) * 0.01 for i in range(len(wb))]
                triples = zip(wa, wb, coefs, projected, strict=True)
                expected = [a + (c + e) * b for a, b, c, e in triples]
                got_w = [a.clone() for a in wa]
                projected_native.after(bufs, got_w, before.clone(), view, scale, 1e-8, 0.01)
                for x, y in zip(got_w, expected, strict=True):
                    assert _rel(x, y) <= 10 * tol and (mode is not False or torch.equal(x, y))
    finally:
        torch.set_num_threads(old)
    assert projected_native.row_sums([wb[1].t()], [g[1].t()], [wa[1].t()], 1.0) is None  # not contiguous
    assert projected_native.row_sums(wb, g, wa, torch.tensor(1.0)) is None  # a tensor scale: torch's operations


@pytest.mark.parametrize("layout", [True, False])
def test_a_substituted_flat_partition_is_refused_before_inner_steps(layout: bool) -> None:
    """DeepSpeed ZeRO (or any flattening wrapper) replaces the group's parameters by one flat tensor: the
    projection could never apply to it, so Projected refuses it instead of silently being AdamW."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    opt = torch_adamp.Projected(torch.optim.AdamW(model.parameters(), lr=0.1))
    # layout: a partition whose layout could be recovered (what AdamP/SGDP step exactly)
    flat = one_rank_zero_partition(list(model.parameters()), mapped=layout)
    flat.grad = torch.randn_like(flat)
    opt.param_groups[0]["params"] = [flat]
    before = flat.detach().clone()
    error = NotImplementedError if layout else torch_adamp.distributed.FlatParameterError
    message = "pass torch_adamp.AdamP" if layout else r"parameter #0 \(shape \(21,\)\).*torch_adamp.AdamP or SGDP"
    with pytest.raises(error, match=message):
        opt.step()
    assert torch.equal(flat.detach(), before) and not opt.state
    opt.param_groups[0]["scale_invariant"] = False  # the explicit opt-out: plain AdamW
    opt.step()
    assert not torch.equal(flat.detach(), before)


def test_track_stats_must_be_a_bool() -> None:
    """Hardening round 3, item 6: ``Projected(track_stats="no")`` used to turn statistics on."""
    inner = torch.optim.AdamW([torch.nn.Parameter(torch.randn(3, 2))])
    with pytest.raises(ValueError, match="Invalid track_stats value: 'no'"):
        Projected(inner, track_stats="no")  # type: ignore[arg-type]
