"""``corrected_weight_decay``: AdamC's decay (Defazio et al. 2025, arXiv 2506.02285), ``lr / lr_max`` times.

Anchors: ``AdamP(scale_invariant=False, corrected_weight_decay="all")`` equals timm's ``adamc``
(``AdamWLegacy(corrected_weight_decay=True)``) and pytorch_optimizer's ``AdamC`` with every group
``normalized``, step by step under a cosine schedule to zero, within float32 rounding. The
decision-dependent form (``True``) is, on every path, *bit for bit* the optimizer whose ``wd_ratio`` is
``wd_ratio lr / lr_max`` at that step (``"all"``: whose ``weight_decay`` is ``weight_decay lr / lr_max``):
the correction enters the decay as those numbers on every path (``engine.tail.decay_terms``), native kernel
included; the defaults keep their bits (tests/test_golden.py).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
import types
from collections.abc import Callable
from typing import Any

import pytest
import torch
from helpers import fused_backend
from torch import Tensor, nn

import torch_adamp
from torch_adamp import SGDP, AdamP, Projected

SHAPES = ((8, 3, 3, 3), (6, 4, 3, 3), (10, 5), (12, 7), (7,))
STEPS = 12
LR = 0.05
PATHS = {
    "single": {"foreach": False},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
    "default": {},
}


def _params(dtype: torch.dtype = torch.float32, seed: int = 0) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64).to(dtype)) for s in SHAPES]


def _grads(params: list[Tensor], step: int) -> list[Tensor]:
    """Orthogonal per channel (tensor 0, channel view), to the whole tensor (tensor 1, layer view on even
    steps), generic (the others): every decision occurs, and changes between steps."""
    g = torch.Generator().manual_seed(100 + step)
    out = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]
    w0, g0 = params[0].detach().double().reshape(8, -1), out[0].reshape(8, -1)
    g0 -= (g0 * w0).sum(1, keepdim=True) / (w0 * w0).sum(1, keepdim=True) * w0
    if step % 2 == 0:
        w1 = params[1].detach().double()
        out[1] = out[1] - (out[1] * w1).sum() / (w1 * w1).sum() * w1
    for i in (2, 3):  # a large radial part: never projected
        out[i] = out[i] + params[i].detach().double()
    return [o.to(p.dtype) for o, p in zip(out, params, strict=True)]


def cosine(step: int, lr: float = LR, steps: int = STEPS) -> float:
    """A cosine schedule to zero: ``lr`` at step 0, 0 after the last."""
    return 0.5 * lr * (1 + math.cos(math.pi * step / steps))


def _run(make: Callable[[list[nn.Parameter]], Any], set_lr: Callable[[Any, int], None], params=None) -> list[Tensor]:
    params = params if params is not None else _params()
    opt = make(params)
    for step in range(STEPS):
        set_lr(opt, step)
        for p, g in zip(params, _grads(params, step), strict=True):
            p.grad = g
        opt.step()
    return [p.detach().clone() for p in params]


def _cosine_lr(opt: Any, step: int) -> None:
    for group in opt.param_groups:
        if isinstance(group["lr"], Tensor):  # a tensor lr (the compile path's: no recompilation) set in place
            group["lr"].fill_(cosine(step))
        else:
            group["lr"] = cosine(step)


# -- the references ----------------------------------------------------------------------------


def _timm_adamw_legacy() -> type[torch.optim.Optimizer]:
    """timm's ``AdamWLegacy`` (its ``adamc``), loaded from the installed files where ``import timm`` fails
    (timm imports torchvision, absent beside the CPU torch; tests/test_timm.py does the same)."""
    spec = importlib.util.find_spec("timm") if "timm" not in sys.modules else sys.modules["timm"].__spec__
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("timm is not installed (pip install --no-deps timm)")
    try:
        return importlib.import_module("timm.optim.adamw").AdamWLegacy  # type: ignore[no-any-return]
    except Exception:
        pass
    saved = {m: sys.modules[m] for m in list(sys.modules) if m == "timm" or m.startswith("timm.")}
    for m in saved:
        del sys.modules[m]
    root = next(iter(spec.submodule_search_locations))
    try:
        for name, folder in (("timm", root), ("timm.optim", f"{root}/optim")):
            package = types.ModuleType(name)
            package.__path__ = [folder]
            sys.modules[name] = package
        return importlib.import_module("timm.optim.adamw").AdamWLegacy  # type: ignore[no-any-return]
    finally:
        for m in [m for m in sys.modules if m == "timm" or m.startswith("timm.")]:
            del sys.modules[m]
        sys.modules.update(saved)


def _close(a: list[Tensor], b: list[Tensor], rtol: float, atol: float) -> None:
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


@pytest.mark.parametrize("path", [*PATHS, "compile"])
def test_all_is_timm_adamc(path: str) -> None:
    """``corrected_weight_decay="all"`` without the projection is timm's ``adamc`` (``wd_scale = lr**2 /
    max_lr``, ``max_lr`` the constructor's lr): the same ``lr_max`` here (the group's lr when it is added)."""
    AdamWLegacy = _timm_adamw_legacy()
    ref = _run(lambda ps: AdamWLegacy(ps, lr=LR, weight_decay=0.5, corrected_weight_decay=True), _cosine_lr)
    kw: dict[str, Any] = {"fused": True, "lr": torch.tensor(LR)} if path == "compile" else {"lr": LR, **PATHS[path]}
    with fused_backend("compile" if path == "compile" else "auto", compiler="eager"):
        ours = _run(
            lambda ps: AdamP(ps, weight_decay=0.5, scale_invariant=False, corrected_weight_decay="all", **kw),
            _cosine_lr,
        )
    _close(ours, ref, rtol=2e-6, atol=2e-6)
    # and the correction is not nothing: without it the weights differ by far more than the tolerance
    plain = _run(lambda ps: AdamP(ps, lr=LR, weight_decay=0.5, scale_invariant=False), _cosine_lr)
    assert max((a - b).abs().max().item() for a, b in zip(plain, ref, strict=True)) > 1e-3


@pytest.mark.parametrize("path", list(PATHS))
def test_all_is_pytorch_optimizer_adamc_normalized(path: str) -> None:
    """pytorch_optimizer's ``AdamC`` with every group ``normalized=True`` (its ``max_lr``: the constructor's
    lr). Its denominator is ``(sqrt(v + 1e-15) + eps) / sqrt(1 - b2^t)``, AdamP's ``sqrt(v) / sqrt(1 - b2^t) +
    eps`` (torch's AdamW): matched with ``eps=0`` on both sides (no gradient element is zero here)."""
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
    ref = _run(
        lambda ps: pytorch_optimizer.AdamC([{"params": ps, "normalized": True}], lr=LR, weight_decay=0.5, eps=0.0),
        _cosine_lr,
    )
    ours = _run(
        lambda ps: AdamP(
            ps, lr=LR, weight_decay=0.5, eps=0.0, scale_invariant=False, corrected_weight_decay="all", **PATHS[path]
        ),
        _cosine_lr,
    )
    _close(ours, ref, rtol=2e-6, atol=2e-6)


# -- the decision-dependent form, on every path: exactly the ratio lr / lr_max in the decay ---------------------


def _adamp(**kw: Any) -> Callable[[list[nn.Parameter]], Any]:
    return lambda ps: AdamP(ps, lr=LR, weight_decay=0.5, nesterov=True, **kw)


def _sgdp(**kw: Any) -> Callable[[list[nn.Parameter]], Any]:
    return lambda ps: SGDP(ps, lr=LR, momentum=0.9, weight_decay=0.1, **kw)


def _with_folded(opt: Any, step: int, mode: Any) -> None:
    """The uncorrected optimizer given ``wd_ratio lr / lr_max`` (``True``) or ``weight_decay lr / lr_max``
    (``"all"``) at this step: what the correction must be, to the bit."""
    for group in opt.param_groups:
        group.setdefault("_wd0", (group["weight_decay"], group["wd_ratio"]))
        wd, ratio = group["_wd0"]
        lr = cosine(step)
        group["lr"] = lr
        k = lr / LR
        if mode == "all":
            group["weight_decay"] = wd * k
        else:
            group["wd_ratio"] = ratio * k


@pytest.mark.parametrize("mode", [True, "all"])
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("kind", ["adamp", "sgdp"])
def test_correction_is_the_folded_decay_bit_for_bit(kind: str, path: str, mode: Any) -> None:
    make = _adamp if kind == "adamp" else _sgdp
    ours = _run(make(corrected_weight_decay=mode, **PATHS[path]), _cosine_lr)
    folded = _run(make(**PATHS[path]), lambda opt, step: _with_folded(opt, step, mode))
    for a, b in zip(ours, folded, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("mode", [True, "all"])
@pytest.mark.parametrize("kind", ["adamp", "sgdp"])
def test_compiled_is_the_multi_tensor_path(kind: str, mode: Any) -> None:
    """The compile back end (a tensor lr set in place: one graph for the whole schedule, the correction
    computed on the device) takes the multi-tensor path's numbers."""
    make = _adamp if kind == "adamp" else _sgdp

    def build(**kw: Any) -> Callable[[list[nn.Parameter]], Any]:
        def make_it(ps: list[nn.Parameter]) -> Any:
            opt = make(corrected_weight_decay=mode, **kw)(ps)
            opt.param_groups[0]["lr"] = torch.tensor(LR)
            return opt

        return make_it

    with fused_backend("compile", compiler="eager"):
        compiled = _run(build(fused=True), _cosine_lr)
    multi = _run(build(foreach=True), _cosine_lr)
    _close(compiled, multi, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("path", list(PATHS))
def test_true_corrects_only_what_is_projected(path: str) -> None:
    """``True`` changes the decay of the weights the projection judged scale-invariant, and of nothing else:
    tensors never projected (tensor 2-4 here) keep the uncorrected bits; ``"all"`` changes them too."""
    base = _run(_adamp(**PATHS[path]), _cosine_lr)
    true = _run(_adamp(corrected_weight_decay=True, **PATHS[path]), _cosine_lr)
    every = _run(_adamp(corrected_weight_decay="all", **PATHS[path]), _cosine_lr)
    for i in (2, 3, 4):
        assert torch.equal(true[i], base[i])
        assert not torch.equal(every[i], base[i])
    for i in (0, 1):
        assert not torch.equal(true[i], base[i])


def test_default_and_peak_lr_change_nothing() -> None:
    """``False`` (the default) is the reference's step; at ``lr == lr_max`` the correction is 1, so every mode
    is the uncorrected step bit for bit (k = 1.0 exactly)."""
    constant = lambda opt, step: None
    base = _run(_adamp(), constant)
    for mode in (False, True, "all"):
        assert all(
            torch.equal(a, b) for a, b in zip(_run(_adamp(corrected_weight_decay=mode), constant), base, strict=True)
        )


def test_functional_api_takes_the_correction() -> None:
    params = _params()
    opt = AdamP(params, lr=0.02, weight_decay=0.5, corrected_weight_decay=True, lr_max=0.04, foreach=True)
    clones = [p.detach().clone() for p in params]
    grads = _grads(params, 0)
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    opt.step()
    m, v, steps = [torch.zeros_like(c) for c in clones], [torch.zeros_like(c) for c in clones], []
    steps = [torch.tensor(0.0) for _ in clones]
    torch_adamp.adamp(clones, grads, m, v, steps, foreach=True, lr=0.02, beta1=0.9, beta2=0.999, eps=1e-8,
                      weight_decay=0.5, delta=0.1, wd_ratio=0.1, nesterov=False, corrected_weight_decay=True,
                      lr_max=0.04)  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(params, clones, strict=True))
    with pytest.raises(ValueError, match="lr_max"):
        torch_adamp.adamp(clones, grads, m, v, steps, lr=0.02, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.5,
                          delta=0.1, wd_ratio=0.1, nesterov=False, corrected_weight_decay=True)  # fmt: skip


# -- lr_max: the convention, kept in the state dict ---------------------------------------------------------


def test_lr_max_is_each_groups_lr_when_added_and_schedulers_leave_it() -> None:
    params = _params()
    opt = AdamP([{"params": params[:2]}, {"params": params[2:3], "lr": 0.5}], lr=0.1, corrected_weight_decay=True)
    assert [g["lr_max"] for g in opt.param_groups] == [0.1, 0.5]
    opt.add_param_group({"params": params[3:4], "lr": 0.2})
    opt.add_param_group({"params": params[4:], "lr_max": 3.0})
    assert [g["lr_max"] for g in opt.param_groups] == [0.1, 0.5, 0.2, 3.0]
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    for p in params:
        p.grad = torch.ones_like(p)
    for _ in range(3):
        opt.step()
        sched.step()
    assert [g["lr_max"] for g in opt.param_groups] == [0.1, 0.5, 0.2, 3.0]
    assert opt.param_groups[0]["lr"] < 0.1
    state = opt.state_dict()
    assert [g["lr_max"] for g in state["param_groups"]] == [0.1, 0.5, 0.2, 3.0]
    other = AdamP([{"params": params[:2]}, {"params": params[2:3]}, {"params": params[3:4]}, {"params": params[4:]}])
    other.load_state_dict(state)
    assert [g["lr_max"] for g in other.param_groups] == [0.1, 0.5, 0.2, 3.0]
    # a tensor lr: its value, read once when the group is added
    assert AdamP(params, lr=torch.tensor(0.25), corrected_weight_decay=True).param_groups[0]["lr_max"] == 0.25


def test_bad_values_are_refused_by_name() -> None:
    params = _params()
    with pytest.raises(ValueError, match="corrected_weight_decay"):
        AdamP(params, corrected_weight_decay="yes")
    with pytest.raises(ValueError, match="lr_max"):
        AdamP(params, corrected_weight_decay=True, lr_max=-1.0)
    with pytest.raises(ValueError, match="lr_max"):
        AdamP(params, lr=0.0, corrected_weight_decay=True)  # no peak to read from a zero lr
    opt = SGDP(params, lr=0.1, corrected_weight_decay="all")
    opt.param_groups[0]["lr_max"] = None
    for p in params:
        p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match="lr_max"):
        opt.step()
    with pytest.raises(ValueError, match="corrected_weight_decay"):
        Projected(torch.optim.AdamW(params), corrected_weight_decay=1)


# -- GradScaler, Projected (ZeRO partitions: tests/test_deepspeed.py's OPTIONS) --------------------------


@pytest.mark.parametrize("path", list(PATHS))
def test_grad_scaler_protocol(path: str) -> None:
    """With GradScaler's ``grad_scale`` the corrected step is the unscaled corrected step; with ``found_inf``
    nothing changes."""
    ref = _run(_adamp(corrected_weight_decay=True, **PATHS[path]), _cosine_lr)
    params = _params()
    opt = _adamp(corrected_weight_decay=True, **PATHS[path])(params)
    for step in range(STEPS):
        _cosine_lr(opt, step)
        for p, g in zip(params, _grads(params, step), strict=True):
            p.grad = g * 1024.0
        opt.grad_scale, opt.found_inf = torch.tensor(1024.0), torch.tensor(0.0)
        opt.step()
        before = [p.detach().clone() for p in params]
        opt.found_inf = torch.tensor(1.0)
        opt.step()  # skipped
        assert all(torch.equal(a, b) for a, b in zip(before, params, strict=True))
    for a, b in zip(params, ref, strict=True):
        assert torch.equal(a.detach(), b)


@pytest.mark.parametrize("inner", ["single", "foreach", "fused"])
@pytest.mark.parametrize("mode", [True, "all"])
def test_projected_adamw_is_corrected_adamp(mode: Any, inner: str) -> None:
    """``Projected(AdamW)`` with the correction is AdamP with it (the anchor of ``Projected``, corrected)."""
    ref = _run(lambda ps: AdamP(ps, lr=LR, weight_decay=0.5, corrected_weight_decay=mode, foreach=True), _cosine_lr)
    ours = _run(
        lambda ps: Projected(
            torch.optim.AdamW(ps, lr=LR, weight_decay=0.5, **PATHS[inner]), corrected_weight_decay=mode
        ),
        _cosine_lr,
    )
    _close(ours, ref, rtol=2e-5, atol=2e-6)
    plain = _run(lambda ps: Projected(torch.optim.AdamW(ps, lr=LR, weight_decay=0.5, **PATHS[inner])), _cosine_lr)
    assert max((a - b).abs().max().item() for a, b in zip(plain, ref, strict=True)) > 1e-4


def test_projected_refusals() -> None:
    params = _params()
    opt = Projected(torch.optim.AdamW(params, lr=torch.tensor(0.01), weight_decay=0.1), corrected_weight_decay="all")
    for p in params:
        p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match="float lr"):
        opt.step()
    opt = Projected(torch.optim.SGD(params, lr=0.1, weight_decay=0.1), corrected_weight_decay=True)
    with pytest.raises(ValueError, match="decoupled"):
        opt.step()
    # the inner optimizer's weight_decay is restored after the step
    opt = Projected(torch.optim.AdamW(params, lr=0.01, weight_decay=0.1), corrected_weight_decay="all", lr_max=0.1)
    opt.step()
    assert opt.param_groups[0]["weight_decay"] == 0.1
