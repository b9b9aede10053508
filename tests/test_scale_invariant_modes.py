"""scale_invariant = "channel" / "layer" / False against hand-computed steps; "auto" stays reference-exact."""

from __future__ import annotations

import copy
import math

import adamp as reference
import pytest
import torch
from torch import Tensor, nn

from torch_adamp import SGDP, AdamP

MODES = ["channel", "layer", False]
PATHS = {"single": {"foreach": False}, "foreach": {"foreach": True}, "default": {}}  # default: native kernel on CPU
SHAPES = [(6, 3, 2, 2), (5, 4), (1, 7), (4,)]  # a conv, a linear, one row, a 1-D parameter (never projected)


def _project(w: Tensor, u: Tensor, mode: str | bool, eps: float) -> tuple[Tensor, bool]:
    """The spec's projection, forced in ``mode`` (no cosine test), in float64."""
    if mode is False or w.dim() < 2:
        return u, False
    rows = w.shape[0] if mode == "channel" else 1
    wr, ur = w.reshape(rows, -1), u.reshape(rows, -1)
    wn = wr / (wr.norm(dim=1, keepdim=True) + eps)
    return (ur - wn * (wn * ur).sum(dim=1, keepdim=True)).reshape(u.shape), True


def _adamp_steps(ws: list[Tensor], grads: list[list[Tensor]], mode: str | bool, o: dict) -> list[Tensor]:
    b1, b2 = o["betas"]
    out = []
    for k, w in enumerate(ws):
        w, m, v = w.clone(), torch.zeros_like(w), torch.zeros_like(w)
        for t, gs in enumerate(grads, start=1):
            g = gs[k]
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            denom = v.sqrt() / math.sqrt(1 - b2**t) + o["eps"]
            u = (b1 * m + (1 - b1) * g) / denom if o["nesterov"] else m / denom
            u, projected = _project(w, u, mode, o["eps"])
            r = o["wd_ratio"] if projected else 1.0
            w = w * (1 - o["lr"] * o["weight_decay"] * r) - o["lr"] / (1 - b1**t) * u
        out.append(w)
    return out


def _sgdp_steps(ws: list[Tensor], grads: list[list[Tensor]], mode: str | bool, o: dict) -> list[Tensor]:
    mom = o["momentum"]
    out = []
    for k, w in enumerate(ws):
        w, b = w.clone(), torch.zeros_like(w)
        for gs in grads:
            g = gs[k]
            b = mom * b + (1 - o["dampening"]) * g
            d = g + mom * b if o["nesterov"] else b
            d, projected = _project(w, d, mode, o["eps"])
            if not o["nesterov"] and o.get("project_momentum", True):
                b = d  # reference semantics: the buffer is the projected direction
            r = o["wd_ratio"] if projected else 1.0
            w = w * (1 - o["lr"] * o["weight_decay"] * r / (1 - mom)) - o["lr"] * d
        out.append(w)
    return out


def _problem(steps: int = 3) -> tuple[list[Tensor], list[list[Tensor]]]:
    gen = torch.Generator().manual_seed(0)
    ws = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    # gradients with a radial part, so that projecting or not makes a difference
    grads = [
        [torch.randn(s, generator=gen, dtype=torch.float64) + 0.5 * w for s, w in zip(SHAPES, ws, strict=True)]
        for _ in range(steps)
    ]
    return ws, grads


def _run(cls: type, ws: list[Tensor], grads: list[list[Tensor]], **options) -> list[Tensor]:
    params = [nn.Parameter(w.clone()) for w in ws]
    opt = cls(params, **options)
    for gs in grads:
        for p, g in zip(params, gs, strict=True):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in params]


