"""The Triton back end (``torch_adamp.triton``, ``torch_adamp.engine.triton``), checked on the CPU.

Most tests run the kernels in Triton's interpreter on CPU tensors, which needs ``TRITON_INTERPRET=1`` in the
environment before triton is imported: they run in a pytest process of their own (``.ci/run``:
``TRITON_INTERPRET=1 python -m pytest -n 2 tests/test_triton.py tests/test_grad_scaler.py -k triton``) and
skip elsewhere. What needs no interpreter runs in every process: the import stays free of triton, the
switch ``TORCH_ADAMP_FUSED=triton`` refuses where it cannot run, the host side of a CUDA step reads nothing
from the device (fake CUDA tensors, the launches recorded), and one interpreted step in a subprocess.

Against the multi-tensor path: the same decisions on every step, and parameters within 1e-6 relative after
12 steps (the kernels' row sums are tree reductions, torch's are not: float32 rounding, as the native
kernel); against ``adamp==0.3.0``: the reference suite's bounds. Speculation on the last step's view never
changes a bit (tested against the same kernels without it).
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import math
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import helpers
import pytest
import torch
from test_fused import ADAMP_OPTIONS, SGDP_OPTIONS, SHAPES, SPEC_STEPS, _orthogonal, _spec_grads, gradients, rel, run
from torch import Tensor

import torch_adamp
from torch_adamp.engine import triton as backend

INSTALLED = importlib.util.find_spec("triton") is not None
INTERPRETING = INSTALLED and os.environ.get("TRITON_INTERPRET") == "1"
ROOT = Path(__file__).resolve().parents[1]

if INTERPRETING:
    helpers.interpret_triton_faster()

needs_triton = pytest.mark.skipif(not INSTALLED, reason="triton is not installed")
interpreted = pytest.mark.skipif(
    not INTERPRETING, reason="runs the Triton kernels in the interpreter: TRITON_INTERPRET=1 pytest (see .ci/run)"
)

#: the tiles of the tests: the GPU's (the constants compiled for sm_80/sm_90), and small ones that make small
#: tensors take every kind of tile (a row in several tile rows, several rows per tile, long rows in chunks);
#: the interpreter's cost is per program, so the small tiles run a subset of the cases


def with_configs(cases: list[Any], small: int) -> list[Any]:
    """Every case on the GPU's tiles, the first ``small`` on the small ones."""
    return [pytest.param(c, "gpu") for c in cases] + [pytest.param(c, "small") for c in cases[:small]]


#: test_fused's shapes (every case of the CPU kernel), a tensor whose rows take 3 tile rows each (5 of them in a
#: tile of the GPU's) and one whose rows are longer than a tile (one program each, in chunks)
TILE_SHAPES: list[tuple[int, ...]] = [*SHAPES, (5, 300), (3, 2100)]


@contextlib.contextmanager
def tiles(name: str | None) -> Iterator[None]:
    from torch_adamp.triton import driver

    old = backend.CONFIG
    backend.CONFIG = {"gpu": driver.GPU, "small": driver.SMALL, None: None}[name]
    try:
        yield
    finally:
        backend.CONFIG = old


@contextlib.contextmanager
def triton_backend(config: str | None = None) -> Iterator[None]:
    """Optimizers built inside take the Triton back end for ``fused=True`` (with the tiles ``config``)."""
    with helpers.fused_backend("triton"), tiles(config):
        yield


def triton_run(
    make: Callable[[list[Tensor]], torch.optim.Optimizer], config: str | None = None, **kw: Any
) -> tuple[list[Tensor], list[list[float]]]:
    with triton_backend(config):
        return run(make, **kw)


def plans(opt: Any) -> list[Any]:
    return list(opt._workspace.triton_plans.values())


# --------------------------------------------------------------------------------------------
# against the multi-tensor path
# --------------------------------------------------------------------------------------------


