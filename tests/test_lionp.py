"""LionP: lion-pytorch's Lion with AdamP's projection, the third projected optimizer (optimizers/lionp.py,
csrc/rules/lionp.h), against ``Projected(lion_pytorch.Lion(...))``.

Anchors: on every path (per-tensor, multi-tensor, native fused, the CPU default, the compile back end) LionP's
trajectory equals ``Projected(Lion)``'s within float32 rounding, with the same decisions at every step; the
native kernel's schemes (staged, read-only first pass for tensors above the staging threshold, never
projected) agree with the multi-tensor path; GradScaler, the correction and the functional API.
(The OptimizerInfo table derives LionP's entry: tests/optim_info.py's DERIVED_INFOS.)
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import fused_backend
from torch import Tensor, nn

import torch_adamp
from torch_adamp import LionP, Projected

lion_pytorch = pytest.importorskip("lion_pytorch")

#: conv (channel view), matrix (layer view on even steps), matrix (random: none), 1-D, and one tensor above the
#: native kernel's 1 MiB staging threshold (read-only first pass), channel-orthogonal
SHAPES = ((8, 3, 3, 3), (6, 4, 3, 3), (10, 5), (7,), (300, 1024))
STEPS = 6
PATHS = {"single": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}, "default": {}}
HP: dict[str, Any] = {"lr": 1e-3, "betas": (0.9, 0.99), "weight_decay": 0.5}


def _params() -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    return [nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]


def _orth(g: Tensor, w: Tensor, rows: bool) -> Tensor:
    w2 = w.double().reshape(w.shape[0] if rows else 1, -1)
    g2 = g.double().reshape_as(w2)
    return (g2 - (g2 * w2).sum(1, keepdim=True) / (w2 * w2).sum(1, keepdim=True) * w2).reshape(g.shape).float()


def _grads(params: list[Tensor], step: int) -> list[Tensor]:
    g = torch.Generator().manual_seed(10 + step)
    out = [torch.randn(p.shape, generator=g) for p in params]
    out[0] = _orth(out[0], params[0].detach(), rows=True)
    if step % 2 == 0:
        out[1] = _orth(out[1], params[1].detach(), rows=False)
    out[2] = out[2] + params[2].detach()  # radial: never projected
    out[4] = _orth(out[4], params[4].detach(), rows=True)
    return out


def _run(opt: Any, params: list[nn.Parameter], tensor_lr: bool = False) -> list[dict[str, float]]:
    views = []
    for step in range(STEPS):
        for p, g in zip(params, _grads(params, step), strict=True):
            p.grad = g
        opt.step()
        views.append({k: v for k, v in opt.stats().items() if k.endswith("/view")})
    return views


def _projected_lion(params: list[nn.Parameter], **kw: Any) -> Any:
    return Projected(lion_pytorch.Lion(params, **HP), track_stats=True, **kw)


@pytest.mark.parametrize("path", [*PATHS, "compile"])
def test_lionp_is_projected_lion(path: str) -> None:
    ref_params = _params()
    ref_views = _run(_projected_lion(ref_params), ref_params)
    params = _params()
    kw: dict[str, Any] = {"fused": True} if path == "compile" else PATHS[path]
    with fused_backend("compile" if path == "compile" else "auto", compiler="eager"):
        opt = LionP(params, **HP, track_stats=True, **kw)
        if path == "compile":
            opt.param_groups[0]["lr"] = torch.tensor(HP["lr"])  # one graph (a float lr is a constant of it)
        views = _run(opt, params)
    assert views == ref_views
    seen = {v for step in views for v in step.values()}
    assert seen == {0.0, 1.0, 2.0}, "no projection, channel and layer views must all occur"
    for p, q in zip(params, ref_params, strict=True):
        # float32 rounding of the update (lr = 1e-3: an ulp of the weights is ~1e-7) over STEPS steps
        torch.testing.assert_close(p, q, rtol=1e-6, atol=2e-6)
    # and not Lion alone: the projected weights moved differently
    plain = _params()
    lion = lion_pytorch.Lion(plain, **HP)
    for step in range(STEPS):
        for p, g in zip(plain, _grads(plain, step), strict=True):
            p.grad = g
        lion.step()
    assert (params[0] - plain[0]).abs().max() > 1e-5


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("mode", [True, "all"])
def test_corrected_weight_decay_is_projected_lions(path: str, mode: Any) -> None:
    """The correction, the same in LionP and ``Projected(Lion)`` (timm's ``lionc`` is ``"all"`` unprojected)."""
    ref_params, params = _params(), _params()
    ref = _projected_lion(ref_params, corrected_weight_decay=mode, lr_max=4e-3)
    opt = LionP(params, **HP, track_stats=True, corrected_weight_decay=mode, lr_max=4e-3, **PATHS[path])
    assert _run(opt, params) == _run(ref, ref_params)
    for p, q in zip(params, ref_params, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=2e-6)


@pytest.mark.parametrize("path", list(PATHS))
def test_grad_scaler_protocol(path: str) -> None:
    """Scaled gradients step as unscaled ones; a step with ``found_inf`` changes nothing."""
    ref_params, params = _params(), _params()
    ref = LionP(ref_params, **HP, **PATHS[path])
    opt = LionP(params, **HP, **PATHS[path])
    for step in range(3):
        grads = _grads(ref_params, step)
        for p, q, g in zip(params, ref_params, grads, strict=True):
            p.grad, q.grad = g * 512.0, g.clone()
        ref.step()
        opt.grad_scale, opt.found_inf = torch.tensor(512.0), torch.tensor(0.0)
        opt.step()
        before = [p.detach().clone() for p in params]
        opt.found_inf = torch.tensor(1.0)
        opt.step()
        assert all(torch.equal(a, b) for a, b in zip(before, params, strict=True))
    for p, q in zip(params, ref_params, strict=True):
        assert torch.equal(p, q)


def test_functional_api_and_defaults() -> None:
    params = _params()
    opt = LionP(params, **HP, foreach=True)
    grads = _grads(params, 0)
    clones = [p.detach().clone() for p in params]
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    opt.step()
    m = [torch.zeros_like(c) for c in clones]
    torch_adamp.lionp(clones, grads, m, foreach=True, lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.5)
    assert all(torch.equal(a, b) for a, b in zip(params, clones, strict=True))
    defaults = LionP(params).defaults
    assert (defaults["lr"], defaults["betas"], defaults["weight_decay"]) == (1e-4, (0.9, 0.99), 0)
    with pytest.raises(ValueError, match="beta"):
        LionP(params, betas=(0.9, 1.5))


def test_native_kernel_is_built_from_its_header() -> None:
    from torch_adamp import _native
    from torch_adamp.engine import native

    assert "lionp" in _native.RULES
    if native.available():
        assert native.takes(
            torch_adamp.optimizers.lionp.LIONP_RULE, LionP(_params()).rule.options(LionP(_params()).param_groups[0])
        )
