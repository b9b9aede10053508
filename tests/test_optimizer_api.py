"""The ``torch.optim.Optimizer`` contract of AdamP and SGDP.

Argument validation (constructor and ``add_param_group``), sparse-gradient
refusal, closures, every ``torch.optim.lr_scheduler`` (float and tensor lr),
``zero_grad``, ``maximize``, ``add_param_group``, SGDP's ``project_momentum``
and ``scale_invariant="auto"``. Where the reference package ``adamp==0.3.0``
has the feature, the per-tensor path must match it bitwise.
"""

from __future__ import annotations

import copy
import math
import re
from typing import Any

import helpers
import pytest
import torch
from helpers import PATHS, make_model, make_ours, make_reference, path_kwargs, run_lockstep
from torch import Tensor, nn
from torch.optim import lr_scheduler as sched

from torch_adamp import SGDP, AdamP

CLASSES = {"adamp": AdamP, "sgdp": SGDP}
BASE = helpers.BASE_OPTIONS


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from helpers.one_thread()


def _params() -> list[nn.Parameter]:
    torch.manual_seed(0)
    return [nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(4))]


# -- argument validation ------------------------------------------------------------------------

INVALID: list[tuple[str, dict[str, Any], str, Any]] = [
    # (optimizer, bad options, argument the message must name, value it must show)
    ("adamp", {"lr": -1e-3}, "lr", -1e-3),
    ("adamp", {"lr": float("nan")}, "lr", float("nan")),
    ("adamp", {"lr": torch.tensor(-1.0)}, "lr", None),
    ("adamp", {"betas": (1.0, 0.999)}, "beta", 1.0),
    ("adamp", {"betas": (-0.1, 0.999)}, "beta", -0.1),
    ("adamp", {"betas": (0.9, 1.0)}, "beta", 1.0),
    ("adamp", {"betas": (0.9, 1.5)}, "beta", 1.5),
    ("adamp", {"eps": -1e-8}, "eps", -1e-8),
    ("adamp", {"weight_decay": -0.1}, "weight_decay", -0.1),
    ("adamp", {"delta": -0.1}, "delta", -0.1),
    ("adamp", {"wd_ratio": -0.1}, "wd_ratio", -0.1),
    ("adamp", {"wd_ratio": 1.5}, "wd_ratio", 1.5),
    ("sgdp", {"lr": -0.1}, "lr", -0.1),
    ("sgdp", {"momentum": -0.5}, "momentum", -0.5),
    ("sgdp", {"dampening": -0.5}, "dampening", -0.5),
    ("sgdp", {"eps": -1.0}, "eps", -1.0),
    ("sgdp", {"weight_decay": -1e-4}, "weight_decay", -1e-4),
    ("sgdp", {"delta": -0.1}, "delta", -0.1),
    ("sgdp", {"wd_ratio": -0.5}, "wd_ratio", -0.5),
    ("sgdp", {"wd_ratio": 2.0}, "wd_ratio", 2.0),
    ("sgdp", {"nesterov": "no"}, "nesterov", "no"),
    ("adamp", {"maximize": 1}, "maximize", 1),
    ("sgdp", {"project_momentum": None}, "project_momentum", None),
    ("adamp", {"foreach": "yes"}, "foreach", "yes"),
]


def _check_message(err: pytest.ExceptionInfo, name: str, value: Any) -> None:
    message = str(err.value)
    assert name in message, message
    if value is not None:
        assert repr(value) in message or str(value) in message, message


def _ids(case: tuple) -> str:
    kind, opts, _, _ = case
    return kind + "-" + "-".join(f"{k}={v}" for k, v in opts.items())


@pytest.mark.parametrize("case", INVALID, ids=[_ids(c) for c in INVALID])
def test_invalid_arguments_in_constructor(case) -> None:
    kind, bad, name, value = case
    with pytest.raises(ValueError) as err:
        CLASSES[kind](_params(), **{**BASE[kind], **bad})
    _check_message(err, name, value)


@pytest.mark.parametrize("case", INVALID, ids=[_ids(c) for c in INVALID])
def test_invalid_arguments_in_param_groups(case) -> None:
    """The same checks apply to groups given to the constructor and to ``add_param_group``."""
    kind, bad, name, value = case
    a, b = _params()
    with pytest.raises(ValueError) as err:
        CLASSES[kind]([{"params": [a]}, {"params": [b], **bad}], **BASE[kind])
    _check_message(err, name, value)

    opt = CLASSES[kind]([a], **BASE[kind])
    with pytest.raises(ValueError) as err:
        opt.add_param_group({"params": [b], **bad})
    _check_message(err, name, value)
    assert len(opt.param_groups) == 1  # nothing was added


