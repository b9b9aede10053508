"""The fused path: native CPU kernel and torch.compile back end, against the other paths.

The differential suite (tests/test_reference_equivalence.py and friends) runs
``fused=True`` against the reference package on many models; here: what only
the fused path has (decisions on synthetic gradients that force every view, the
tensors the kernel refuses, dtypes, threads, the build cache, the CPU default,
and the compile back end's "compile once" guarantee).
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Iterator
from typing import Any

import helpers
import pytest
import torch
from torch import Tensor

import torch_adamp
from torch_adamp import _native
from torch_adamp.engine import native as _fused

pytestmark = pytest.mark.skipif(not _fused.available(), reason=f"native kernels unavailable: {_native.failure}")

#: shapes covering every case of the kernel: conv-like, matrix, 3-D, dim 0 == 1, 1-D, scalar, empty
SHAPES: list[tuple[int, ...]] = [(16, 8, 3, 3), (12, 20), (6, 1, 5), (1, 30), (7,), (), (0, 4), (4, 0), (40, 64)]


def _orthogonal(p: Tensor, g: Tensor, rows: bool) -> Tensor:
    p64 = p.double().reshape(p.shape[0] if rows else 1, -1)
    g64 = g.double().reshape_as(p64)
    g64 = g64 - (g64 * p64).sum(1, keepdim=True) / (p64 * p64).sum(1, keepdim=True).clamp_min(1e-300) * p64
    return g64.reshape(g.shape).to(g.dtype)


def gradients(params: list[Tensor], step: int, gen: torch.Generator) -> list[Tensor]:
    """Per tensor and step, a gradient orthogonal per row (channel view passes), for the whole tensor
    (layer view passes), or random (no projection): every decision occurs on every path."""
    out = []
    for i, p in enumerate(params):
        g = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype)
        if p.dim() > 1 and p.numel() > 0:
            kind = (i + step) % 3
            if kind < 2:
                g = _orthogonal(p.detach(), g, rows=kind == 0)
        out.append(g)
    return out


def run(
    make: Callable[[list[Tensor]], torch.optim.Optimizer],
    shapes: list[tuple[int, ...]] = SHAPES,
    steps: int = 12,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> tuple[list[Tensor], list[list[float]]]:
    """Parameters after ``steps`` steps and the views of every step (track_stats must be on)."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(dtype)) for s in shapes]
    opt = make(params)
    views = []
    for step in range(steps):
        for p, g in zip(params, gradients(params, step, gen), strict=True):
            p.grad = g
        opt.step()
        stats = opt.stats() if hasattr(opt, "stats") else {}
        views.append([stats.get(f"group0.param{i}/view", -1.0) for i in range(len(params))])
    return [p.detach() for p in params], views


def rel(a: list[Tensor], b: list[Tensor]) -> float:
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        if y.numel():
            worst = max(worst, ((x.double() - y.double()).norm() / y.double().norm().clamp_min(1e-30)).item())
    return worst


ADAMP_OPTIONS = [
    dict(weight_decay=0.0),
    dict(weight_decay=1e-2, nesterov=True),
    dict(weight_decay=1e-2, maximize=True, betas=(0.8, 0.99), eps=1e-6),
    dict(weight_decay=1e-2, scale_invariant="channel"),
    dict(weight_decay=1e-2, scale_invariant="layer", wd_ratio=0.5),
    dict(weight_decay=1e-2, scale_invariant=False),
]
SGDP_OPTIONS = [
    dict(momentum=0.9),
    dict(momentum=0.9, nesterov=True, weight_decay=1e-3),
    dict(momentum=0.9, dampening=0.1, weight_decay=1e-3, project_momentum=False),
    dict(momentum=0.5, weight_decay=1e-3, maximize=True, delta=0.2),
    dict(momentum=0.9, scale_invariant="channel", weight_decay=1e-3),
    dict(momentum=0.9, scale_invariant="layer"),
    dict(momentum=0.0, scale_invariant=False),
]


