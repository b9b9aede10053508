"""GradScaler's protocol (``_step_supports_amp_scaling``) on every path: per-tensor, multi-tensor, the native
fused CPU kernel and the torch.compile back end (forced on the CPU).

``torch.amp.GradScaler.step`` sets ``opt.grad_scale`` (``None`` after ``unscale_``) and ``opt.found_inf``
and calls ``opt.step()`` unconditionally; the step unscales and skips on the device. Checked here:

* a scaled run equals the unscaled run **bitwise** when the scale is a power of two: ``g * 2^k`` is exact
  (a product that overflowed is inf, and that step is skipped), and ``(g 2^k) * 2^-k`` gives back ``g``
  exactly, so every later operation sees the very inputs of the unscaled run, in the same order; a scale
  that is not a power of two rounds twice and is only close;
* a step with an inf/NaN gradient leaves parameters, moments/buffers and step counters bit for bit,
  signed zeros included (SGDP's in-place buffer projection does not fire);
* ``unscale_`` + ``clip_grad_norm_`` in between (``grad_scale is None``, ``found_inf`` set);
* no host read of ``found_inf``/``grad_scale``, or of anything computed from them, inside ``scaler.step``:
  a dispatch mode follows their data flow and flags every ``_local_scalar_dense`` (``item()``,
  ``bool()``, ``float()``), ``is_nonzero``, ``equal``, ``nonzero`` on a tainted tensor, and
  ``tolist``/``numpy`` are patched; the same detector flags torch's own non-fused AdamW, so it can fail.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import helpers
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakTensorKeyDictionary

import torch_adamp

#: the Triton back end runs here only in Triton's interpreter (TRITON_INTERPRET=1 before triton is imported: the
#: separate run of .ci/run, which selects its cases with -k triton)
TRITON = os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None
PATHS = ("single", "foreach", "native", "compile") + (("triton",) if TRITON else ())
if TRITON:
    helpers.interpret_triton_faster()
OPTIONS: list[tuple[type, dict[str, Any]]] = [
    (torch_adamp.AdamP, dict(lr=1e-2, weight_decay=0.1)),
    (torch_adamp.AdamP, dict(lr=1e-2, nesterov=True, maximize=True, wd_ratio=0.5, weight_decay=0.01)),
    (torch_adamp.SGDP, dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),
    (torch_adamp.SGDP, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)),
    (torch_adamp.SGDP, dict(lr=0.1, momentum=0.9, dampening=0.1, project_momentum=False)),
]
IDS = [f"{cls.__name__}-{'-'.join(k for k in kw if k != 'lr')}" for cls, kw in OPTIONS]
#: the option sets the compile back end runs (its graph is the multi-tensor path's code, which runs all)
COMPILED = (0, 2)


def cases(indices: range | tuple[int, ...] = range(len(OPTIONS))) -> list[Any]:
    """``(cls, kw, path)`` for the option sets ``indices`` on every path (compile: those of :data:`COMPILED`)."""
    return [
        pytest.param(*OPTIONS[i], path, id=f"{IDS[i]}-{path}")
        for i in indices
        for path in PATHS
        if path != "compile" or i in COMPILED
    ]


#: a conv and a linear weight (projected), a bias (never), and one larger than the kernel's staging size
SHAPES = [(8, 4, 3, 3), (8,), (6, 10), (520, 512)]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def compile_counter() -> Iterator[Any]:
    """Dynamo's counting ``eager`` backend for the compile back end (fast; every graph is fullgraph=True)."""
    with helpers.counting_compile_backend() as counter:
        yield counter


def path_kwargs(path: str) -> dict[str, Any]:
    return {"single": dict(foreach=False), "foreach": dict(foreach=True), "default": {}}.get(path, dict(fused=True))


def backend(path: str, *opts: Any) -> Any:
    """The back end of ``fused=True`` for ``opts`` and optimizers built inside."""
    return helpers.fused_backend(path if path in ("compile", "triton") else "auto", *opts)


def params(dtype: torch.dtype = torch.float32, shapes: list[tuple[int, ...]] = SHAPES) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]