@pytest.mark.parametrize("kind", CLASSES)
def test_valid_edge_values_are_accepted(kind: str) -> None:
    edge = {"lr": 0.0, "eps": 0.0, "weight_decay": 0.0, "delta": 0.0, "wd_ratio": 0.0}
    CLASSES[kind](_params(), **{**BASE[kind], **edge})
    CLASSES[kind](_params(), **{**BASE[kind], "wd_ratio": 1.0})
    if kind == "adamp":
        AdamP(_params(), betas=(0.0, 0.0))
    else:
        SGDP(_params(), lr=0.1, momentum=0.9, nesterov=True)


@pytest.mark.parametrize(
    ("kind", "bad"),
    [
        ("adamp", {"momentum": 0.9}),
        ("adamp", {"amsgrad": True}),
        ("sgdp", {"betas": (0.9, 0.999)}),
        ("sgdp", {"lrr": 1}),
    ],
)
def test_unknown_keyword_is_a_type_error(kind: str, bad: dict[str, Any]) -> None:
    with pytest.raises(TypeError, match=re.escape(next(iter(bad)))):
        CLASSES[kind](_params(), **{**BASE[kind], **bad})


def test_sgdp_requires_lr() -> None:
    with pytest.raises(ValueError, match="no lr"):  # as the reference: lr is required, in the call or in every group
        SGDP(_params())


# -- sparse gradients ------------------------------------------------------------------------------


class _SparseModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Linear(4, 3)
        self.emb = nn.Embedding(10, 4, sparse=True)

    def forward(self, idx: Tensor) -> Tensor:
        return self.dense(self.emb(idx)).sum()


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("kind", CLASSES)
@pytest.mark.parametrize("named", [True, False])
def test_sparse_gradient_is_refused_before_anything_changes(kind: str, path: str, named: bool) -> None:
    torch.manual_seed(0)
    model = _SparseModel()
    params = model.named_parameters() if named else model.parameters()
    opt = CLASSES[kind](params, **BASE[kind], weight_decay=0.1, **path_kwargs(path))
    # a first step on the dense parameters only, so that there is state to protect
    model.dense(torch.randn(2, 4)).sum().backward()
    opt.step()
    opt.zero_grad()
    model(torch.tensor([1, 2, 3])).backward()
    assert model.emb.weight.grad.is_sparse and model.dense.weight.grad is not None
    params_before = copy.deepcopy(model.state_dict())
    state_before = copy.deepcopy(opt.state_dict())

    with pytest.raises(RuntimeError) as err:
        opt.step()
    message = str(err.value)
    assert "sparse" in message
    if named:
        assert "'emb.weight'" in message, message
    else:
        assert "(10, 4)" in message, message

    for k, v in model.state_dict().items():
        assert torch.equal(v, params_before[k]), k
    state_after = opt.state_dict()
    assert state_after["state"].keys() == state_before["state"].keys()
    for i, st in state_after["state"].items():
        for k, v in st.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(state_before["state"][i][k])), (i, k)


# -- closure -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("kind", CLASSES)
def test_closure_runs_with_grad_enabled(kind: str, path: str) -> None:
    model, loss_at = make_model("linear_ln")
    opt = CLASSES[kind](model.parameters(), **BASE[kind], **path_kwargs(path))
    seen = []

    def closure() -> Tensor:
        seen.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = loss_at(0)
        loss.backward()
        return loss

    before = [p.detach().clone() for p in model.parameters()]
    loss = opt.step(closure)
    with torch.no_grad():  # the closure must still be able to build a graph
        loss2 = opt.step(closure)
    assert seen == [True, True]
    assert isinstance(loss, Tensor) and loss.requires_grad and loss2.requires_grad
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))


# -- learning-rate schedulers --------------------------------------------------------------------------


