"""Property tests (hypothesis) of the projection and of the optimizers' geometry.

* The projection functions agree with the reference package's ``_projection``
  (bitwise for :func:`torch_adamp.project_single`; same decision and within
  rounding for the batched :func:`torch_adamp.projection_coefficients`).
* The projected update is orthogonal to each row of the weight (channel view)
  or to the whole weight (layer view): ``|<w_i, u'_i>| <= 1e-5 ||w_i|| ||u_i||``,
  with ``u`` the update before projection; also end to end through every
  optimizer path, where weight decay must be the radial ``wd_ratio`` shrink.
* On a truly scale-invariant function the weight norm grows as theory says:
  plain GD ``||w'||^2 = ||w||^2 + lr^2 ||g||^2``; with momentum (SGDP, AdamP)
  ``||w'||^2 = ||w||^2 + ||w' - w||^2`` (the projected update is orthogonal to
  ``w``), while SGD with momentum grows the norm many times faster.

Examples are derandomised (reproducible in CI) and the tensors small.
"""

from __future__ import annotations

import math

import helpers
import pytest
import torch
import torch.nn.functional as F
from helpers import PATHS, path_kwargs, record_reference_views, scale_invariant_objective
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor

import torch_adamp
from torch_adamp import projection

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
ORTHO_TOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from helpers.one_thread()


# -- strategies ---------------------------------------------------------------------------

shapes = st.tuples(st.integers(1, 6), st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple)).map(
    lambda rt: (rt[0], *rt[1])
)
dtypes = st.sampled_from([torch.float32, torch.float64])


def _weight(shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype) -> Tensor:
    """Random weight whose rows have norms spread over [0.01, 100] (log-uniform)."""
    w = torch.randn(shape, generator=gen, dtype=torch.float64)
    rows = w.reshape(shape[0], -1)
    norms = 10 ** (torch.rand(shape[0], 1, generator=gen, dtype=torch.float64) * 4 - 2)
    return (rows / rows.norm(dim=1, keepdim=True) * norms).reshape(shape).to(dtype)


def _orthogonalise(g: Tensor, w: Tensor, view: str) -> Tensor:
    """Remove from ``g`` its component along each row of ``w`` (``"channel"``) or along ``w`` (``"layer"``)."""
    rows = w.shape[0] if view == "channel" else 1
    g2, w2 = g.double().reshape(rows, -1), w.double().reshape(rows, -1)
    g2 = g2 - (g2 * w2).sum(1, keepdim=True) / (w2 * w2).sum(1, keepdim=True) * w2
    return g2.reshape(g.shape).to(g.dtype)


@st.composite
def projection_inputs(draw: st.DrawFn) -> tuple[Tensor, Tensor, Tensor, float]:
    """``(w, g, u, delta)``: a gradient made orthogonal per row, per tensor or not at all, plus a
    radial part of random size, so that the cosine test lands on both sides of its threshold."""
    shape = draw(shapes)
    dtype = draw(dtypes)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    w = _weight(shape, gen, dtype)
    g = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    kind = draw(st.sampled_from(["channel", "layer", "none"]))
    if kind != "none":
        g = _orthogonalise(g, w, kind)
    radial = draw(st.sampled_from([0.0, 1e-4, 1e-3, 1e-2, 3e-2, 0.1, 1.0]))
    g = g + radial * g.norm() / w.norm() * w
    u = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) + draw(st.floats(0, 3)) * w / w.norm()
    return w, g, u, draw(st.sampled_from([0.1, 0.3, 1.0]))


def _cos_margins(w: Tensor, g: Tensor, delta: float, eps: float) -> list[float]:
    """``|max cos - threshold| / threshold`` of the channel and layer tests (float64)."""
    out = []
    for rows in (w.shape[0], 1):
        w2, g2 = w.double().reshape(rows, -1), g.double().reshape(rows, -1)
        cos = F.cosine_similarity(g2, w2, dim=1, eps=eps).abs().max().item()
        thr = delta / math.sqrt(w2.shape[1])
        out.append(abs(cos - thr) / thr)
    return out


# -- the projection against the reference --------------------------------------------------


@SETTINGS
@given(projection_inputs(), st.sampled_from([1e-8, 1e-6]))
def test_project_single_is_bitwise_the_reference(inputs, eps: float) -> None:
    """``project_single`` == ``adamp.AdamP._projection``: same update bits, same decision."""
    w, g, u, delta = inputs
    ref = helpers.reference.AdamP([torch.nn.Parameter(torch.zeros(1))])
    views = record_reference_views(ref)
    ref_u, wd = ref._projection(w, g, u.clone(), delta, 0.5, eps)
    ours_u, view = torch_adamp.project_single(w, g, u.clone(), delta=delta, eps=eps)
    assert torch.equal(ours_u, ref_u)
    assert int(view) == helpers.VIEW_CODES[views[id(w)]]
    assert (wd == 0.5) == (int(view) != projection.NONE)