def grads(step: int, ps: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    # mostly orthogonal to the weights (projected), with a radial part on the large tensor (its test may fail)
    out = []
    for p in ps:
        g = torch.randn(p.shape, generator=gen).to(p.dtype)
        if p.dim() > 1 and p.shape[0] < 100:
            w = p.detach().reshape(p.shape[0], -1)
            gr = g.reshape(p.shape[0], -1)
            gr -= (gr * w).sum(1, keepdim=True) / (w * w).sum(1, keepdim=True) * w
        out.append(g * 1e-2)
    return out


def snapshot(opt: torch.optim.Optimizer, ps: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    """Parameters, then every state tensor (moments, buffers, step counters), as raw bits."""
    out = [p.detach().clone() for p in ps]
    for p in ps:
        out += [v.detach().clone() for _, v in sorted(opt.state[p].items()) if isinstance(v, torch.Tensor)]
    return out


def bits(t: torch.Tensor) -> torch.Tensor:
    ints = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}
    return t.reshape(-1).view(ints[t.element_size()]) if t.is_floating_point() else t.reshape(-1)


def assert_bitwise(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        assert x.dtype == y.dtype and x.shape == y.shape, i
        assert torch.equal(bits(x), bits(y)), f"tensor {i} (shape {tuple(x.shape)}) differs"


def scaler_of(init_scale: float, **kw: Any) -> torch.amp.GradScaler:
    return torch.amp.GradScaler("cpu", init_scale=init_scale, **kw)


def scaled_step(scaler: torch.amp.GradScaler, opt: Any, ps: list[torch.nn.Parameter], gs: list[torch.Tensor]) -> None:
    """``p.grad`` as the backward of ``scaler.scale(loss)`` gives it (exactly ``scale * g``), then step/update."""
    scale = scaler.scale(torch.ones(()))
    for p, g in zip(ps, gs, strict=True):
        p.grad = g * scale.to(g.dtype)
    scaler.step(opt)
    scaler.update()


#: the steps of the runs below whose gradients hold an inf, a NaN (both skipped) or a huge finite value
INF_STEP, NAN_STEP = 2, 4


def poisoned(step: int, gs: list[torch.Tensor]) -> list[torch.Tensor]:
    gs = [g.clone() for g in gs]
    if step == INF_STEP:
        gs[1][0] = math.inf
    if step == NAN_STEP:
        gs[3][7, 3] = math.nan
    return gs


def run(
    cls: type, kw: dict[str, Any], path: str, scale: float | None, steps: int = 6, **extra: Any
) -> tuple[list[torch.Tensor], Any, list[torch.nn.Parameter]]:
    """``steps`` steps with an inf and a NaN step; ``scale=None``: unscaled, the bad steps left out by hand."""
    ps = params(extra.pop("dtype", torch.float32))
    opt = cls(ps, **kw, **path_kwargs(path), **extra)
    with backend(path, opt):
        poisoned_steps(opt, ps, scale, steps)
    return snapshot(opt, ps), opt, ps


def poisoned_steps(opt: Any, ps: list[torch.nn.Parameter], scale: float | None, steps: int) -> None:
    """``steps`` steps of ``opt`` with the poisoned gradients: through a GradScaler of ``scale`` (growth every 2
    steps), or, with ``scale=None``, unscaled with the inf and NaN steps left out by hand."""
    scaler = scaler_of(scale, growth_interval=2) if scale is not None else None
    for step in range(steps):
        gs = poisoned(step, grads(step, ps))
        if scaler is not None:
            scaled_step(scaler, opt, ps, gs)
        elif step not in (INF_STEP, NAN_STEP):
            for p, g in zip(ps, gs, strict=True):
                p.grad = g
            opt.step()


# --------------------------------------------------------------------------------------------
# the protocol
# --------------------------------------------------------------------------------------------


def test_the_scaler_takes_the_protocol() -> None:
    """AdamP/SGDP claim the protocol; the scaler then sets and deletes grad_scale/found_inf around step()."""
    ps = params()
    for cls in (torch_adamp.AdamP, torch_adamp.SGDP):
        opt = cls(ps, lr=0.1)
        assert opt._step_supports_amp_scaling is True
        seen = []
        step = opt.step

        def spy(*a: Any, step: Callable[..., Any] = step, opt: Any = opt, seen: list[Any] = seen, **k: Any) -> Any:
            seen.append((getattr(opt, "grad_scale", "absent"), getattr(opt, "found_inf", "absent")))
            return step(*a, **k)

        opt.step = spy  # type: ignore[method-assign]
        scaler = scaler_of(2.0**8)
        scaled_step(scaler, opt, ps, grads(0, ps))
        ((gs, fi),) = seen
        assert isinstance(gs, torch.Tensor) and gs.dim() == 0 and float(gs) == 2.0**8
        assert isinstance(fi, torch.Tensor) and fi.dim() == 0 and float(fi) == 0.0
        assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")


@pytest.mark.parametrize(("cls", "kw", "path"), cases())
def test_scaled_run_is_the_unscaled_run_bitwise(cls: type, kw: dict[str, Any], path: str, compile_counter: Any) -> None:
    """Power-of-two scales (2^-3 .. 2^24, growing every 2 steps, backing off at the inf and NaN steps): the
    same bits as the unscaled run without the bad steps, parameters, moments, buffers and step counters."""
    ref, _, _ = run(cls, kw, path, None)
    for k in (-3, 24):
        got, _, _ = run(cls, kw, path, 2.0**k)
        assert_bitwise(got, ref)
    if path == "compile":
        assert compile_counter.frame_count > 0  # it did compile (fullgraph=True: no graph break, no .item())


@pytest.mark.parametrize(("cls", "kw", "path"), cases((0, 2)))
def test_other_scales_are_close(cls: type, kw: dict[str, Any], path: str, compile_counter: Any) -> None:
    """A scale that is not a power of two rounds twice (g * s, then * 1/s): close, not bitwise."""
    ref, _, _ = run(cls, kw, path, None)
    got, _, _ = run(cls, kw, path, 1000.0)
    for x, y in zip(got, ref, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("cls", "kw", "path"), cases((0, 2)))
def test_other_dtypes(cls: type, kw: dict[str, Any], path: str, dtype: torch.dtype, compile_counter: Any) -> None:
    """float64 parameters, and bfloat16 ones (stepped in float32 from upcast gradients: exact unscaling)."""
    ref, _, _ = run(cls, kw, path, None, steps=5, dtype=dtype)
    got, _, _ = run(cls, kw, path, 2.0**12, steps=5, dtype=dtype)
    assert_bitwise(got, ref)


@pytest.mark.parametrize("path", PATHS)
def test_a_real_backward(path: str, compile_counter: Any) -> None:
    """``scaler.scale(loss).backward()`` through a small conv net: gradients are exactly scaled, and the run
    is the unscaled run bit for bit (default path too)."""

    def train(scaled: bool, kwargs: dict[str, Any]) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3),
            torch.nn.BatchNorm2d(8),
            torch.nn.ReLU(),
            torch.nn.Flatten(),
            torch.nn.Linear(8 * 36, 4),
        )
        opt = torch_adamp.AdamP(model.parameters(), lr=1e-2, weight_decay=1e-2, **kwargs)
        scaler = scaler_of(2.0**16, growth_interval=1)
        gen = torch.Generator().manual_seed(1)
        with backend(path, opt):
            for _ in range(4):
                x, y = torch.randn(16, 3, 8, 8, generator=gen), torch.randint(0, 4, (16,), generator=gen)
                loss = torch.nn.functional.cross_entropy(model(x), y)
                opt.zero_grad()
                if scaled:
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                else:
                    loss.backward()
                    opt.step()
        return snapshot(opt, list(model.parameters()))

    for kwargs in [path_kwargs(path)] + ([{}] if path == "native" else []):
        assert_bitwise(train(True, kwargs), train(False, kwargs))