def _schedulers(opt: torch.optim.Optimizer, lr: float) -> dict[str, Any]:
    """Every scheduler of ``torch.optim.lr_scheduler``, built lazily on ``opt``."""
    return {
        "LambdaLR": lambda: sched.LambdaLR(opt, lambda e: 0.9**e),
        "MultiplicativeLR": lambda: sched.MultiplicativeLR(opt, lambda e: 0.95),
        "StepLR": lambda: sched.StepLR(opt, step_size=3, gamma=0.5),
        "MultiStepLR": lambda: sched.MultiStepLR(opt, milestones=[2, 5], gamma=0.5),
        "ConstantLR": lambda: sched.ConstantLR(opt, factor=0.5, total_iters=4),
        "LinearLR": lambda: sched.LinearLR(opt, start_factor=0.2, total_iters=5),
        "ExponentialLR": lambda: sched.ExponentialLR(opt, gamma=0.9),
        "PolynomialLR": lambda: sched.PolynomialLR(opt, total_iters=8, power=2.0),
        "CosineAnnealingLR": lambda: sched.CosineAnnealingLR(opt, T_max=6),
        "CosineAnnealingWarmRestarts": lambda: sched.CosineAnnealingWarmRestarts(opt, T_0=4),
        "CyclicLR": lambda: sched.CyclicLR(opt, base_lr=lr / 10, max_lr=lr, step_size_up=3),
        "OneCycleLR": lambda: sched.OneCycleLR(opt, max_lr=lr, total_steps=12),
        "ReduceLROnPlateau": lambda: sched.ReduceLROnPlateau(opt, patience=1, factor=0.5),
        "SequentialLR": lambda: sched.SequentialLR(
            opt, [sched.LinearLR(opt, 0.5, total_iters=3), sched.ExponentialLR(opt, 0.9)], milestones=[3]
        ),
        "ChainedScheduler": lambda: sched.ChainedScheduler(
            [sched.ConstantLR(opt, 0.5, total_iters=3), sched.ExponentialLR(opt, 0.9)]
        ),
    }


SCHEDULERS = list(_schedulers(None, 1.0))  # type: ignore[arg-type]


def test_every_scheduler_is_covered() -> None:
    exported = {n for n in sched.__all__ if n != "LRScheduler"}
    assert exported <= set(SCHEDULERS), exported - set(SCHEDULERS)


def _run_scheduled(opt, scheduler, loss_at, steps: int) -> list[float]:
    lrs = []
    for step in range(steps):
        opt.zero_grad()
        loss_at(step).backward()
        opt.step()
        if isinstance(scheduler, sched.ReduceLROnPlateau):
            scheduler.step(1.0)  # a constant metric: the plateau logic, independent of rounding
        else:
            scheduler.step()
        lrs.extend(float(g["lr"]) for g in opt.param_groups)
    return lrs


@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float-lr", "tensor-lr"])
@pytest.mark.parametrize("kind", CLASSES)
@pytest.mark.parametrize("name", SCHEDULERS)
def test_scheduler_matches_reference(name: str, kind: str, tensor_lr: bool) -> None:
    """12 steps under the scheduler: the same learning rates (and betas / momentum, which
    CyclicLR and OneCycleLR cycle) as the reference; parameters bitwise equal for a float lr
    (per-tensor path), within 1e-6 for a tensor lr (float32 lr, different op order)."""
    ref_model, ref_loss = make_model("linear_ln")
    model = helpers.clone_model(ref_model)
    loss_at = helpers.loss_fn(model, "linear_ln")
    lr = BASE[kind]["lr"]
    ref = make_reference(kind, ref_model, BASE[kind])
    ours_opts = {**BASE[kind], "foreach": False}
    if tensor_lr:
        ours_opts["lr"] = torch.tensor(lr)
    ours = make_ours(kind, model, ours_opts)
    ref_lrs = _run_scheduled(ref, _schedulers(ref, lr)[name](), ref_loss, 12)
    our_lrs = _run_scheduled(ours, _schedulers(ours, lr)[name](), loss_at, 12)

    assert len(set(ref_lrs)) > 1  # the schedule did change the learning rate
    for key in ("betas", "momentum"):
        assert [g.get(key) for g in ours.param_groups] == [g.get(key) for g in ref.param_groups]
    if tensor_lr:
        assert all(isinstance(g["lr"], Tensor) for g in ours.param_groups)
        assert our_lrs == pytest.approx(ref_lrs, rel=1e-6)
        assert helpers.max_rel_diff(model.parameters(), ref_model.parameters()) <= 1e-6
    else:
        assert our_lrs == ref_lrs
        for p, rp in zip(model.parameters(), ref_model.parameters(), strict=True):
            assert torch.equal(p, rp)