@interpreted
@pytest.mark.parametrize(("options", "config"), with_configs(ADAMP_OPTIONS, 1), ids=str)
def test_adamp_matches_multi_tensor(options: dict[str, Any], config: str) -> None:
    """12 steps of forced views (every view on every projectable tensor): the same views at every step,
    within 1e-6. The small tiles (many more programs: slower) on one option set."""
    steps = 12 if config == "gpu" else 4
    ref, ref_views = run(lambda ps: torch_adamp.AdamP(ps, lr=1e-2, foreach=True, track_stats=True, **options),
                         TILE_SHAPES, steps)  # fmt: skip
    got, views = triton_run(lambda ps: torch_adamp.AdamP(ps, lr=1e-2, fused=True, track_stats=True, **options),
                            config, shapes=TILE_SHAPES, steps=steps)  # fmt: skip
    assert views == ref_views
    assert rel(got, ref) < 1e-6
    if options.get("scale_invariant", "auto") == "auto" and config == "gpu":
        assert {0.0, 1.0, 2.0} <= {v for step in views for v in step}


@interpreted
@pytest.mark.parametrize(("options", "config"), with_configs(SGDP_OPTIONS, 1), ids=str)
def test_sgdp_matches_multi_tensor(options: dict[str, Any], config: str) -> None:
    steps = 12 if config == "gpu" else 4
    ref, ref_views = run(lambda ps: torch_adamp.SGDP(ps, lr=1e-2, foreach=True, track_stats=True, **options),
                         TILE_SHAPES, steps)  # fmt: skip
    got, views = triton_run(lambda ps: torch_adamp.SGDP(ps, lr=1e-2, fused=True, track_stats=True, **options),
                            config, shapes=TILE_SHAPES, steps=steps)  # fmt: skip
    assert views == ref_views
    assert rel(got, ref) < 1e-6


def _scheduled(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """``opt`` with its learning rate on a decreasing schedule (a new value before every step)."""
    count = itertools.count()

    def hook(o: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        k = next(count)
        for g in o.param_groups:
            g["lr"] = 1e-2 * (0.3 + 0.7 * math.cos(0.12 * k))

    opt.register_step_pre_hook(hook)
    return opt


@interpreted
@pytest.mark.parametrize(("kind", "mode"), [("adamp", True), ("adamp", "all"), ("sgdp", True), ("sgdp", "all")])
def test_corrected_weight_decay_matches_multi_tensor(kind: str, mode: Any) -> None:
    """``corrected_weight_decay`` on a schedule (``lr / lr_max`` changes every step): the same views and
    values as the multi-tensor path; without the correction the values differ (the test can fail)."""
    cls, extra = (torch_adamp.AdamP, {}) if kind == "adamp" else (torch_adamp.SGDP, {"momentum": 0.9})

    def make(corrected: Any, **path: Any) -> Callable[[list[Tensor]], torch.optim.Optimizer]:
        return lambda ps: _scheduled(cls(ps, lr=1e-2, weight_decay=0.5, wd_ratio=0.5, track_stats=True,
                                         corrected_weight_decay=corrected, **extra, **path))  # fmt: skip

    ref, ref_views = run(make(mode, foreach=True), TILE_SHAPES, 8)
    got, views = triton_run(make(mode, fused=True), "gpu", shapes=TILE_SHAPES, steps=8)
    plain, _ = run(make(False, foreach=True), TILE_SHAPES, 8)
    assert views == ref_views
    assert rel(got, ref) < 1e-6
    assert rel(plain, ref) > 1e-4


@interpreted
def test_corrected_weight_decay_with_a_tensor_lr_keeps_the_multi_tensor_path() -> None:
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(6, 4, 3, 3), (5, 7)]]
    with triton_backend():
        opt = torch_adamp.AdamP(
            params, lr=torch.tensor(1e-2), weight_decay=0.1, corrected_weight_decay=True, fused=True
        )
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    assert not plans(opt)


@interpreted
def test_the_triton_path_is_taken() -> None:
    """fused=True under the switch steps through the plan (every tensor of SHAPES taken, none refused)."""
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(6, 4, 3, 3), (5, 7), (7,), (), (0, 3)]]
    with triton_backend():
        opt = torch_adamp.AdamP(params, fused=True)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    (plan,) = plans(opt)
    assert len(plan.params) == len(params)
    assert opt._workspace.backend.fused == "triton"