# --------------------------------------------------------------------------------------------
# skipped steps
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [math.inf, math.nan])
@pytest.mark.parametrize(("cls", "kw", "path"), cases())
def test_a_skipped_step_changes_nothing(
    cls: type, kw: dict[str, Any], path: str, bad: float, compile_counter: Any
) -> None:
    """After 3 steps, a step with one bad gradient element (on the projected large tensor: the kernel's
    speculative sweep) leaves every parameter, state tensor and step counter bit for bit, signed zeros
    included (planted: ``w + 0.0`` would turn ``-0.0`` into ``+0.0``; not in ``exp_avg_sq``, a sum of
    squares that is never ``-0.0``), and the gradients too."""
    ps = params()
    opt = cls(ps, **kw, **path_kwargs(path))
    scaler = scaler_of(2.0**10)
    with backend(path, opt):
        for step in range(3):
            scaled_step(scaler, opt, ps, grads(step, ps))
        with torch.no_grad():
            for p in ps:
                p.view(-1)[:3] = -0.0
                for name, v in opt.state[p].items():
                    if v.dim() > 0 and name != "exp_avg_sq":
                        v.view(-1)[:2] = -0.0
        before = snapshot(opt, ps)
        gs = grads(3, ps)
        gs[3][11, 5] = bad
        scale = scaler.scale(torch.ones(()))
        for p, g in zip(ps, gs, strict=True):
            p.grad = g * scale
        grads_before = [p.grad.clone() for p in ps]  # type: ignore[union-attr]
        scaler.step(opt)
        scaler.update()
    assert_bitwise(snapshot(opt, ps), before)
    assert_bitwise([p.grad for p in ps], grads_before)  # type: ignore[misc]
    assert scaler.get_scale() == 2.0**9  # the scaler saw the inf/NaN and backed off
    if cls is torch_adamp.AdamP:
        assert all(opt.state[p]["step"].item() == 3 for p in ps)