# -- zero_grad, maximize, add_param_group ---------------------------------------------------------------


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("kind", CLASSES)
def test_zero_grad_set_to_none_then_step_is_a_no_op(kind: str, path: str) -> None:
    model, loss_at = make_model("conv_bn")
    opt = CLASSES[kind](model.parameters(), **BASE[kind], weight_decay=0.1, **path_kwargs(path))
    loss_at(0).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in model.parameters())
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    opt.step()
    assert all(torch.equal(a, p) for a, p in zip(params, model.parameters(), strict=True))
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(state["state"][i][k]))

    loss_at(1).backward()
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("option_set", ["adamp-nesterov-wd", "sgdp-momentum-dampening", "sgdp-nesterov-wd"])
def test_maximize_equals_minimising_the_negated_loss(option_set: str, path: str) -> None:
    """Negating a loss negates every gradient exactly, so the two runs must be bitwise equal."""
    o = helpers.OPTION_SETS[option_set]
    model_max, loss_max = make_model("conv_bn")
    model_min = helpers.clone_model(model_max)
    loss_min = helpers.loss_fn(model_min, "conv_bn")
    opt_max = make_ours(o.kind, model_max, {**o.options, "maximize": True, **path_kwargs(path)})
    opt_min = make_ours(o.kind, model_min, {**o.options, **path_kwargs(path)})
    for step in range(20):
        for opt, objective in ((opt_max, lambda s: -loss_max(s)), (opt_min, loss_min)):
            opt.zero_grad()
            objective(step).backward()
            opt.step()
    for a, b in zip(model_max.parameters(), model_min.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", CLASSES)
def test_maximize_goes_uphill(kind: str) -> None:
    model, loss_at = make_model("linear_ln")
    opt = CLASSES[kind](model.parameters(), **BASE[kind], maximize=True)
    start = loss_at(0).item()
    for _ in range(10):
        opt.zero_grad()
        loss_at(0).backward()
        opt.step()
    assert loss_at(0).item() > start


@pytest.mark.parametrize("kind", CLASSES)
def test_add_param_group_matches_reference(kind: str) -> None:
    """Start with some parameters, add the rest as a group with other options after 5 steps;
    per-tensor path bitwise equal to the reference doing the same; new groups get our defaults."""
    ref_model, ref_loss = make_model("conv_bn")
    model = helpers.clone_model(ref_model)
    loss_at = helpers.loss_fn(model, "conv_bn")
    extra = {"adamp": {"lr": 5e-4, "weight_decay": 0.1, "nesterov": True}, "sgdp": {"lr": 0.02, "dampening": 0.3}}
    ref_params, params = list(ref_model.parameters()), list(model.parameters())
    ref = {"adamp": helpers.reference.AdamP, "sgdp": helpers.reference.SGDP}[kind](ref_params[:4], **BASE[kind])
    ours = CLASSES[kind](params[:4], **BASE[kind], foreach=False)
    for step in range(15):
        if step == 5:
            ref.add_param_group({"params": ref_params[4:], **extra[kind]})
            ours.add_param_group({"params": params[4:], **extra[kind]})
            new = ours.param_groups[1]
            assert new["foreach"] is False and new["scale_invariant"] == "auto" and new["delta"] == 0.1
        for opt, m, f in ((ref, ref_model, ref_loss), (ours, model, loss_at)):
            m.zero_grad()
            f(step).backward()
            opt.step()
    for p, rp in zip(params, ref_params, strict=True):
        assert torch.equal(p, rp)


@pytest.mark.parametrize("kind", CLASSES)
def test_add_param_group_accepts_generators_and_names(kind: str) -> None:
    """``params`` given as a generator (consumed once), of tensors or of ``named_parameters()`` pairs."""
    model, loss_at = make_model("mlp")
    first, *rest = list(model.named_parameters())
    opt = CLASSES[kind]([first], **BASE[kind])
    opt.add_param_group({"params": (pair for pair in rest[:2])})
    opt.add_param_group({"params": iter(rest[2:]), "lr": BASE[kind]["lr"] / 2})
    assert [len(g["params"]) for g in opt.param_groups] == [1, 2, len(rest) - 2]
    assert opt.param_groups[1]["param_names"] == [n for n, _ in rest[:2]]

    plain = CLASSES[kind]([model.net[0].weight], **BASE[kind])
    plain.add_param_group({"params": (p for p in [model.net[0].bias])})
    assert plain.param_groups[1]["params"] == [model.net[0].bias]
    before = [p.detach().clone() for p in model.parameters()]
    loss_at(0).backward()
    opt.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))


