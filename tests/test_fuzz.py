"""Hypothesis fuzzing over shapes, dtypes, options and gradient magnitudes.

Checks, for AdamP and SGDP: no exception (none is documented for valid input),
the multi-tensor path equals the per-tensor reference-order path, and updates
projected in the channel view are orthogonal to the weight rows.
"""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import torch_adamp

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
MAGNITUDES = [0.0, 1e-30, 1e-3, 1.0, 1e30]

shapes = st.lists(st.integers(0, 5), min_size=0, max_size=4).map(tuple)
options = st.fixed_dictionaries(
    {
        "weight_decay": st.sampled_from([0.0, 0.1]),
        "delta": st.sampled_from([0.0, 0.1, 1.0]),
        "wd_ratio": st.sampled_from([0.0, 0.1, 1.0]),
        "nesterov": st.booleans(),
        "maximize": st.booleans(),
        "scale_invariant": st.sampled_from(["auto", "channel", "layer", False]),
    }
)


def make(name: str, params: list[torch.Tensor], opts: dict, **path: bool) -> torch.optim.Optimizer:
    if name == "adamp":
        return torch_adamp.AdamP(params, lr=1e-2, **opts, **path)
    return torch_adamp.SGDP(params, lr=0.1, momentum=0.9, **opts, **path)


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    return {
        torch.float64: dict(rtol=1e-10, atol=1e-12),
        torch.float32: dict(rtol=1e-5, atol=1e-6),
    }.get(dtype, dict(rtol=1e-2, atol=1e-3))


@settings(max_examples=150, deadline=None)
@given(
    name=st.sampled_from(["adamp", "sgdp"]),
    shape_list=st.lists(shapes, min_size=1, max_size=3),
    dtype=st.sampled_from(DTYPES),
    magnitude=st.sampled_from(MAGNITUDES),
    opts=options,
    seed=st.integers(0, 2**16),
)
def test_paths_agree_and_never_raise(
    name: str, shape_list: list[tuple[int, ...]], dtype: torch.dtype, magnitude: float, opts: dict, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen).to(dtype) for s in shape_list]
    grads = [[(torch.randn(s, generator=gen) * magnitude).to(dtype) for s in shape_list] for _ in range(3)]
    results = []
    for path in ({"foreach": False}, {"foreach": True}):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        opt = make(name, params, opts, **path)
        for step_grads in grads:
            for p, g in zip(params, step_grads, strict=True):
                p.grad = g.clone()
            opt.step()
        results.append(params)
    for a in results[1]:
        assert a.dtype == dtype
    # Gradients whose squares overflow the float32 math (|g| > 1.8e19), or that do not fit the
    # dtype at all, give non-finite moments as in AdamW: only "no exception" is promised there.
    compute_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    compute_max = torch.finfo(compute_dtype).max
    if magnitude**2 < compute_max and magnitude < torch.finfo(dtype).max:
        tol = tolerance(dtype)
        # the paths round the radial part of the update differently: allow a few ulps of the
        # step's size (SGDP: lr * |momentum buffer| <= 0.1 * 10 * |g|; AdamP: lr * |m / sqrt(v)| ~ 1e-2)
        step_size = magnitude if name == "sgdp" else 1e-2
        tol["atol"] = max(tol["atol"], 64 * torch.finfo(compute_dtype).eps * step_size)
        for a, b in zip(*results, strict=True):
            torch.testing.assert_close(a, b, equal_nan=True, **tol)


@settings(max_examples=150, deadline=None)
@given(
    rows=st.integers(1, 6),
    cols=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
    foreach=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_channel_projected_update_is_orthogonal_to_rows(
    rows: int, cols: list[int], scale: float, foreach: bool, seed: int
) -> None:
    """SGDP with lr=1, no momentum/decay, forced channel view: w - w' is the projected gradient."""
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(rows, *cols, generator=gen, dtype=torch.float64) * scale
    w = torch.nn.Parameter(w0.clone())
    w.grad = torch.randn(rows, *cols, generator=gen, dtype=torch.float64) * scale
    torch_adamp.SGDP([w], lr=1.0, scale_invariant="channel", foreach=foreach, eps=0.0).step()
    d = (w0 - w.detach()).reshape(rows, -1)
    p = w0.reshape(rows, -1)
    g = w.grad.reshape(rows, -1)
    # relative to the unprojected update (the projected one may vanish, e.g. rows of length 1),
    # plus the rounding of w0 - w
    p_norm = torch.linalg.vector_norm(p, dim=1)
    dots = (d * p).sum(1).abs()
    bound = 1e-10 * torch.linalg.vector_norm(g, dim=1) * p_norm + 1e-14 * p_norm**2
    assert (dots <= bound).all(), (dots, bound)
    # the tangential part of the gradient is untouched
    tangential = g - (g * p).sum(1, keepdim=True) / (p * p).sum(1, keepdim=True) * p
    assert math.isclose(float(torch.linalg.vector_norm(d - tangential)), 0.0, abs_tol=1e-9 * scale)