@pytest.mark.parametrize("path", PATHS)
def test_sgdp_buffer_projection_does_not_fire(path: str, compile_counter: Any) -> None:
    """SGDP(project_momentum=True) projects its buffer in place: with found_inf set it must not (its
    gradient of zeros would pass the scale-invariance test, and the buffer would lose its radial part)."""
    ps = params(shapes=[(16, 32)])
    opt = torch_adamp.SGDP(ps, lr=0.1, momentum=0.9, project_momentum=True, **path_kwargs(path))
    scaler = scaler_of(4.0)
    with backend(path, opt):
        scaled_step(scaler, opt, ps, [torch.randn(16, 32)])  # a radial gradient: the buffer has a radial part
        buf = opt.state[ps[0]]["momentum_buffer" if "momentum_buffer" in opt.state[ps[0]] else "momentum"].clone()
        scaled_step(scaler, opt, ps, [torch.full((16, 32), math.nan)])
    state = opt.state[ps[0]]
    assert_bitwise([state["momentum_buffer" if "momentum_buffer" in state else "momentum"]], [buf])


@pytest.mark.parametrize("path", PATHS)
def test_skipped_first_step(path: str, compile_counter: Any) -> None:
    """A skipped first step (t = 0: bias corrections 1 - b^0 = 0) leaves zeros and a zero counter, and the
    run goes on as one that started a step later."""
    ps, ref_ps = params(), params()
    opt = torch_adamp.AdamP(ps, lr=1e-2, **path_kwargs(path))
    ref = torch_adamp.AdamP(ref_ps, lr=1e-2, **path_kwargs(path))
    scaler = scaler_of(2.0**5)
    with backend(path, opt, ref):
        scaled_step(scaler, opt, ps, [torch.full(p.shape, math.inf) for p in ps])
        assert all(opt.state[p]["step"].item() == 0 and opt.state[p]["exp_avg"].abs().sum() == 0 for p in ps)
        for step in range(2):
            scaled_step(scaler, opt, ps, grads(step, ps))
            for p, g in zip(ref_ps, grads(step, ref_ps), strict=True):
                p.grad = g
            ref.step()
    assert_bitwise(snapshot(opt, ps), snapshot(ref, ref_ps))