# -- SGDP project_momentum=False ------------------------------------------------------------------------


def _expected_sgdp(w0: Tensor, grads: list[Tensor], *, lr, momentum, dampening, nesterov, weight_decay, wd_ratio,
                   delta, eps, project_momentum):  # fmt: skip
    """SGDP written from the spec (docs/algorithm), float64, one tensor: returns (w, buffer)."""
    w, buf = w0.clone(), torch.zeros_like(w0)
    for g in grads:
        buf = momentum * buf + (1 - dampening) * g
        d = g + momentum * buf if nesterov else buf.clone()
        ratio = 1.0
        for rows in (w.shape[0], 1):
            w2, g2 = w.reshape(rows, -1), g.reshape(rows, -1)
            cos = (w2 * g2).sum(1).abs() / (g2.norm(dim=1).clamp_min(eps) * w2.norm(dim=1).clamp_min(eps))
            if cos.max() < delta / math.sqrt(w2.shape[1]):
                phat = w2 / (w2.norm(dim=1, keepdim=True) + eps)
                d = (d.reshape(rows, -1) - phat * (phat * d.reshape(rows, -1)).sum(1, keepdim=True)).reshape(w.shape)
                ratio = wd_ratio
                break
        if project_momentum and not nesterov:
            buf = d.clone()
        w = w * (1 - lr * weight_decay * ratio / (1 - momentum)) - lr * d
    return w, buf


def _gradient(w: Tensor, gen: torch.Generator, orthogonal: bool) -> Tensor:
    """A random gradient, made orthogonal to each row of ``w`` (so that the channel test passes) or not."""
    g = torch.randn(w.shape, generator=gen, dtype=torch.float64)
    if orthogonal:
        w2, g2 = w.reshape(w.shape[0], -1), g.reshape(w.shape[0], -1)
        g = (g2 - (g2 * w2).sum(1, keepdim=True) / (w2 * w2).sum(1, keepdim=True) * w2).reshape(w.shape)
    return g


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("project_momentum", [False, True])
def test_sgdp_project_momentum_against_hand_written(project_momentum: bool, nesterov: bool, path: str) -> None:
    """``project_momentum=False`` keeps the raw buffer ``sum momentum^k (1 - dampening) g``; True (the
    default, the reference) stores the projected buffer when not nesterov. Weights and buffer within
    1e-12 (float64) of the spec written out by hand; True on the per-tensor path bitwise equals the reference."""
    opts = {"lr": 0.1, "momentum": 0.9, "dampening": 0.0 if nesterov else 0.2, "nesterov": nesterov}
    opts |= {"weight_decay": 1e-3, "wd_ratio": 0.1, "delta": 0.1, "eps": 1e-8}
    gen = torch.Generator().manual_seed(2)
    w0 = torch.randn(5, 3, 2, generator=gen, dtype=torch.float64)
    w = nn.Parameter(w0.clone())
    ref_w = nn.Parameter(w0.clone())
    ours = SGDP([w], **opts, project_momentum=project_momentum, **path_kwargs(path))
    ref = helpers.reference.SGDP([ref_w], **opts)
    raw = torch.zeros_like(w0)
    grads = []
    for i in range(12):  # two projected steps, then one that is not
        g = _gradient(w.detach(), gen, orthogonal=i % 3 != 2)
        grads.append(g)
        w.grad, ref_w.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
        raw = opts["momentum"] * raw + (1 - opts["dampening"]) * g  # the buffer without any projection
    exp_w, exp_buf = _expected_sgdp(w0, grads, **opts, project_momentum=project_momentum)
    buf = ours.state[w]["momentum"]
    assert helpers.rel_diff(w, exp_w) <= 1e-12
    assert helpers.rel_diff(buf, exp_buf) <= 1e-12
    if project_momentum and not nesterov:
        assert helpers.rel_diff(buf, raw) > 1e-3  # the projection did touch the buffer
        if path == "single":
            assert torch.equal(w, ref_w) and torch.equal(buf, ref.state[ref_w]["momentum"])
    else:
        assert helpers.rel_diff(buf, raw) <= 1e-12
        if nesterov and path == "single":
            assert torch.equal(w, ref_w) and torch.equal(buf, ref.state[ref_w]["momentum"])
        if not nesterov:
            assert helpers.rel_diff(w, ref_w) > 1e-6  # differs from the reference, by design