@interpreted
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["adamp", "sgdp"])
def test_half_precision(kind: str, dtype: torch.dtype) -> None:
    """bf16/fp16 parameters with float32 state: the math in float32, rounded once to nearest even when
    written (as the multi-tensor path's write-back; the interpreter's own bfloat16 conversion truncates, so
    the kernels round by integer arithmetic). Rounding hides the float32 differences: measured bitwise here;
    a truncating conversion is 2e-2 off."""
    make = helpers.SMALL_MAKERS[kind]
    ref, ref_views = run(lambda ps: make(ps, foreach=True, track_stats=True), dtype=dtype, steps=6)
    got, views = triton_run(lambda ps: make(ps, fused=True, track_stats=True), dtype=dtype, steps=6)
    assert all(p.dtype is dtype for p in got)
    assert views == ref_views
    assert rel(got, ref) < 2e-3


@interpreted
def test_refused_tensors_take_the_multi_tensor_path() -> None:
    """float64 buckets, transposed weights, gradients with other strides, half-precision state: the
    multi-tensor path (the same bits as foreach for those); channels_last weights are taken (rows outermost)."""
    gen = torch.Generator().manual_seed(5)

    def params() -> list[Tensor]:
        g = torch.Generator().manual_seed(5)
        conv = torch.randn(8, 4, 3, 3, generator=g).to(memory_format=torch.channels_last)
        mat = torch.randn(20, 12, generator=g).t()  # (12, 20), rows not outermost
        plain = torch.randn(10, 6, generator=g)
        return [torch.nn.Parameter(t) for t in (conv, mat, plain)]

    grads = [gradients(params(), k, gen) for k in range(5)]
    out = []
    for fused in (False, True):
        ps = params()
        with triton_backend():
            opt = torch_adamp.AdamP(ps, lr=1e-2, weight_decay=1e-2, track_stats=True, **helpers.path_kwargs(
                "fused" if fused else "foreach"))  # fmt: skip
            for k, gs in enumerate(grads):
                for p, g in zip(ps, gs, strict=True):
                    g = g.contiguous(memory_format=torch.channels_last) if g.dim() == 4 else g
                    p.grad = g.t().contiguous().t() if g.dim() == 2 and k % 2 else g  # sometimes other strides
                opt.step()
        out.append(([p.detach().clone() for p in ps], opt.stats(), opt))
    (a, sa, _), (b, sb, opt) = out
    assert rel(a, b) < 1e-6
    assert {k: v for k, v in sa.items() if k.endswith("/view")} == {k: v for k, v in sb.items() if k.endswith("/view")}
    taken = {id(p) for plan in plans(opt) for p in plan.params}
    assert id(opt.param_groups[0]["params"][0]) in taken  # channels_last conv weight
    assert id(opt.param_groups[0]["params"][1]) not in taken  # transposed
    for dtype, kw in ((torch.float64, {}), (torch.bfloat16, {"fp32_state": False})):
        ref, ref_views = run(lambda ps, kw=kw: torch_adamp.AdamP(ps, foreach=True, track_stats=True, **kw), dtype=dtype)
        got, views = triton_run(
            lambda ps, kw=kw: torch_adamp.AdamP(ps, fused=True, track_stats=True, **kw), dtype=dtype
        )
        assert views == ref_views and rel(got, ref) == 0.0


# --------------------------------------------------------------------------------------------
# speculation
# --------------------------------------------------------------------------------------------

SPEC_CASES = [
    ("adamp", {}),
    ("adamp", {"nesterov": True, "maximize": True}),
    ("adamp", {"scale_invariant": "channel"}),
    ("sgdp", {"momentum": 0.9}),  # project_momentum: the buffer stores the projected direction
    ("sgdp", {"momentum": 0.9, "nesterov": True}),
    ("sgdp", {"momentum": 0.9, "project_momentum": False}),
]