# --------------------------------------------------------------------------------------------
# unscale_ and clipping
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("cls", "kw"), OPTIONS[:1] + OPTIONS[2:3], ids=IDS[:1] + IDS[2:3])
def test_unscale_then_clip(cls: type, kw: dict[str, Any], path: str, compile_counter: Any) -> None:
    """``scaler.unscale_(opt)`` then ``clip_grad_norm_``: the step gets ``grad_scale=None`` and ``found_inf``;
    the run is the unscaled, clipped run bit for bit, and a bad step is still skipped."""
    ps, ref_ps = params(), params()
    opt, ref = cls(ps, **kw, **path_kwargs(path)), cls(ref_ps, **kw, **path_kwargs(path))
    seen: list[Any] = []
    step_fn = opt.step

    def spy(*a: Any, **k: Any) -> Any:
        seen.append((getattr(opt, "grad_scale", "absent"), getattr(opt, "found_inf", "absent")))
        return step_fn(*a, **k)

    opt.step = spy  # type: ignore[method-assign]
    scaler = scaler_of(2.0**12)
    with backend(path, opt, ref):
        for step in range(5):
            gs = poisoned(step, grads(step, ps))
            scale = scaler.scale(torch.ones(()))
            for p, g in zip(ps, gs, strict=True):
                p.grad = g * scale
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(ps, max_norm=0.05)
            scaler.step(opt)
            scaler.update()
            if step not in (INF_STEP, NAN_STEP):
                for p, g in zip(ref_ps, gs, strict=True):
                    p.grad = g.clone()
                torch.nn.utils.clip_grad_norm_(ref_ps, max_norm=0.05)
                ref.step()
    assert all(gs is None and isinstance(fi, torch.Tensor) for gs, fi in seen) and len(seen) == 5
    assert_bitwise(snapshot(opt, ps), snapshot(ref, ref_ps))


@pytest.mark.parametrize("path", PATHS)
def test_grad_scale_and_unscale_agree_for_any_scale(path: str, compile_counter: Any) -> None:
    """The step divides by the scale as ``unscale_`` does (times ``float(1 / double(scale))``): with a scale
    that is not a power of two, ``scaler.step`` and ``unscale_`` + ``scaler.step`` give the same bits."""
    out = []
    for unscale in (False, True):
        ps = params()
        opt = torch_adamp.AdamP(ps, lr=1e-2, weight_decay=0.1, **path_kwargs(path))
        scaler = scaler_of(1234.5, growth_interval=1, growth_factor=1.7)
        with backend(path, opt):
            for step in range(4):
                scale = scaler.scale(torch.ones(()))
                for p, g in zip(ps, grads(step, ps), strict=True):
                    p.grad = g * scale
                if unscale:
                    scaler.unscale_(opt)
                scaler.step(opt)
                scaler.update()
        out.append(snapshot(opt, ps))
    assert_bitwise(out[0], out[1])


# --------------------------------------------------------------------------------------------
# no host read of found_inf / grad_scale
# --------------------------------------------------------------------------------------------


class HostReadsOfTaint(TorchDispatchMode):
    """Follows the data flow of the scaler's scale and found_inf (their outputs, mutated arguments and the
    bases of mutated views become tainted) and records every host read: tainted ones in ``tainted_reads``."""

    def __init__(self, sources: list[torch.Tensor]) -> None:
        super().__init__()
        self.taint = WeakTensorKeyDictionary()
        for t in sources:
            self.taint[t] = True
        self.tainted_reads: list[str] = []
        self.reads = 0

    def tainted(self, t: Any) -> bool:
        return isinstance(t, torch.Tensor) and t in self.taint

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        check = torch.ops.aten._amp_foreach_non_finite_check_and_unscale_.default  # writes found_inf
        dirty = any(self.tainted(t) for t in inputs) or func is check
        if func in helpers.HOST_READS:
            self.reads += 1
            if dirty:
                self.tainted_reads.append(str(func))
        out = func(*args, **kwargs)
        if dirty:
            marked = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
            schema = func._schema
            for i, a in enumerate(schema.arguments):
                if a.alias_info is not None and a.alias_info.is_write:
                    value = args[i] if i < len(args) else kwargs.get(a.name)
                    marked += [t for t in tree_leaves(value) if isinstance(t, torch.Tensor)]
            for t in marked:
                self.taint[t] = True
                if t._base is not None:
                    self.taint[t._base] = True
        return out