# -- scale_invariant="auto" ---------------------------------------------------------------------------------


@pytest.mark.parametrize("option_set", ["adamp-groups", "sgdp-groups"])
def test_explicit_auto_equals_reference(option_set: str) -> None:
    o = helpers.OPTION_SETS[option_set]
    result = run_lockstep(o.kind, "conv_bn", {**o.options, "scale_invariant": "auto"}, ["single", "foreach"], steps=30)
    assert not result.mismatches and result.first_inexact["single"] is None
    assert result.final_rel["foreach"] <= 1e-6
    assert result.decision_counts["channel"] > 0


def test_shared_models_are_deterministic() -> None:
    """Sanity of the shared fixtures: the same model and batches on each call."""
    a, la = make_model("conv_bn")
    b, lb = make_model("conv_bn")
    assert la(0).item() == lb(0).item()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_sgdp_needs_no_top_level_lr_when_every_group_has_one() -> None:
    """Hardening round 2, item 2 (found by another project's optimizer suite): SGDP takes lr from the groups alone."""
    a, b = helpers.small_params(), helpers.small_params(1)
    opt = SGDP([{"params": a, "lr": 0.1}, {"params": b, "lr": 0.01}], momentum=0.9)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.01]
    helpers.random_grads(a + b, 2)
    opt.step()
    with pytest.raises(ValueError, match="lr"):
        SGDP(
            [{"params": helpers.small_params(), "lr": 0.1}, {"params": helpers.small_params(1)}]
        )  # one group without any lr
    with pytest.raises(ValueError, match="lr"):
        SGDP(helpers.small_params())


@pytest.mark.parametrize("shape", [(), (1,), (1, 1)], ids=["0d", "1", "1x1"])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", list(helpers.SMALL_MAKERS))
def test_one_element_tensor_lr(kind: str, path: str, shape: tuple[int, ...]) -> None:
    """Hardening round 2, item 3 (found by another project's optimizer suite): any one-element tensor lr, on every
    path, and never a half-applied step."""
    results = []
    for lr in (0.01, torch.full(shape, 0.01)):
        params = helpers.small_params()
        cls = AdamP if kind == "adamp" else SGDP
        extra = {"momentum": 0.9} if kind == "sgdp" else {}
        opt = cls(params, lr=lr, weight_decay=0.1, **extra, **path_kwargs(path))
        for k in range(3):
            helpers.random_grads(params, k)
            opt.step()
        results.append([p.detach().clone() for p in params])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.int16, torch.uint8, torch.bool, torch.int32, torch.int64, torch.float8_e4m3fn])
@pytest.mark.parametrize("kind", list(helpers.SMALL_MAKERS))
def test_non_float_parameters_are_refused(kind: str, dtype: torch.dtype) -> None:
    """Hardening round 2, item 8 (found by another project's optimizer suite): non-float parameters are refused by
    name, at construction and add_param_group."""
    bad = torch.zeros(4, 3, dtype=dtype)
    with pytest.raises(ValueError, match=r"'bad'.*dtype"):
        helpers.SMALL_MAKERS[kind]([("ok", torch.nn.Parameter(torch.zeros(3))), ("bad", bad)])
    opt = helpers.SMALL_MAKERS[kind](helpers.small_params())
    with pytest.raises(ValueError, match="dtype"):
        opt.add_param_group({"params": [bad]})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize(
    ("kind", "key", "value", "match"),
    [
        ("adamp", "betas", (1.0, 0.999), "beta parameter at index 0"),
        ("adamp", "eps", -1e-8, "eps"),
        ("adamp", "nesterov", "no", "nesterov"),
        ("sgdp", "momentum", 1.0, "momentum"),
        ("sgdp", "wd_ratio", 2.0, "wd_ratio"),
        ("sgdp", "lr", torch.tensor([0.1, 0.1]), "lr"),
    ],
)
def test_a_group_value_changed_mid_run_is_refused_at_step(kind: str, key: str, value: Any, match: str) -> None:
    """Hardening round 3, item 3: values refused at construction used to be accepted once the run had started
    (``group["betas"] = (1.0, 0.999)`` made every parameter NaN). Refused at the next step, naming the
    argument, before anything changes."""
    params = helpers.small_params()
    opt = helpers.SMALL_MAKERS[kind](params)
    helpers.random_grads(params, 0)
    opt.step()
    opt.param_groups[0][key] = value
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match=match):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, params, strict=True))