def _spec_run(kind: str, options: dict[str, Any], speculate: bool, config: str) -> tuple[list[Tensor], Any, int, int]:
    """The schedule of views of test_fused (right and wrong guesses of every kind, a NaN at the end) on the
    Triton path: params and state, views, and how many guessed tensors were right and wrong."""
    old = backend.SPECULATE
    backend.SPECULATE = speculate
    try:
        gen = torch.Generator().manual_seed(3)
        shapes = [(16, 8, 3, 3), (12, 20), (6, 1, 5), (1, 30), (30, 13), (6, 41), (5, 300), (3, 2100)]
        params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
        right = wrong = 0
        with triton_backend(config):
            if kind == "adamp":
                opt: Any = torch_adamp.AdamP(
                    params, lr=3e-2, weight_decay=1e-2, fused=True, track_stats=True, **options
                )
            else:
                opt = torch_adamp.SGDP(params, lr=0.1, weight_decay=1e-3, fused=True, track_stats=True, **options)
            views = []
            for step in range(SPEC_STEPS):
                for p, g in zip(params, _spec_grads(params, step, gen), strict=True):
                    p.grad = g
                opt.step()
                views.append([opt.stats()[f"group0.param{i}/view"] for i in range(len(params))])
                (plan,) = plans(opt)
                flags = plan.buf.flags[: len(params)].tolist()
                proj = [m[7] for m in plan.layout.meta]
                right += sum(1 for f, pj in zip(flags, proj, strict=True) if pj and f & 2 and not f & 1)
                wrong += sum(1 for f, pj in zip(flags, proj, strict=True) if pj and f & 2 and f & 1)
        state = [t for p in params for t in opt.state[p].values() if isinstance(t, Tensor) and t.dim() > 0]
        return [p.detach() for p in params] + state, views, right, wrong
    finally:
        backend.SPECULATE = old


@interpreted
@pytest.mark.parametrize("case", SPEC_CASES, ids=str)
def test_speculation_changes_no_bit(case: tuple[str, dict[str, Any]]) -> None:
    """Right and wrong guesses of both kinds (channel and none; a channel guess failing on the last rows,
    'late'), on tiles of whole rows, rows in several tile rows and rows longer than a tile: the same bits
    and views as without speculation (a NaN gradient at the last step included)."""
    config = "gpu"
    kind, options = case
    got, views, right, wrong = _spec_run(kind, options, True, config)
    ref, ref_views, r0, w0 = _spec_run(kind, options, False, config)
    assert views == ref_views
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    assert (r0, w0) == (0, 0)
    if options.get("scale_invariant", "auto") == "auto":
        assert right >= 10 and wrong >= 5, (right, wrong)


@interpreted
def test_speculation_is_bounded_by_the_spare_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tensors past SPARE_MAX_BYTES get no spare block and take two passes: the same bits."""
    monkeypatch.setattr(backend, "SPARE_MAX_BYTES", 16 * 8 * 9 * 4)  # room for the first tensor only
    got, views, right, _ = _spec_run("adamp", {}, True, "gpu")
    ref, ref_views, _, _ = _spec_run("adamp", {}, False, "gpu")
    assert views == ref_views
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    assert 0 < right < 40  # the first tensor only


# --------------------------------------------------------------------------------------------
# step counters, lr, maximize, SGDP's buffer
# --------------------------------------------------------------------------------------------


@interpreted
@pytest.mark.parametrize("where", ["device", "host", "capturable"])
def test_step_counters(where: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Counters read and advanced by the kernels (on the parameters' device), or advanced on the host and
    uploaded (CPU counters of CUDA parameters, forced here), or capturable: the same numbers."""
    monkeypatch.setattr(backend, "FORCE_HOST_STEPS", where == "host")
    kw: dict[str, Any] = dict(lr=1e-2, weight_decay=1e-2, track_stats=True, capturable=where == "capturable")
    ref, ref_views = run(lambda ps: torch_adamp.AdamP(ps, foreach=True, **kw), steps=5)
    with triton_backend():
        got, views = run(lambda ps: torch_adamp.AdamP(ps, fused=True, **kw), steps=5)
    assert views == ref_views and rel(got, ref) < 1e-6
    ps = [torch.nn.Parameter(torch.randn(4, 3))]
    with triton_backend():
        opt = torch_adamp.AdamP(ps, fused=True, **kw)
        for _ in range(3):
            ps[0].grad = torch.randn(4, 3)
            opt.step()
    assert opt.state[ps[0]]["step"].item() == 3
    assert plans(opt)[0].steps == (2 if where == "host" else 1)


@interpreted
def test_tensor_lr_and_lr_changes() -> None:
    """A tensor lr is read by the kernels; a float lr is uploaded when it changes: the same numbers."""
    out = []
    for lr in (1e-2, torch.tensor(1e-2)):
        gen = torch.Generator().manual_seed(1)
        p = torch.nn.Parameter(torch.randn(6, 5, generator=gen))
        with triton_backend():
            opt = torch_adamp.AdamP([p], lr=lr, fused=True, weight_decay=0.1)
            for step in range(4):
                p.grad = torch.randn(6, 5, generator=gen)
                opt.step()
                if step == 1:
                    if isinstance(lr, Tensor):
                        lr.fill_(5e-3)
                    else:
                        opt.param_groups[0]["lr"] = 5e-3
        out.append(p.detach().clone())
    torch.testing.assert_close(out[0], out[1], rtol=1e-6, atol=1e-7)