def host_reads_in_step(scaler: torch.amp.GradScaler, opt: Any) -> tuple[list[str], int]:
    """``scaler.step(opt)`` under the taint mode, with ``tolist``/``numpy``/``__array__`` watched too."""
    mode = HostReadsOfTaint([scaler._scale])  # type: ignore[list-item]
    patched = {}
    for name in ("tolist", "numpy", "__array__"):
        original = getattr(torch.Tensor, name)

        def watch(self: torch.Tensor, *a: Any, original: Any = original, name: str = name, **k: Any) -> Any:
            if mode.tainted(self):
                mode.tainted_reads.append(name)
            return original(self, *a, **k)

        patched[name] = original
        setattr(torch.Tensor, name, watch)
    try:
        with mode:
            scaler.step(opt)
    finally:
        for name, original in patched.items():
            setattr(torch.Tensor, name, original)
    return mode.tainted_reads, mode.reads


@pytest.mark.parametrize("capturable", [False, True])
@pytest.mark.parametrize("path", ["single", "foreach", "native"] + (["triton"] if TRITON else []))
@pytest.mark.parametrize(("cls", "kw"), OPTIONS, ids=IDS)
def test_no_host_read_of_found_inf(cls: type, kw: dict[str, Any], path: str, capturable: bool) -> None:
    """Zero host reads of found_inf/grad_scale, or of anything computed from them, inside ``scaler.step``,
    for finite and for inf steps (the native kernel runs as its custom op under the mode: it reads the two
    floats in CPU memory through a pointer, which is no device synchronisation). With capturable step
    counters (or SGDP, which has none) the step reads nothing at all to the host."""
    if capturable and cls is torch_adamp.SGDP:
        pytest.skip("SGDP has no step counters")
    extra = dict(capturable=True) if capturable else {}
    ps = params()
    opt = cls(ps, **kw, **path_kwargs(path), **extra)
    scaler = scaler_of(2.0**10)
    with backend(path, opt):
        for step in range(3):
            gs = poisoned(step + 1, grads(step, ps))  # step 1 of these holds an inf
            scale = scaler.scale(torch.ones(()))
            for p, g in zip(ps, gs, strict=True):
                p.grad = g * scale
            tainted, reads = host_reads_in_step(scaler, opt)
            scaler.update()
            assert tainted == [], tainted
            if capturable or cls is torch_adamp.SGDP:
                assert reads == 0
    assert all(opt.state[p]["step"].item() == 2 for p in ps) if cls is torch_adamp.AdamP else True


def test_the_detector_sees_a_syncing_optimizer() -> None:
    """The same detector on torch's AdamW (no protocol: the scaler reads found_inf with .item()) and on
    AdamP made to read it: both flagged, so the test above can fail."""
    ps = params()
    scaler = scaler_of(2.0**10)
    scale = scaler.scale(torch.ones(()))
    for p, g in zip(ps, grads(0, ps), strict=True):
        p.grad = g * scale
    tainted, _ = host_reads_in_step(scaler, torch.optim.AdamW(ps, foreach=True))
    assert tainted, "the scaler's found_inf.item() should have been seen"

    class Reading(torch_adamp.AdamP):
        def step(self, closure: Any = None) -> Any:
            if self.found_inf.item():  # type: ignore[attr-defined]
                return None
            return super().step(closure)

    scaler.update()
    scale = scaler.scale(torch.ones(()))
    for p, g in zip(ps, grads(1, ps), strict=True):
        p.grad = g * scale
    tainted, _ = host_reads_in_step(scaler, Reading(ps, lr=1e-2, foreach=True))
    assert tainted