@SETTINGS
@given(st.lists(projection_inputs(), min_size=1, max_size=3), st.sampled_from([1e-8, 1e-6]))
def test_batched_projection_matches_single(inputs, eps: float) -> None:
    """``projection_coefficients`` over a list == ``project_single`` per tensor, up to rounding.

    Same decision unless the cosine is within 1e-5 (relative) of its threshold;
    projected updates within ``1e-5 ||u||`` (float32) / ``1e-12 ||u||`` (float64).
    """
    delta = inputs[0][3]
    by_dtype: dict[torch.dtype, list] = {}
    for w, g, u, _ in inputs:
        by_dtype.setdefault(w.dtype, []).append((w, g, u))
    for dtype, items in by_dtype.items():
        ws, gs, us = (list(x) for x in zip(*items, strict=True))
        coefs, views, _ = torch_adamp.projection_coefficients(ws, gs, us, delta=delta, eps=eps)
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        for w, g, u, c, view in zip(ws, gs, us, coefs, views, strict=True):
            single_u, single_view = torch_adamp.project_single(w, g, u.clone(), delta=delta, eps=eps)
            if int(view) != int(single_view):
                assert min(_cos_margins(w, g, delta, eps)) < 1e-5, (int(view), int(single_view))
                continue
            batched_u = u - c * w
            assert torch.linalg.vector_norm((batched_u - single_u).double()) <= tol * u.double().norm()


@SETTINGS
@given(projection_inputs(), st.sampled_from(["channel", "layer", "auto"]))
def test_projected_update_is_orthogonal_to_each_row(inputs, mode: str) -> None:
    """``|<w_i, proj(u)_i>| <= 1e-5 ||w_i|| ||u_i||`` for each row of the view that was used."""
    w, g, u, delta = inputs
    if mode == "auto":  # a truly scale-invariant gradient: the channel test must pass
        g = _orthogonalise(g, w, "channel")
    for projected, view in (
        torch_adamp.project_single(w, g, u.clone(), delta=delta, eps=1e-8, mode=mode),
        _batched(w, g, u, delta, mode),
    ):
        expected = projection.LAYER if mode == "layer" else projection.CHANNEL
        assert int(view) == expected
        _assert_orthogonal(w, u, projected, w.shape[0] if expected == projection.CHANNEL else 1)


def _batched(w: Tensor, g: Tensor, u: Tensor, delta: float, mode: str) -> tuple[Tensor, Tensor]:
    (c,), views, _ = torch_adamp.projection_coefficients([w], [g], [u], delta=delta, eps=1e-8, mode=mode)
    return u - c * w, views[0]


def _assert_orthogonal(w: Tensor, u: Tensor, projected: Tensor, rows: int, tol: float = ORTHO_TOL) -> None:
    w2, u2, p2 = (x.double().reshape(rows, -1) for x in (w, u, projected))
    dots = (w2 * p2).sum(1).abs()
    bound = tol * w2.norm(dim=1) * u2.norm(dim=1)
    assert bool((dots <= bound).all()), (dots / (w2.norm(dim=1) * u2.norm(dim=1))).max().item()


# -- end to end through the optimizers -------------------------------------------------------


@SETTINGS
@given(
    shape=shapes.filter(lambda s: math.prod(s[1:]) >= 2),  # a 1-element row has no orthogonal direction
    seed=st.integers(0, 2**31 - 1),
    kind=st.sampled_from(["adamp", "sgdp"]),
    path=st.sampled_from(list(PATHS)),
    mode=st.sampled_from(["channel", "layer", "auto"]),
    weight_decay=st.sampled_from([0.0, 0.1]),
    wd_ratio=st.sampled_from([0.0, 0.1, 1.0]),
)
def test_optimizer_step_is_radial_decay_plus_orthogonal_move(shape, seed, kind, path, mode, weight_decay, wd_ratio):
    """One step of every path, float64: ``w' = f w + m`` with ``f = 1 - lr wd wd_ratio (/(1 - momentum))``
    and ``m`` orthogonal to each row of ``w`` (channel) or to ``w`` (layer)."""
    opts = path_kwargs(path)
    gen = torch.Generator().manual_seed(seed)
    w = torch.nn.Parameter(_weight(shape, gen, torch.float64))
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    if mode == "auto":
        g = _orthogonalise(g, w.detach(), "channel")
    w.grad = g
    if kind == "adamp":
        lr, factor = 0.01, 1 - 0.01 * weight_decay * wd_ratio
        opt = torch_adamp.AdamP([w], lr=lr, weight_decay=weight_decay, wd_ratio=wd_ratio, scale_invariant=mode, **opts)
    else:
        lr, momentum = 0.1, 0.9
        factor = 1 - lr * weight_decay * wd_ratio / (1 - momentum)
        opt = torch_adamp.SGDP(
            [w], lr=lr, momentum=momentum, weight_decay=weight_decay, wd_ratio=wd_ratio, scale_invariant=mode, **opts
        )
    old = w.detach().clone()
    opt.step()
    move = w.detach() - factor * old
    assert move.abs().max() > 0
    _assert_orthogonal(old, move, move, shape[0] if mode != "layer" else 1)