ADAMP_OPTIONS = [
    dict(lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, wd_ratio=0.1, nesterov=False),
    dict(lr=0.05, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.0, wd_ratio=0.5, nesterov=True),
]
SGDP_OPTIONS = [
    dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.01, nesterov=True, eps=1e-8, wd_ratio=0.1),
    dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=False, eps=1e-8, wd_ratio=0.1),
    dict(lr=0.1, momentum=0.5, dampening=0.0, weight_decay=0.01, nesterov=False, eps=1e-8, wd_ratio=0.3)
    | {"project_momentum": False},
]


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("mode", MODES, ids=str)
@pytest.mark.parametrize("options", ADAMP_OPTIONS, ids=["wd", "nesterov"])
def test_adamp_forced_modes_match_hand_computed_steps(path: str, mode: str | bool, options: dict) -> None:
    ws, grads = _problem()
    got = _run(AdamP, ws, grads, scale_invariant=mode, **options, **PATHS[path])
    for a, b in zip(got, _adamp_steps(ws, grads, mode, options), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("mode", MODES, ids=str)
@pytest.mark.parametrize("options", SGDP_OPTIONS, ids=["nesterov", "dampening", "keep_momentum"])
def test_sgdp_forced_modes_match_hand_computed_steps(path: str, mode: str | bool, options: dict) -> None:
    ws, grads = _problem()
    got = _run(SGDP, ws, grads, scale_invariant=mode, **options, **PATHS[path])
    for a, b in zip(got, _sgdp_steps(ws, grads, mode, options), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("path", sorted(PATHS))
def test_forced_mode_projects_where_the_cosine_test_does_not(path: str) -> None:
    """g = w fails every cosine test: "auto" leaves the update alone, a forced view makes it orthogonal
    to w per row (exactly, with eps = 0)."""
    w0 = torch.randn(4, 6, dtype=torch.float64)
    views = {}
    for mode in ("auto", "channel", "layer"):
        w = nn.Parameter(w0.clone())
        opt = SGDP([w], lr=0.1, eps=0.0, scale_invariant=mode, track_stats=True, **PATHS[path])
        w.grad = w0.clone()
        opt.step()
        views[mode] = opt.stats()["group0.param0/view"]
        step = w0 - w.detach()
        if mode == "auto":
            torch.testing.assert_close(step, 0.1 * w0)
        else:
            rows = 4 if mode == "channel" else 1
            dots = (step.reshape(rows, -1) * w0.reshape(rows, -1)).sum(dim=1)
            torch.testing.assert_close(dots, torch.zeros(rows, dtype=torch.float64), atol=1e-12, rtol=0)
    assert views == {"auto": 0.0, "channel": 1.0, "layer": 2.0}


@pytest.mark.parametrize("path", sorted(PATHS))
def test_adamp_without_projection_is_adamw(path: str) -> None:
    ws, grads = _problem(steps=5)
    got = _run(AdamP, ws, grads, lr=0.01, weight_decay=0.1, scale_invariant=False, **PATHS[path])
    expected = _run(torch.optim.AdamW, ws, grads, lr=0.01, weight_decay=0.1)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


def _reference_pair(kind: str, options: dict, steps: int = 6) -> tuple[list[Tensor], list[Tensor], list[float]]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 10)
    )
    ours_model = copy.deepcopy(model)
    ref = {"adamp": reference.AdamP, "sgdp": reference.SGDP}[kind](model.parameters(), **options)
    ours_cls = {"adamp": AdamP, "sgdp": SGDP}[kind]
    ours = ours_cls(ours_model.parameters(), foreach=False, scale_invariant="auto", track_stats=True, **options)
    views = []
    for _ in range(steps):
        x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,))
        for m, opt in ((model, ref), (ours_model, ours)):
            opt.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
        views += [v for k, v in ours.stats().items() if k.endswith("/view")]
    return list(ours_model.parameters()), list(model.parameters()), views


@pytest.mark.parametrize(
    "kind, options",
    [
        ("adamp", dict(lr=0.01, weight_decay=0.1)),
        ("adamp", dict(lr=0.01, weight_decay=0.1, nesterov=True)),
        ("sgdp", dict(lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True)),
        ("sgdp", dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),
    ],
)
def test_auto_is_reference_exact(kind: str, options: dict) -> None:
    ours, ref, views = _reference_pair(kind, options)
    for a, b in zip(ours, ref, strict=True):
        assert torch.equal(a, b)
    assert 1.0 in views and 0.0 in views  # the conv weight was projected, the head was not


@pytest.mark.parametrize("cls", [AdamP, SGDP])
@pytest.mark.parametrize("bad", [True, "none", "Channel", "auto ", 1, 0, None, "both"])
def test_scale_invariant_is_validated(cls: type, bad: object) -> None:
    w = nn.Parameter(torch.randn(3, 3))
    with pytest.raises(ValueError, match="scale_invariant"):
        cls([w], lr=0.1, scale_invariant=bad)
    opt = cls([w], lr=0.1)
    with pytest.raises(ValueError, match="scale_invariant"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(2, 2))], "scale_invariant": bad})
    assert len(opt.param_groups) == 1