@pytest.mark.parametrize("cls", [torch_adamp.AdamP, torch_adamp.SGDP])
def test_compile_back_end_no_host_read(cls: type, compile_counter: Any) -> None:
    """The compile back end steps under ``torch.compile(fullgraph=True)`` with grad_scale and found_inf as
    graph inputs: a host read of either would be a graph break, which fullgraph turns into an error
    (``capture_scalar_outputs`` is off). One graph serves finite and skipped steps; nothing is read to
    Python during ``scaler.step`` (item/bool/float/tolist patched)."""
    assert not torch._dynamo.config.capture_scalar_outputs
    ps = params()
    opt = cls(ps, lr=1e-2, fused=True)
    scaler = scaler_of(2.0**10)
    calls: list[str] = []
    names = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy")
    with backend("compile", opt):
        for step in range(4):
            gs = poisoned(step + 1, grads(step, ps))
            scale = scaler.scale(torch.ones(()))
            for p, g in zip(ps, gs, strict=True):
                p.grad = g * scale
            saved = {n: getattr(torch.Tensor, n) for n in names}
            for n in names:

                def watch(self: torch.Tensor, *a: Any, n: str = n, f: Any = saved[n], **k: Any) -> Any:
                    calls.append(n)
                    return f(self, *a, **k)

                setattr(torch.Tensor, n, watch)
            try:
                scaler.step(opt)
            finally:
                for n, f in saved.items():
                    setattr(torch.Tensor, n, f)
            scaler.update()
            if step == 0:
                frames = compile_counter.frame_count
    assert frames == 1 and compile_counter.frame_count == 1  # one graph, no recompilation for the skip
    assert calls == []


# --------------------------------------------------------------------------------------------
# bad values, Projected
# --------------------------------------------------------------------------------------------


def test_bad_protocol_values_are_refused_before_anything_changes() -> None:
    ps = params()
    opt = torch_adamp.AdamP(ps, lr=1e-2)
    for p, g in zip(ps, grads(0, ps), strict=True):
        p.grad = g
    before = snapshot(opt, ps)
    for name, value in [("found_inf", "no"), ("found_inf", torch.zeros(2)), ("grad_scale", 2.0)]:
        setattr(opt, name, value)
        with pytest.raises(ValueError, match=name):
            opt.step()
        delattr(opt, name)
    assert_bitwise(snapshot(opt, ps), before)


def projected_run(inner_factory: Callable[[list[torch.nn.Parameter]], Any], scale: float | None) -> list[torch.Tensor]:
    ps = params()
    opt = torch_adamp.Projected(inner_factory(ps), wd_ratio=0.1)
    poisoned_steps(opt, ps, scale, 6)
    return snapshot(opt.inner, ps)


@pytest.mark.parametrize(
    ("factory", "supports"),
    [
        (lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True), True),
        (lambda ps: torch_adamp.SGDP(ps, lr=0.1, momentum=0.9, scale_invariant=False), True),
        (lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, foreach=True), False),
    ],
    ids=["AdamW-fused", "SGDP", "AdamW-foreach"],
)
def test_projected_follows_its_inner_optimizer(factory: Any, supports: bool) -> None:
    """Projected claims the protocol exactly when its inner optimizer does; either way a scaled run is the
    unscaled run bit for bit (power-of-two scale) and the inf/NaN steps change nothing."""
    ps = params()
    assert torch_adamp.Projected(factory(ps))._step_supports_amp_scaling is supports
    assert_bitwise(projected_run(factory, 2.0**10), projected_run(factory, None))


def test_projected_forwards_without_host_read() -> None:
    ps = params()
    opt = torch_adamp.Projected(torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True))
    scaler = scaler_of(2.0**10)
    for step in range(3):
        gs = poisoned(step + 1, grads(step, ps))
        scale = scaler.scale(torch.ones(()))
        for p, g in zip(ps, gs, strict=True):
            p.grad = g * scale
        tainted, _ = host_reads_in_step(scaler, opt)
        scaler.update()
        assert tainted == []
        assert not hasattr(opt.inner, "found_inf") and not hasattr(opt, "found_inf")


def test_projected_refuses_attributes_its_inner_cannot_take() -> None:
    ps = params()
    opt = torch_adamp.Projected(torch.optim.AdamW(ps, lr=1e-2, foreach=True))
    for p, g in zip(ps, grads(0, ps), strict=True):
        p.grad = g
    opt.found_inf = torch.zeros(())  # type: ignore[attr-defined]
    before = copy.deepcopy([p.detach() for p in ps])
    with pytest.raises(ValueError, match="GradScaler"):
        opt.step()
    assert_bitwise([p.detach() for p in ps], before)