def test_group_values_are_checked_only_when_they_change(monkeypatch: pytest.MonkeyPatch) -> None:
    """The step-time check compares the values (a tuple of Python objects), and checks only what changed:
    not a per-step cost of the checks themselves; a tensor lr is never read."""
    params = helpers.small_params()
    opt = AdamP(params, lr=torch.tensor(1e-3))
    calls = []
    check = opt._check_group
    monkeypatch.setattr(opt, "_check_group", lambda group: calls.append(1) or check(group))
    reads = []
    monkeypatch.setattr(torch.Tensor, "item", lambda self: reads.append(1) or 0.0)
    for step in range(5):
        helpers.random_grads(params, step)
        opt.step()
    assert len(calls) == 1  # the first step; the lr tensor's value changing in place is data, not a change
    opt.param_groups[0]["lr"].fill_(3e-4)
    opt.param_groups[0]["weight_decay"] = 0.1  # a scheduler or a user
    opt.step()
    assert len(calls) == 2


@pytest.mark.parametrize(
    ("fn", "kwargs", "match"),
    [
        ("adamp", {"beta1": 1.0}, "beta1"),
        ("adamp", {"eps": -1.0}, "eps"),
        ("sgdp", {"momentum": 1.0, "weight_decay": 0.1}, "momentum"),
        ("sgdp", {"wd_ratio": -0.1}, "wd_ratio"),
    ],
)
def test_the_functional_api_refuses_what_the_classes_refuse(fn: str, kwargs: dict[str, Any], match: str) -> None:
    """Hardening round 3, item 3: ``torch_adamp.adamp(beta1=1.0)`` used to make every parameter NaN."""
    import torch_adamp

    p, g = [torch.randn(4, 3)], [torch.randn(4, 3)]
    common = dict(lr=1e-3, eps=1e-8, weight_decay=0.0, delta=0.1, wd_ratio=0.1, nesterov=False)
    before = p[0].clone()
    with pytest.raises(ValueError, match=match):
        if fn == "adamp":
            torch_adamp.adamp(p, g, [torch.zeros(4, 3)], [torch.zeros(4, 3)], [torch.tensor(0.0)],
                              **{**common, "beta1": 0.9, "beta2": 0.999, **kwargs})  # fmt: skip
        else:
            torch_adamp.sgdp(p, g, [torch.zeros(4, 3)], **{**common, "momentum": 0.9, "dampening": 0.0, **kwargs})
    assert torch.equal(before, p[0])


def test_smaller_hardening_items() -> None:
    """Hardening round 3, item 6: a meta-device tensor lr names lr; fused=True on meta parameters names the
    device; tensor betas are taken as torch.optim.Adam takes them (the same numbers as floats)."""
    import torch_adamp

    with pytest.raises(ValueError, match="Invalid lr value: a tensor on the meta device"):
        AdamP([torch.nn.Parameter(torch.randn(2, 2))], lr=torch.tensor(1e-3, device="meta"))
    p = torch.nn.Parameter(torch.randn(2, 2, device="meta"))
    p.grad = torch.randn(2, 2, device="meta")
    with pytest.raises(ValueError, match="fused=True cannot step parameters on the meta device"):
        AdamP([p], fused=True).step()
    AdamP([p]).step()  # the default off the CPU: the multi-tensor path, which meta tensors run through
    results = []
    b1, b2 = torch.tensor(0.8), torch.tensor(0.99)  # float32: their values are not the floats 0.8 and 0.99
    for betas in ((b1, b2), (float(b1), float(b2))):
        ps = helpers.small_params()
        opt = torch_adamp.AdamP(ps, betas=betas, weight_decay=0.1)
        for k in range(3):
            helpers.random_grads(ps, k)
            opt.step()
        results.append([q.detach().clone() for q in ps])
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))
    with pytest.raises(ValueError, match="beta parameter at index 0"):
        AdamP(helpers.small_params(), betas=(torch.tensor([0.9, 0.9]), 0.999))