@pytest.mark.parametrize("options", ADAMP_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_adamp_fused_matches_foreach_and_single(options: dict[str, Any]) -> None:
    ref, ref_views = run(lambda ps: torch_adamp.AdamP(ps, lr=1e-2, foreach=False, track_stats=True, **options))
    for path in ({"foreach": True}, {"fused": True}):
        got, views = run(lambda ps, path=path: torch_adamp.AdamP(ps, lr=1e-2, track_stats=True, **path, **options))
        assert views == ref_views, path
        assert rel(got, ref) < 1e-6, path
    if options.get("scale_invariant", "auto") == "auto":  # the synthetic gradients make every view occur
        seen = {v for step in ref_views for v in step}
        assert {0.0, 1.0, 2.0} <= seen


@pytest.mark.parametrize("options", SGDP_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_sgdp_fused_matches_foreach_and_single(options: dict[str, Any]) -> None:
    ref, ref_views = run(lambda ps: torch_adamp.SGDP(ps, lr=1e-2, foreach=False, track_stats=True, **options))
    for path in ({"foreach": True}, {"fused": True}):
        got, views = run(lambda ps, path=path: torch_adamp.SGDP(ps, lr=1e-2, track_stats=True, **path, **options))
        assert views == ref_views, path
        assert rel(got, ref) < 1e-6, path


def test_fused_matches_the_reference_package() -> None:
    adamp = pytest.importorskip("adamp")
    shapes = [s for s in SHAPES if math.prod(s) > 0 and len(s) > 0]  # the reference crashes on empty tensors
    for ours, theirs, kw in (
        (torch_adamp.AdamP, adamp.AdamP, dict(lr=1e-2, weight_decay=1e-2, nesterov=True)),
        (torch_adamp.SGDP, adamp.SGDP, dict(lr=1e-2, momentum=0.9, weight_decay=1e-3)),
    ):
        got, _ = run(lambda ps, ours=ours, kw=kw: ours(ps, fused=True, **kw), shapes, steps=30)
        ref, _ = run(lambda ps, theirs=theirs, kw=kw: theirs(ps, **kw), shapes, steps=30)
        assert rel(got, ref) < 1e-6


def test_sgdp_project_momentum_semantics() -> None:
    """project_momentum=True (reference): the stored buffer is the projected direction; False: raw."""
    for pm in (True, False):
        bufs = {}
        for path in ({"foreach": False}, {"fused": True}):
            gen = torch.Generator().manual_seed(3)
            p = torch.nn.Parameter(torch.randn(8, 5, generator=gen))
            p.grad = _orthogonal(p.detach(), torch.randn(8, 5, generator=gen), rows=True)
            opt = torch_adamp.SGDP([p], lr=0.1, momentum=0.9, project_momentum=pm, **path)
            opt.step()
            bufs[str(path)] = opt.state[p]["momentum"].clone()
        a, b = bufs.values()
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_dtypes(dtype: torch.dtype) -> None:
    tol = 1e-9 if dtype is torch.float64 else 2e-2
    for cls, kw in (
        (torch_adamp.AdamP, dict(lr=1e-2, weight_decay=1e-2)),
        (torch_adamp.SGDP, dict(lr=1e-2, momentum=0.9)),
    ):
        ref, ref_views = run(lambda ps, cls=cls, kw=kw: cls(ps, foreach=True, track_stats=True, **kw), dtype=dtype)
        got, views = run(lambda ps, cls=cls, kw=kw: cls(ps, fused=True, track_stats=True, **kw), dtype=dtype)
        assert all(p.dtype is dtype for p in got)
        assert rel(got, ref) < tol
        if dtype is torch.float64:
            assert views == ref_views


def test_half_precision_state_dtypes() -> None:
    """fp32_state=False keeps half moments: the kernel refuses them, the multi-tensor path runs them."""
    kw = dict(lr=1e-2, weight_decay=1e-2, track_stats=True, fp32_state=False)
    ref, ref_views = run(lambda ps: torch_adamp.AdamP(ps, foreach=True, **kw), dtype=torch.bfloat16)
    got, views = run(lambda ps: torch_adamp.AdamP(ps, fused=True, **kw), dtype=torch.bfloat16)
    assert views == ref_views
    assert rel(got, ref) == 0.0


def test_refused_tensors_take_the_multi_tensor_path() -> None:
    """Non-contiguous parameters (channels_last, transposed) and grads: same numbers as foreach."""

    def make_params() -> list[Tensor]:
        gen = torch.Generator().manual_seed(5)
        conv = torch.randn(8, 4, 3, 3, generator=gen).to(memory_format=torch.channels_last)
        mat = torch.randn(20, 12, generator=gen).t()  # (12, 20), not contiguous
        plain = torch.randn(10, 6, generator=gen)
        return [torch.nn.Parameter(t) for t in (conv, mat, plain)]

    results = []
    for path in ({"foreach": True}, {"fused": True}):
        params = make_params()
        opt = torch_adamp.AdamP(params, lr=1e-2, weight_decay=1e-2, track_stats=True, **path)
        gen = torch.Generator().manual_seed(6)
        for step in range(5):
            grads = gradients(params, step, gen)
            for p, g in zip(params, grads, strict=True):
                p.grad = g.t().contiguous().t() if g.dim() == 2 and step % 2 else g  # sometimes non-contiguous
            opt.step()
        results.append(([p.detach().clone() for p in params], opt.stats()))
    (a, sa), (b, sb) = results
    assert rel(a, b) < 1e-6
    assert {k: v for k, v in sa.items() if k.endswith("/view")} == {k: v for k, v in sb.items() if k.endswith("/view")}
    assert params[0].is_contiguous(memory_format=torch.channels_last)


def test_tensor_lr_and_lr_changes() -> None:
    """A 0-d tensor lr gives the float-lr result; a new value takes effect at the next step."""
    out = []
    for lr in (1e-2, torch.tensor(1e-2)):
        gen = torch.Generator().manual_seed(1)
        p = torch.nn.Parameter(torch.randn(6, 5, generator=gen))
        opt = torch_adamp.AdamP([p], lr=lr, fused=True)
        for step in range(4):
            p.grad = torch.randn(6, 5, generator=gen)
            opt.step()
            if step == 1:
                opt.param_groups[0]["lr"] = 5e-3 if isinstance(lr, float) else torch.tensor(5e-3)
        out.append(p.detach().clone())
    torch.testing.assert_close(out[0], out[1], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("stage_bytes", [_fused.STAGE_BYTES, 0], ids=["staged", "unstaged"])
def test_threads_give_identical_results(stage_bytes: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Row sums are per row and summed in row order: the thread count changes nothing."""
    monkeypatch.setattr(_fused, "STAGE_BYTES", stage_bytes)
    shapes = [(256, 256), (64, 600), (1, 40000), (40000,)]  # above the kernel's parallel threshold
    old = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(run(lambda ps: torch_adamp.AdamP(ps, lr=1e-2, fused=True, track_stats=True), shapes, 4))
            results.append(run(lambda ps: torch_adamp.SGDP(ps, lr=1e-2, momentum=0.9, fused=True), shapes, 4))
    finally:
        torch.set_num_threads(old)
    for a, b in zip(results[:2], results[2:], strict=True):
        assert rel(a[0], b[0]) == 0.0
        assert a[1] == b[1]


@pytest.mark.parametrize("options", [{}, {"nesterov": True}, {"scale_invariant": "layer"}, {"maximize": True}])
def test_adamp_staged_and_unstaged_schemes_agree(options: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """AdamP tensors above ``_fused.STAGE_BYTES`` take the other sweep scheme: the same numbers and views."""
    kw: dict[str, Any] = dict(lr=1e-2, weight_decay=1e-2, track_stats=True, fused=True, **options)
    staged = run(lambda ps: torch_adamp.AdamP(ps, **kw))
    monkeypatch.setattr(_fused, "STAGE_BYTES", 0)
    unstaged = run(lambda ps: torch_adamp.AdamP(ps, **kw))
    assert rel(staged[0], unstaged[0]) < 1e-6  # bitwise with GCC 12; the loops differ, so not guaranteed
    assert staged[1] == unstaged[1]


#: per step, the gradient kind of a tensor (offset by its index): runs of one view, so that the view
#: guessed from the last step is right, then changes (channel, layer, none in every order); the last
#: step puts a NaN in every gradient (a NaN spreads through the moments, so only at the end)
SPEC_SCHEDULE = ["channel", "channel", "channel", "none", "none", "channel", "layer", "layer", "channel", "none"]
SPEC_SCHEDULE += ["layer", "none", "channel", "late", "channel", "channel", "late", "none", "channel"]
#: "late": channel-orthogonal in the first 3/4 of the rows only, so a channel guess writes rows before a row
#: fails the test, then restores them
SPEC_STEPS = 2 * len(SPEC_SCHEDULE) + 1


def _spec_grads(params: list[Tensor], step: int, gen: torch.Generator) -> list[Tensor]:
    out = []
    for i, p in enumerate(params):
        kind = "nan" if step == SPEC_STEPS - 1 else SPEC_SCHEDULE[(step + i) % len(SPEC_SCHEDULE)]
        g = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        if kind in ("channel", "layer"):
            g = _orthogonal(p.detach(), g, rows=kind == "channel")
        elif kind == "late" and p.dim() > 1 and p.shape[0] >= 4:
            head = (3 * p.shape[0]) // 4
            g[:head] = _orthogonal(p.detach()[:head], g[:head], rows=True)
        g = g.to(p.dtype)
        if kind == "nan":
            g.view(-1)[g.numel() // 2] = float("nan")
        out.append(g)
    return out


def _spec_run(
    kind: str, options: dict[str, Any], stage_bytes: int, threads: int, dtype: torch.dtype = torch.float32
) -> tuple[list[Tensor], list[Any], Any]:
    """Params, optimizer state and views of every step with AdamP/SGDP(fused) at the given threshold,
    and the optimizer's workspace (speculation counts, spare block)."""
    old_stage, old_threads = _fused.STAGE_BYTES, torch.get_num_threads()
    _fused.STAGE_BYTES = stage_bytes
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(3)
        # (300, 130): above PAR_MIN, in groups of 63 rows (the last one partial); (6, 8200): rows of a group each
        shapes = [(16, 8, 3, 3), (12, 20), (6, 1, 5), (1, 30), (300, 130), (6, 8200)]
        params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in shapes]
        opt: Any
        if kind == "adamp":
            opt = torch_adamp.AdamP(params, lr=3e-2, weight_decay=1e-2, fused=True, track_stats=True, **options)
        else:
            opt = torch_adamp.SGDP(params, lr=0.1, weight_decay=1e-3, fused=True, track_stats=True, **options)
        views = []
        for step in range(SPEC_STEPS):
            for p, g in zip(params, _spec_grads(params, step, gen), strict=True):
                p.grad = g
            opt.step()
            views.append([opt.stats()[f"group0.param{i}/view"] for i in range(len(params))])
        state = [t for p in params for t in opt.state[p].values() if isinstance(t, Tensor) and t.dim() > 0]
        return [p.detach() for p in params] + state, views, opt._workspace
    finally:
        _fused.STAGE_BYTES = old_stage
        torch.set_num_threads(old_threads)


SPEC_OPTIONS = [
    ("adamp", {}),
    ("adamp", {"nesterov": True}),
    ("adamp", {"maximize": True, "betas": (0.8, 0.99)}),
    ("adamp", {"scale_invariant": "channel"}),
    ("sgdp", {"momentum": 0.9}),
    ("sgdp", {"momentum": 0.9, "nesterov": True}),
    ("sgdp", {"momentum": 0.8, "dampening": 0.1, "project_momentum": False, "maximize": True}),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    ("kind", "options"),
    SPEC_OPTIONS,
    ids=lambda o: o if isinstance(o, str) else ",".join(f"{k}={v}" for k, v in o.items()),
)
def test_speculative_sweep_is_exact_whatever_the_guess(
    kind: str, options: dict[str, Any], threads: int, dtype: torch.dtype
) -> None:
    """Tensors too large to stage are stepped under the view they took at their last step, and stepped
    again from a copy of their old values when the decision differs: bitwise the non-speculative scheme
    (AdamP: the staged one; same row sums, u and update arithmetic), whatever the guess, thread count or
    NaN. (Bitwise also at the steps without a guess, which take AdamP's two-pass scheme, with GCC as in
    CI; a compiler that vectorises that scheme's sums in another order would agree to rounding there.)"""
    speculative = _spec_run(kind, options, stage_bytes=0, threads=threads, dtype=dtype)
    workspace = speculative[2]
    right, wrong, spare = workspace.spec_right, workspace.spec_wrong, workspace.spare_bytes
    plain = _spec_run(kind, options, stage_bytes=1 << 30, threads=threads, dtype=dtype)
    assert speculative[1] == plain[1]
    assert len(speculative[0]) == len(plain[0]) >= 10  # parameters and their state
    for a, b in zip(speculative[0], plain[0], strict=True):
        assert a.isnan().sum() <= a.numel() // a.shape[0]  # one row at most: the comparison is not vacuous
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    assert {v for step in plain[1] for v in step} == ({1.0} if options.get("scale_invariant") else {0.0, 1.0, 2.0})
    if options.get("scale_invariant") == "channel":
        assert (right, wrong) == (0, 0)  # forced channel view: one sweep, no copy, nothing to guess
    else:  # both outcomes occurred (30 tensors x steps: every schedule transition, many times)
        assert right > 5 and wrong > 5, (right, wrong)
        assert spare >= 300 * 130 * dtype.itemsize  # kept for the next step: fresh pages would fault every step
    assert plain[2].spec_right == plain[2].spec_wrong == 0
    workspace.release()
    assert workspace.spare_bytes == 0 and not workspace.guesses


def _pm_exceptions(p: Tensor, b: Tensor, g: Tensor, lr: float, f: float, eps: float = 1e-8) -> tuple[Tensor, Tensor]:
    """Per row, how many elements of a row written under a channel guess with project_momentum the kernel
    cannot recompute from the written row (w from w_new and d, the buffer b_A = d + c w), float32, with the
    kernel's operations (the FMA emulated in float64; c from float64 sums, near enough to count)."""
    p2, b_a = p.reshape(p.shape[0], -1), (b * 0.9 + g).reshape(p.shape[0], -1)
    p64 = p2.double()
    c = ((p64 * b_a.double()).sum(1, keepdim=True) / (p64.square().sum(1, keepdim=True).sqrt() + eps) ** 2).float()
    t = c * p2
    d = b_a - t
    back = d + t
    lr32 = torch.tensor(lr, dtype=torch.float32).double()
    p1 = p2 * torch.tensor(f, dtype=torch.float32) if f != 1 else p2
    pn = (d.double() * -lr32 + p1.double()).float()
    q = (d.double() * lr32 + pn.double()).float()
    wr = q / torch.tensor(f, dtype=torch.float32) if f != 1 else q
    ex_w = wr.view(torch.int32) != p2.view(torch.int32)
    ex_b = back.view(torch.int32) != b_a.view(torch.int32)
    return ex_w.sum(1), ex_b.sum(1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("wd", [0.0, 1e-2], ids=["no-decay", "decay"])
@pytest.mark.parametrize("overflow", [False, True], ids=["logged", "overflow"])
def test_speculative_pm_sweep_is_exact_with_elements_it_cannot_recover(
    overflow: bool, wd: float, threads: int, dtype: torch.dtype
) -> None:
    """SGDP with project_momentum (no nesterov) under a channel guess copies nothing: a wrong guess recomputes
    w and the buffer from the written rows, and the elements where that rounding loses bits are logged before
    a row is written (a row with more than half its elements to log is left and stepped once the guess holds).
    Forced here: parameters with tiny elements (w lost in w_new - lr d), a buffer along w on some elements only
    (b lost in b - c w), a right guess, then a wrong one that fails in the last rows, then right again; the
    result is bitwise the two-sweep scheme's (no speculation), parameters, buffers and views."""
    shapes = [(40, 64), (300, 130)]  # the second one above PAR_MIN: rows on two threads
    lr, mom = 0.1, 0.9
    schedule = ["channel", "channel", "late", "channel", "channel", "late", "late", "channel"]

    def go(stage_bytes: int) -> tuple[list[Tensor], list[list[float]], Any, list[tuple[int, int, int, int]]]:
        old_stage, old_threads = _fused.STAGE_BYTES, torch.get_num_threads()
        _fused.STAGE_BYTES = stage_bytes
        torch.set_num_threads(threads)
        try:
            gen = torch.Generator().manual_seed(5)
            params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in shapes]
            opt = torch_adamp.SGDP(params, lr=lr, momentum=mom, weight_decay=wd, fused=True, track_stats=True)
            views, counts, shrunk = [], [], {}
            for step, kind in enumerate(schedule):
                if step > 0:
                    with torch.no_grad():
                        for i, p in enumerate(params):  # what the kernel cannot recover, on a share of the elements
                            share = 0.7 if overflow else 0.1
                            if i in shrunk:
                                p[shrunk[i]] *= 1e6
                            tiny = shrunk[i] = torch.rand(p.shape, generator=gen) < share / 2
                            p[tiny] *= 1e-6
                            along = (torch.rand(p.shape, generator=gen) >= share / 2).to(dtype)
                            opt.state[p]["momentum"].copy_(50 * p * along)
                grads = []
                for p in params:
                    g = _orthogonal(p.detach(), torch.randn(p.shape, generator=gen, dtype=torch.float64), rows=True)
                    if kind == "late":  # the last quarter of the rows fails the channel test
                        head = (3 * p.shape[0]) // 4
                        g[head:] = torch.randn(g[head:].shape, generator=gen, dtype=torch.float64)
                    grads.append(g.to(dtype))
                if dtype == torch.float32 and step > 0:
                    f = 1 - lr * wd * 0.1 / (1 - mom) if wd else 1.0
                    for p, g in zip(params, grads, strict=True):
                        ex_w, ex_b = _pm_exceptions(p.detach(), opt.state[p]["momentum"], g, lr, f)
                        half = p[0].numel() // 2
                        over = int(((ex_w + ex_b) > half).sum())
                        counts.append((int(ex_w.sum()), int(ex_b.sum()), over, p.shape[0]))
                for p, g in zip(params, grads, strict=True):
                    p.grad = g
                opt.step()
                views.append([opt.stats()[f"group0.param{i}/view"] for i in range(len(params))])
            state = [opt.state[p]["momentum"].clone() for p in params]
            return [p.detach().clone() for p in params] + state, views, opt._workspace, counts
        finally:
            _fused.STAGE_BYTES = old_stage
            torch.set_num_threads(old_threads)

    got, views, ws, counts = go(0)
    ref, ref_views, ref_ws, _ = go(1 << 30)
    assert views == ref_views
    seen = {v for step in views for v in step}
    assert 1.0 in seen and len(seen) > 1  # channel, and another view at the "late" steps
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert ws.spec_right >= 4 and ws.spec_wrong >= 2, (ws.spec_right, ws.spec_wrong, views)
    assert ref_ws.spec_right == ref_ws.spec_wrong == 0
    if counts:  # the scenario is what it claims: both kinds of exception, rows over the log's capacity or not
        assert all(w > 0 and b > 0 for w, b, _, _ in counts), counts
        if overflow:
            assert all(over > 0 for _, _, over, _ in counts), counts
        else:  # a few rows at most over the capacity
            assert all(over <= rows // 20 for _, _, over, rows in counts), counts


def test_no_speculation_above_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tensors above ``_fused.SPECULATE_MAX_BYTES`` take two passes: no copy kept between steps."""
    monkeypatch.setattr(_fused, "STAGE_BYTES", 0)
    monkeypatch.setattr(_fused, "SPECULATE_MAX_BYTES", 40 * 64 * 4 - 1)
    for make in (lambda ps: torch_adamp.AdamP(ps, fused=True), lambda ps: torch_adamp.SGDP(ps, lr=0.1, fused=True)):
        p = torch.nn.Parameter(torch.randn(40, 64))
        opt = make([p])
        for _ in range(3):
            p.grad = torch.randn(40, 64)
            opt.step()
        ws = opt._workspace
        assert (ws.spec_right, ws.spec_wrong, ws.spare_bytes) == (0, 0, 0)
    monkeypatch.setattr(_fused, "SPECULATE_MAX_BYTES", 40 * 64 * 4)  # at the cap: speculated
    p = torch.nn.Parameter(torch.randn(40, 64))
    opt = torch_adamp.AdamP([p], fused=True)
    for _ in range(3):
        p.grad = p.detach() + 0.1 * torch.randn(40, 64)  # along w: the "none" view every step
        opt.step()
    ws = opt._workspace
    assert (ws.spec_right, ws.spec_wrong) == (2, 0)  # steps 2 and 3, guessed right
    assert ws.spare_bytes == 40 * 64 * 4


def test_speculation_state_belongs_to_the_optimizer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Guesses and the spare block live in the optimizer's workspace: two optimizers over the same tensors
    share nothing, the spare block is a torch tensor freed with its optimizer, checkpoints do not hold
    them, and results are the same bits with or without them (the functional API has none)."""
    import gc
    import weakref

    monkeypatch.setattr(_fused, "STAGE_BYTES", 0)
    gen = torch.Generator().manual_seed(5)
    w0 = torch.randn(40, 64, generator=gen)
    grads = [w0 + 0.1 * torch.randn(40, 64, generator=gen) for _ in range(4)]  # the "none" view every step
    p, q = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    a, b = torch_adamp.AdamP([p], fused=True), torch_adamp.AdamP([q], fused=True)
    m, v, s = torch.zeros(40, 64), torch.zeros(40, 64), torch.zeros(())
    f = torch.nn.Parameter(w0.clone())
    for k, g in enumerate(grads):
        p.grad = g.clone()
        a.step()
        if k >= 2:  # b starts later: nothing of a's guesses may reach it
            q.grad = g.clone()
            b.step()
        torch_adamp.adamp([f], [g.clone()], [m], [v], [s], fused=True, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                          weight_decay=0, delta=0.1, wd_ratio=0.1, nesterov=False)  # fmt: skip
    assert (a._workspace.spec_right, b._workspace.spec_right) == (3, 1)
    torch.testing.assert_close(p.detach(), f.detach(), rtol=0, atol=0)  # speculated == never speculated
    assert "spare" not in str(a.state_dict()) and isinstance(a._workspace.spare, Tensor)
    spare = weakref.ref(a._workspace.spare)
    del a
    gc.collect()
    assert spare() is None


def test_no_speculation_for_half_precision(monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16/fp16 parameters step through fresh float32 copies: no spare block of their size is kept."""
    monkeypatch.setattr(_fused, "STAGE_BYTES", 0)
    p = torch.nn.Parameter(torch.randn(40, 64).bfloat16())
    opt = torch_adamp.AdamP([p], fused=True)
    for _ in range(3):
        p.grad = (p.detach().float() + 0.1 * torch.randn(40, 64)).bfloat16()
        opt.step()
    ws = opt._workspace
    assert (ws.spec_right, ws.spec_wrong, ws.spare_bytes) == (0, 0, 0)


def test_default_path_is_fused_on_cpu_and_foreach_without_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    kw: dict[str, Any] = dict(lr=1e-2, weight_decay=1e-2, track_stats=True)
    fused, _ = run(lambda ps: torch_adamp.AdamP(ps, fused=True, **kw))
    default, _ = run(lambda ps: torch_adamp.AdamP(ps, **kw))
    assert rel(default, fused) == 0.0
    # without a compiler (or TORCH_ADAMP_NATIVE=0) the default is the multi-tensor path
    monkeypatch.setattr(_native, "_lib", None)
    monkeypatch.setattr(_native, "_tried", True)
    monkeypatch.setattr(_native, "failure", "disabled by the test")
    assert not _fused.available()
    foreach, _ = run(lambda ps: torch_adamp.AdamP(ps, foreach=True, **kw))
    default, _ = run(lambda ps: torch_adamp.AdamP(ps, **kw))
    assert rel(default, foreach) == 0.0


def test_build_is_cached(tmp_path: Any) -> None:
    path, seconds = _native.build(tmp_path, force=True)
    assert path.exists() and seconds > 0
    again, seconds = _native.build(tmp_path)
    assert again == path and seconds == 0.0
    left = sorted(f.name for f in tmp_path.iterdir())
    assert left == sorted([path.name, "index.json", ".build.lock"]), left  # no temporary files left behind


def test_no_allocation_per_tensor() -> None:
    """The native step allocates no tensor temporaries beyond the view codes (C scratch is per call)."""
    import importlib.util
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "step_time.py"
    spec = importlib.util.spec_from_file_location("step_time", script)
    assert spec is not None and spec.loader is not None
    step_time = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("step_time", step_time)
    spec.loader.exec_module(step_time)
    peak_temporary_bytes = step_time.peak_temporary_bytes

    params = [torch.nn.Parameter(torch.randn(64, 64)) for _ in range(10)]
    for p in params:
        p.grad = torch.randn(64, 64)
    for opt in (torch_adamp.AdamP(params, fused=True), torch_adamp.SGDP(params, lr=0.1, momentum=0.9, fused=True)):
        opt.step()
        assert peak_temporary_bytes(opt.step) <= 8 * len(params) + 64


# --------------------------------------------------------------------------------------------
# the torch.compile back end (other devices; forced here on the CPU)
# --------------------------------------------------------------------------------------------


@pytest.fixture
def compile_backend() -> Iterator[Any]:
    """Force the compile back end with dynamo's counting ``eager`` backend (fast, counts compilations)."""
    with helpers.counting_compile_backend("compile") as counter:
        yield counter


def test_compile_backend_compiles_once_per_model(compile_backend: Any) -> None:
    """One graph per optimizer and model: no recompilation across steps, learning rates, or parameters."""
    for cls, kw in ((torch_adamp.AdamP, {}), (torch_adamp.SGDP, dict(momentum=0.9, nesterov=True))):
        before = compile_backend.frame_count
        got, views = run(lambda ps, cls=cls, kw=kw: cls(ps, lr=1e-2, fused=True, track_stats=True, **kw), steps=6)
        ref, ref_views = run(lambda ps, cls=cls, kw=kw: cls(ps, lr=1e-2, foreach=True, track_stats=True, **kw), steps=6)
        assert compile_backend.frame_count - before == 1
        assert views == ref_views
        assert rel(got, ref) < 1e-6
    # a new learning rate (float or tensor) is data, not a recompilation
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(8, 3), (5,)]]
    opt = torch_adamp.AdamP(params, lr=1e-2, fused=True)
    frames = compile_backend.frame_count
    for step, lr in enumerate([1e-2, 3e-3, 1e-3, 7e-4]):
        opt.param_groups[0]["lr"] = lr
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        if step == 0:
            frames = compile_backend.frame_count
    assert compile_backend.frame_count == frames


def test_compile_backend_scales_to_many_groups_and_optimizers(compile_backend: Any) -> None:
    """50 differently shaped param groups (layer-wise lr decay, as timm and HF recipes build them) and a
    second optimizer in the same process: each group compiles once, under a recompile limit of its own
    (one process-wide function failed at the 9th group); later steps and new learning rates compile nothing."""
    import time

    def groups(seed: int, n: int) -> list[dict[str, Any]]:
        gen = torch.Generator().manual_seed(seed)
        return [
            {"params": [torch.nn.Parameter(torch.randn(4 + k, 3 + k % 5, generator=gen))], "lr": 1e-3 * 0.9**k}
            for k in range(n)
        ]

    start = time.perf_counter()
    opts = [
        torch_adamp.AdamP(groups(0, 50), fused=True, weight_decay=0.1),
        torch_adamp.SGDP(groups(1, 5), lr=0.1, fused=True),
    ]
    for step in range(3):
        for opt in opts:
            for g in opt.param_groups:
                for p in g["params"]:
                    p.grad = torch.randn_like(p)
                g["lr"] = g["lr"] * 0.5  # a schedule: data, not a recompilation
            opt.step()
        if step == 0:
            frames = compile_backend.frame_count
            seconds = time.perf_counter() - start
    assert frames == 55, frames  # one compile per group of each optimizer (the limit is 8 per code object)
    assert compile_backend.frame_count == frames
    print(f"55 groups compiled once each in {seconds:.1f} s (eager backend)")
    assert len(opts[0]._workspace.compiled) == 50


def test_compile_backend_with_inductor() -> None:
    """The real compile back end (inductor) on a small model: the reference's numbers, compiled once."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    shapes = [(8, 4, 3, 3), (8,), (6, 10)]
    kw: dict[str, Any] = dict(lr=1e-2, weight_decay=1e-2, track_stats=True)
    try:
        with helpers.fused_backend("compile", compiler="inductor"):
            got, views = run(lambda ps: torch_adamp.AdamP(ps, fused=True, **kw), shapes, steps=5)
        assert counters["stats"]["unique_graphs"] == 1
    finally:
        torch._dynamo.reset()
    ref, ref_views = run(lambda ps: torch_adamp.AdamP(ps, foreach=False, **kw), shapes, steps=5)
    assert views == ref_views
    assert rel(got, ref) < 1e-6


@pytest.mark.parametrize(("nesterov", "wd", "pm"), list(itertools.product((False, True), (0.0, 1e-3), (False, True))))
def test_every_specialised_sgdp_loop(nesterov: bool, wd: float, pm: bool) -> None:
    """Each specialised loop of the kernel (nesterov x decay x buffer projection) against the single path."""
    kw: dict[str, Any] = dict(lr=1e-2, momentum=0.9, nesterov=nesterov, weight_decay=wd, project_momentum=pm)
    got, views = run(lambda ps: torch_adamp.SGDP(ps, fused=True, track_stats=True, **kw), steps=4)
    ref, ref_views = run(lambda ps: torch_adamp.SGDP(ps, foreach=False, track_stats=True, **kw), steps=4)
    assert views == ref_views
    assert rel(got, ref) < 1e-6


def test_fake_tensor_mode_step() -> None:
    """Under FakeTensorMode (memory estimators trace a step this way) the kernel is never called on fakes."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    params = [torch.nn.Parameter(torch.randn(6, 4)), torch.nn.Parameter(torch.randn(4))]
    for cls, kw in ((torch_adamp.AdamP, {}), (torch_adamp.SGDP, dict(lr=0.1, momentum=0.9))):
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fakes = [mode.from_tensor(p) for p in params]
            for f in fakes:
                f.grad = mode.from_tensor(torch.randn(f.shape))
            opt = cls(fakes, fused=True, **kw)
            opt.step()
            assert all(isinstance(t, FakeTensor) for st in opt.state.values() for t in st.values())


def test_a_plan_never_changes_the_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    """The native kernel's tables are built once per list of parameters and checked cheaply afterwards
    (engine.native.Plan): a run where the parameters get new storage (``p.data = ...``), the state is loaded
    from a checkpoint, a gradient comes transposed or channels_last, is bitwise the run without plans;
    the plan is rebuilt, or the step falls back, at each of those steps."""
    from torch_adamp.engine import native

    def run(planned: bool) -> list[Tensor]:
        gen = torch.Generator().manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(6, 4, 3, 3), (5, 7), (7,)]]
        opt = torch_adamp.AdamP(ps, lr=1e-2, weight_decay=0.1)
        saved = None
        for step in range(8):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen)
            if step == 2:
                ps[1].data = ps[1].data.clone()  # new storage: the plan's pointers are stale
            if step == 3:
                saved = copy.deepcopy(opt.state_dict())
            if step == 4:
                opt.load_state_dict(saved)  # new state tensors
            if step == 5:
                ps[1].grad = torch.randn(7, 5, generator=gen).t()  # not contiguous: that tensor refused
            if step == 6:
                ps[0].grad = ps[0].grad.contiguous(memory_format=torch.channels_last)  # another layout: refused
            opt.step()
            if planned and step in (1, 3, 7):
                assert opt._workspace.plans  # the plan was used or rebuilt
        return [p.detach().clone() for p in ps]

    with_plans = run(True)
    monkeypatch.setattr(native, "_planned", lambda *args: None)  # every step checks every tensor
    assert all(torch.equal(a, b) for a, b in zip(with_plans, run(False), strict=True))