@pytest.mark.parametrize(("cls", "kw", "path"), cases())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_are_unscaled_after_a_taken_step(
    cls: type, kw: dict[str, Any], path: str, dtype: torch.dtype, compile_counter: Any
) -> None:
    """torch's contract for optimizers that unscale themselves (its fused AdamW): after ``scaler.step`` that
    took the step, ``p.grad`` is the unscaled gradient (what gradient-norm logging, hooks and accumulation
    read); after a skipped step it is left scaled, as torch's fused kernels leave it. Every path, no host read
    (the compile path runs under fullgraph=True)."""
    ps = params(dtype)
    opt = cls(ps, **kw, **path_kwargs(path))
    scaler = scaler_of(2.0**12)
    with backend(path, opt):
        for step in range(4):
            gs = poisoned(step, grads(step, ps))
            scale = scaler.scale(torch.ones(()))
            for p, g in zip(ps, gs, strict=True):
                p.grad = g * scale.to(g.dtype)
            scaled = [p.grad.clone() for p in ps]  # type: ignore[union-attr]
            scaler.step(opt)
            scaler.update()
            want = scaled if step in (INF_STEP, NAN_STEP) else gs  # power-of-two scale: exact either way
            assert_bitwise([p.grad for p in ps], want)  # type: ignore[misc]


@pytest.mark.parametrize("path", ["single", "foreach", "fused", "default"])
@pytest.mark.parametrize(
    ("cls", "kw", "atol"),
    [
        (torch_adamp.SGDP, {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-3}, 1e-7),  # torch's strict atol
        (torch_adamp.SGDP, {}, 1e-7),
        (torch_adamp.AdamP, {"weight_decay": 1e-2}, 1e-7),
    ],
)
def test_torchs_grad_scaling_case(cls: type, kw: dict[str, Any], atol: float, path: str) -> None:
    """torch's own GradScaler case (``_create_scaling_case`` of torch.testing, the loop of its
    ``test_grad_scaling_autocast`` without autocast, which the CPU runs in bfloat16): a control run without
    scaling, whose skipped iteration is left out by hand, and a scaled run with an inf planted at that
    iteration; afterwards the gradients, the state and the parameters must agree (torch's assertions, its
    tolerances). Hardening round 3, item 1: the gradients differed by the scale (65536x by default)."""
    for enabled in (True, False):
        torch.manual_seed(0)
        kwargs = {"lr": 1.0 if cls is torch_adamp.SGDP else 1e-3, **kw, **path_kwargs(path)}
        # torch.testing._internal.common_cuda._create_scaling_case's case (that module needs expecttest)
        control = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
        scaling = copy.deepcopy(control)
        opt_control, opt_scaling = cls(control.parameters(), **kwargs), cls(scaling.parameters(), **kwargs)
        data = [(torch.randn(8, 8), torch.randn(8, 8)) for _ in range(4)]
        loss_fn, skip_iter = torch.nn.MSELoss(), 2
        scaler = torch.amp.GradScaler("cpu", init_scale=128.0, growth_factor=2.0, enabled=enabled, growth_interval=1)
        for model, opt, try_scaling in ((control, opt_control, False), (scaling, opt_scaling, True)):
            for i, (x, target) in enumerate(data):
                opt.zero_grad()
                loss = loss_fn(model(x), target)
                if try_scaling:
                    scaler.scale(loss).backward()
                    if i == skip_iter and scaler.is_enabled():
                        with torch.no_grad():
                            model[1].weight.grad.fill_(float("inf"))  # type: ignore[union-attr]
                    scaler.step(opt)
                    scaler.update()
                else:
                    loss.backward()
                    if not scaler.is_enabled() or i != skip_iter:
                        opt.step()
        assert scaler.get_scale() == (128.0 * 2.0**3 * 0.5 if enabled else 1.0)
        for c, s in zip(control.parameters(), scaling.parameters(), strict=True):
            torch.testing.assert_close(c.grad, s.grad, atol=atol, rtol=1e-5)
            for k in opt_control.state[c]:
                torch.testing.assert_close(opt_control.state[c][k], opt_scaling.state[s][k], atol=atol, rtol=1e-5)
            torch.testing.assert_close(c, s, atol=atol, rtol=1e-5)