@interpreted
def test_sgdp_project_momentum_semantics() -> None:
    """project_momentum=True (reference): the stored buffer is the projected direction; False: raw."""
    for pm in (True, False):
        bufs = []
        for triton in (False, True):
            gen = torch.Generator().manual_seed(3)
            p = torch.nn.Parameter(torch.randn(8, 5, generator=gen))
            p.grad = _orthogonal(p.detach(), torch.randn(8, 5, generator=gen), rows=True)
            with triton_backend():
                opt = torch_adamp.SGDP([p], lr=0.1, momentum=0.9, project_momentum=pm,
                                       **({"fused": True} if triton else {"foreach": False}))  # fmt: skip
                opt.step()
                p.grad = _orthogonal(p.detach(), torch.randn(8, 5, generator=gen), rows=True)
                opt.step()
            bufs.append(opt.state[p]["momentum"].clone())
        torch.testing.assert_close(bufs[0], bufs[1], rtol=1e-6, atol=1e-7)


@interpreted
def test_functional_api_without_workspace() -> None:
    """The functional API has no workspace: a plan per call, no guesses; the same numbers as foreach."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(6, 4, 3, 3), (5, 7), (7,)]
    out = []
    for fused in (True, False):
        ps = [torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(shapes)]
        m, v, steps = (
            [torch.zeros_like(p) for p in ps],
            [torch.zeros_like(p) for p in ps],
            [torch.zeros(()) for _ in ps],
        )
        with triton_backend():
            for k in range(3):
                gs = [torch.randn(s, generator=torch.Generator().manual_seed(10 * k + i)) for i, s in enumerate(shapes)]
                torch_adamp.adamp(ps, gs, m, v, steps, fused=fused, foreach=None if fused else True, lr=1e-2,
                                  beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, delta=0.1, wd_ratio=0.1,
                                  nesterov=False)  # fmt: skip
        out.append(ps)
    del gen
    assert rel(out[0], out[1]) < 1e-6


# --------------------------------------------------------------------------------------------
# no host read
# --------------------------------------------------------------------------------------------


class HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every operator that reads a tensor's value to the host, and every copy to the CPU."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in helpers.HOST_READS:
            self.reads.append(str(func))
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            src = args[1] if func is torch.ops.aten.copy_.default else args[0]
            dst_device = args[0].device if func is torch.ops.aten.copy_.default else kwargs.get("device")
            if isinstance(src, Tensor) and src.device.type == "cuda" and dst_device is not None:
                if torch.device(dst_device).type == "cpu":
                    self.reads.append(f"{func} cuda -> cpu")
        return func(*args, **kwargs)


@contextlib.contextmanager
def watched() -> Iterator[HostReads]:
    mode = HostReads()
    patched = {}
    for name in ("tolist", "numpy", "__array__", "item", "__bool__", "__float__", "__int__"):
        original = getattr(Tensor, name)

        def watch(self: Tensor, *a: Any, original: Any = original, name: str = name, **k: Any) -> Any:
            mode.reads.append(name)
            return original(self, *a, **k)

        patched[name] = original
        setattr(Tensor, name, watch)
    try:
        with mode:
            yield mode
    finally:
        for name, original in patched.items():
            setattr(Tensor, name, original)


@interpreted
@pytest.mark.parametrize("kind", ["adamp", "sgdp"])
def test_no_host_read_in_step(kind: str) -> None:
    """A step (tensor lr, capturable counters, GradScaler's grad_scale and found_inf, track_stats' views)
    reads no tensor value to the host: every value the kernels need is passed by pointer."""
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(6, 4, 3, 3), (5, 7), (7,)]]
    lr = torch.tensor(1e-2)
    with triton_backend():
        if kind == "adamp":
            opt: Any = torch_adamp.AdamP(params, lr=lr, fused=True, capturable=True, weight_decay=0.1)
        else:
            opt = torch_adamp.SGDP(params, lr=lr, fused=True, momentum=0.9, weight_decay=0.1)
        for step in range(3):
            for p in params:
                p.grad = torch.randn_like(p)
            opt.grad_scale, opt.found_inf = torch.tensor(4.0), torch.tensor(float(step == 1))
            with watched() as mode:
                opt.step()
            assert mode.reads == [], mode.reads


@needs_triton
@pytest.mark.parametrize("kind", ["adamp", "sgdp"])
def test_cuda_dispatch_makes_no_host_read(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The host side of a step on CUDA tensors (fake ones: this machine has no GPU), with the launches
    recorded instead of run: the Triton back end is chosen, its tables are built and updated, and nothing is
    read from the device (no item(), no bool(), no copy to the CPU), with float and tensor lr, CPU and device
    step counters, GradScaler's tensors and track_stats."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from torch_adamp.triton import driver

    launches: list[tuple[Any, ...]] = []
    uploads: list[tuple[Tensor, Tensor]] = []
    monkeypatch.setattr(driver, "launch", lambda *a: launches.append(a))
    monkeypatch.setattr(backend, "_plain", lambda params: True)  # fake tensors stand in for CUDA ones
    # a copy to fake CUDA memory needs a CUDA build: recorded (host to device, never back)
    monkeypatch.setattr(driver, "upload", lambda dst, src: uploads.append((dst, src)))
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())  # no CUDA here
    with FakeTensorMode(allow_non_fake_inputs=True):
        params = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in [(6, 4, 3, 3), (5, 7), (7,)]]
        for capturable in (False, True):
            kw: dict[str, Any] = dict(lr=1e-2, fused=True, weight_decay=0.1, track_stats=True)
            if kind == "adamp":
                opt: Any = torch_adamp.AdamP(params, capturable=capturable, **kw)
            else:
                opt = torch_adamp.SGDP(params, momentum=0.9, **kw)
            if capturable:  # a tensor lr on the device (set after construction, which checks a value)
                opt.param_groups[0]["lr"] = torch.tensor(1e-2, device="cuda")
            for step in range(3):
                for p in params:
                    p.grad = torch.randn(p.shape, device="cuda")
                if capturable:
                    opt.grad_scale = torch.tensor(4.0, device="cuda")
                    opt.found_inf = torch.tensor(float(step == 1), device="cuda")
                with watched() as mode:
                    opt.step()
                assert mode.reads == [], mode.reads
    assert len(launches) == 6
    assert all(a[2].device.type == "cuda" for a in launches)  # like_p: the bucket's first parameter
    assert all(dst.device.type == "cuda" and src.device.type == "cpu" for dst, src in uploads)


# --------------------------------------------------------------------------------------------
# against adamp 0.3.0 (the reference suite's machinery)
# --------------------------------------------------------------------------------------------

REFERENCE_CASES = [
    ("conv_bn", "adamp-default"),
    ("linear_ln", "adamp-groups"),
    ("normed_weights", "sgdp-nesterov-wd"),
]


@interpreted
@pytest.mark.parametrize(("arch", "option_set"), REFERENCE_CASES)
def test_free_running_against_the_reference(arch: str, option_set: str) -> None:
    """100 free-running float32 steps against adamp 0.3.0: within 1e-6, the same decisions."""
    from test_reference_equivalence import TOL, _check_close

    o = helpers.OPTION_SETS[option_set]
    with triton_backend():
        result = helpers.run_lockstep(o.kind, arch, o.options, ["fused"], groups=o.groups)
    _check_close(result, "fused", torch.float32)
    assert result.final_rel["fused"] <= TOL[torch.float32]


@interpreted
@pytest.mark.parametrize("option_set", ["sgdp-readme", "adamp-lr1e-2"])
def test_large_lr_step_by_step_against_the_reference(option_set: str) -> None:
    """Large learning rates, one step at a time from the reference's state: within 1e-6, the same decisions."""
    from test_reference_equivalence import TIE, TOL, _check_decisions

    o = helpers.LARGE_LR_OPTION_SETS[option_set]
    with triton_backend():
        result = helpers.run_synced(o.kind, "conv_bn", o.options, "fused", groups=o.groups, steps=30)
    _check_decisions(result.mismatches, TIE[torch.float32])
    assert result.max_rel <= TOL[torch.float32], (result.max_rel, result.worst)