# -- weight-norm growth on a scale-invariant function ------------------------------------------


def _grad(f, w: Tensor) -> Tensor:
    w.grad = None
    f(w).backward()
    return w.grad.detach().clone()


@SETTINGS
@given(
    shape=shapes.filter(lambda s: math.prod(s[1:]) >= 2),
    view=st.sampled_from(["channel", "layer"]),
    lr=st.sampled_from([1e-3, 1e-2, 0.1, 1.0]),
    path=st.sampled_from(list(PATHS)),
    seed=st.integers(0, 2**31 - 1),
)
def test_gd_norm_growth_matches_theory(shape, view, lr, path, seed):
    """SGDP without momentum on a scale-invariant function (float64, 5 steps):
    ``||w'||^2 = ||w||^2 + lr^2 ||g||^2`` at every step (the gradient is orthogonal to ``w``)."""
    opts = path_kwargs(path)
    f = scale_invariant_objective(shape, view, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    w = torch.nn.Parameter(_weight(shape, gen, torch.float64))
    opt = torch_adamp.SGDP([w], lr=lr, **opts, track_stats=True)
    for _ in range(5):
        g = _grad(f, w)
        before = w.detach().square().sum().item()
        opt.step()
        assert helpers.our_views(opt)[id(w)] != projection.NONE  # the cosine test recognises invariance
        growth = w.detach().square().sum().item() - before
        expected = lr**2 * g.square().sum().item()
        assert growth == pytest.approx(expected, rel=1e-6, abs=1e-13 * before)


@SETTINGS
@given(
    shape=shapes.filter(lambda s: math.prod(s[1:]) >= 2),
    kind=st.sampled_from(["adamp", "sgdp", "sgdp-nesterov"]),
    path=st.sampled_from(list(PATHS)),
    seed=st.integers(0, 2**31 - 1),
)
def test_momentum_norm_growth_is_pythagorean(shape, kind, path, seed):
    """With momentum and projection (float64, 10 steps), per row ``||w'||^2 = ||w||^2 + ||w' - w||^2``
    up to ``2e-5 ||w|| ||w' - w||`` (orthogonality at 1e-5; eps = 1e-8 in the projection's
    normalisation ``w / (||w|| + eps)`` leaves a radial residual of relative size ~2 eps / ||w||)."""
    opts = path_kwargs(path)
    f = scale_invariant_objective(shape, "channel", seed=seed)
    w = torch.nn.Parameter(_weight(shape, torch.Generator().manual_seed(seed + 1), torch.float64))
    if kind == "adamp":
        opt = torch_adamp.AdamP([w], lr=0.01, **opts)
    else:
        opt = torch_adamp.SGDP([w], lr=0.1, momentum=0.9, nesterov=kind == "sgdp-nesterov", **opts)
    rows = shape[0]
    for _ in range(10):
        _grad(f, w)
        old = w.detach().clone().reshape(rows, -1)
        opt.step()
        new = w.detach().reshape(rows, -1)
        move = new - old
        lhs = new.square().sum(1)
        rhs = old.square().sum(1) + move.square().sum(1)
        bound = 2 * ORTHO_TOL * old.norm(dim=1) * move.norm(dim=1)
        assert bool(((lhs - rhs).abs() <= bound).all()), ((lhs - rhs).abs() / bound).max().item()
        assert move.abs().max() > 0


@pytest.mark.parametrize("path", list(PATHS))
def test_sgdp_slows_the_norm_growth_of_momentum(path):
    """The paper's point: on a scale-invariant weight, SGD with momentum 0.9 inflates ``||w||`` many
    times more than SGDP does (measured ~19x, the (1 + beta) / (1 - beta) of the paper); assert > 5x."""
    opts = path_kwargs(path)
    shape = (6, 20)
    f = scale_invariant_objective(shape, "channel", seed=0)
    w0 = _weight(shape, torch.Generator().manual_seed(1), torch.float64)
    growth = {}
    for name in ("sgd", "sgdp"):
        w = torch.nn.Parameter(w0.clone())
        if name == "sgd":
            opt = torch.optim.SGD([w], lr=0.1, momentum=0.9)
        else:
            opt = torch_adamp.SGDP([w], lr=0.1, momentum=0.9, **opts)
        for _ in range(50):
            _grad(f, w)
            opt.step()
        growth[name] = w.detach().square().sum().item() - w0.square().sum().item()
    assert growth["sgdp"] > 0
    assert growth["sgd"] > 5 * growth["sgdp"], growth