# --------------------------------------------------------------------------------------------
# without the interpreter
# --------------------------------------------------------------------------------------------


def test_import_does_not_import_triton() -> None:
    """``import torch_adamp`` never imports triton (an optional dependency), and CPU steps never import the
    Triton kernels (torch's dynamo, which the first step may load, imports triton itself where installed)."""
    code = (
        "import sys, torch, torch_adamp\n"
        "print('triton' in sys.modules)\n"
        "p = torch.nn.Parameter(torch.randn(4, 3)); p.grad = torch.randn(4, 3)\n"
        "torch_adamp.AdamP([p], fused=True).step(); torch_adamp.SGDP([p], lr=0.1).step()\n"
        "torch_adamp.AdamP([p], foreach=True).step()\n"
        "print([m for m in sys.modules if m.startswith('torch_adamp.triton')])"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_ADAMP_FUSED", "TRITON_INTERPRET")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["False", "[]"]


def test_the_switch_refuses_where_it_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """TORCH_ADAMP_FUSED=triton is read when the optimizer is built: refused without Triton, and on a machine
    without CUDA outside the interpreter, with an error that says what to set."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine runs the Triton back end without the interpreter")
    monkeypatch.setenv("TORCH_ADAMP_FUSED", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    p = torch.nn.Parameter(torch.randn(3, 2))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        torch_adamp.AdamP([p], fused=True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else object())
    with pytest.raises(RuntimeError, match="Triton is not installed"):
        torch_adamp.SGDP([p], lr=0.1, fused=True)
    monkeypatch.delenv("TORCH_ADAMP_FUSED")
    torch_adamp.AdamP([p], fused=True)  # the default back end builds


@needs_triton
def test_cpu_step_refused_when_triton_was_imported_without_the_interpreter() -> None:
    """Forced onto CPU tensors in a process whose kernels are compiled (not interpreted), the step refuses
    before changing anything."""
    if INTERPRETING:
        pytest.skip("this process interprets the kernels")
    p = torch.nn.Parameter(torch.randn(3, 2))
    p.grad = torch.randn(3, 2)
    before = p.detach().clone()
    with helpers.fused_backend("triton"):
        opt = torch_adamp.AdamP([p], fused=True)
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            opt.step()
    assert torch.equal(p.detach(), before)


@needs_triton
@pytest.mark.skipif(INTERPRETING, reason="the interpreter suite runs this at length in this process")
def test_an_interpreted_step_in_a_subprocess() -> None:
    """What .ci/run's interpreter suite checks at length, once, in every test run: TORCH_ADAMP_FUSED=triton
    with TRITON_INTERPRET=1 takes the Triton kernels for CPU tensors; the same decisions and numbers as foreach."""
    code = """
import sys, torch, torch_adamp
sys.path.insert(0, "tests")
from test_fused import run, rel
for make in (lambda ps, **k: torch_adamp.AdamP(ps, lr=1e-2, weight_decay=1e-2, track_stats=True, **k),
             lambda ps, **k: torch_adamp.SGDP(ps, lr=1e-2, momentum=0.9, track_stats=True, **k)):
    got, views = run(lambda ps: make(ps, fused=True), steps=4)
    ref, ref_views = run(lambda ps: make(ps, foreach=True), steps=4)
    opt = make([torch.nn.Parameter(torch.randn(3, 2))], fused=True)
    assert opt._workspace.backend.fused == "triton"
    assert views == ref_views and rel(got, ref) < 1e-6, rel(got, ref)
print("ok")
"""
    env = {**os.environ, "TRITON_INTERPRET": "1", "TORCH_ADAMP_FUSED": "triton"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


@needs_triton
@pytest.mark.skipif(INTERPRETING, reason="run once, by the main test run")
def test_the_gpu_check_dry_run() -> None:
    """``benchmarks/gpu_check.py --dry-run``: the GPU check's own code on CPU tensors (kernels interpreted,
    small shapes), one set timed; its correctness rows pass and it prints its one table."""
    env = {k: v for k, v in os.environ.items() if k != "TORCH_ADAMP_FUSED"}
    cmd = [sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--sets", "resnet50", "--rounds", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    table = [line for line in out.stdout.splitlines() if line.startswith("|")]
    assert any("triton vs foreach" in line and "ok" in line for line in table), out.stdout
    assert any("GradScaler" in line and "ok" in line for line in table), out.stdout
    assert not any("FAIL" in line for line in table), out.stdout
