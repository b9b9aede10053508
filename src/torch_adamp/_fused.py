"""The fused path (``fused=True``, and the CPU default): one kernel per group, no host sync.

Two back ends, chosen per device/dtype group:

``native`` (CPU)
    :mod:`torch_adamp._native`: a C kernel per optimizer and dtype (float32,
    float64; half-precision parameters run in float32 through an upcast copy),
    built with the system C compiler once per machine (a few seconds, cached)
    and called through ``ctypes``. One call per group per step, whatever the
    number of tensors; nothing is ever recompiled (no shape or value
    specialisation: ``lr``, step counts and shapes are plain arguments). Under
    ``torch.compile`` the call is the custom op ``torch_adamp::adamp_cpu_`` /
    ``torch_adamp::sgdp_cpu_`` (opaque to the compiler: no graph break, no copy
    of the mutated lists). Tensors the kernel cannot take (non-contiguous, or
    with state of an unexpected dtype) go through the multi-tensor path.

``compile`` (any other device, or when the native kernels are unavailable)
    ``torch.compile(fullgraph=True, dynamic=False)`` of the multi-tensor
    functional step, with ``lr`` passed as a tensor: one graph per group and
    model, compiled at the first step and reused for every later step and
    learning rate (other hyper-parameters are compile-time constants; changing
    them recompiles). Designed for CUDA (device-side decisions, step counters on
    the device with ``capturable=True``); on CPU it is a correct but slow
    fallback (about a minute of compile for ResNet-50, then 4x the time of the
    native kernel; see docs/performance.md).

``TORCH_ADAMP_FUSED=native|compile`` forces a back end (tests, benchmarks).
Sharded parameters (``dist`` given) always take the multi-tensor path, which
implements the one-collective protocol of
:func:`~torch_adamp.projection.projection_coefficients`.
"""

import os
from array import array
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from . import _native, _update, projection

#: AdamP tensors up to this many bytes take the native kernel's staged scheme (u kept in a scratch buffer
#: for a second sweep that reads from the cache); larger ones the speculative sweep under the view of their
#: last step, or, without one, a read-only first pass, then rows (see :mod:`torch_adamp._native`). Same
#: arithmetic and decisions in every scheme. Measured on the development machine (1 MiB L2, 32 MiB L3):
#: staging beats the two-pass scheme up to about 1 MiB (7% on ResNet-50, 15% on 1000 x (64, 64)); with
#: the speculative sweep above it, thresholds from 0 to 1 MiB measured within noise on ResNet-50.
STAGE_BYTES = 1 << 20

#: the largest tensor the native kernel speculates on (it keeps a copy of the tensor's size between steps);
#: larger ones take two passes. Bounds that scratch: an embedding of 50k x 4096 would otherwise hold 800 MB.
SPECULATE_MAX_BYTES = 64 << 20

MODES: dict[projection.ScaleInvariant, int] = {False: 0, "auto": 1, "channel": 2, "layer": 3}


_forced: str | None = None


def backend_choice() -> str:
    """``"auto"`` (native on CPU when available, else compile), ``"native"`` or ``"compile"``."""
    choice = _forced or os.environ.get("TORCH_ADAMP_FUSED", "auto").strip().lower()
    return choice if choice in ("native", "compile") else "auto"


@contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force the back end of ``fused=True`` (``"native"`` or ``"compile"``) inside the block, in eager mode."""
    global _forced
    if name not in ("native", "compile", "auto"):
        raise ValueError(f"unknown fused back end {name!r}; expected 'native', 'compile' or 'auto'")
    old, _forced = _forced, name
    try:
        yield
    finally:
        _forced = old


def _native_available() -> bool:
    return backend_choice() != "compile" and _native.load() is not None


#: whether the CPU kernels can be used (builds them on first call; a constant under ``torch.compile``)
native_available: Callable[[], bool] = torch.compiler.assume_constant_result(_native_available)


def default_is_fused(params: Sequence[Tensor]) -> bool:
    """Whether ``foreach=None, fused=None`` takes the fused path: on CPU, when the native kernels load.

    Measured on CPU (docs/performance.md) the native kernel is 3.5-15x faster
    than the multi-tensor path (and 2.4-4.8x faster than torch's foreach
    AdamW) for a few seconds of compilation once per machine, so it is the
    CPU default. On other devices the default stays
    multi-tensor: a fused step there needs ``torch.compile`` at the first step.
    """
    return len(params) > 0 and params[0].device.type == "cpu" and native_available()


def _mode(scale_invariant: projection.ScaleInvariant) -> int:
    if scale_invariant is False:
        return 0
    return MODES[str(scale_invariant)]  # type: ignore[index]  # a validated option name


def _lr_value(lr: float | Tensor) -> float:
    return float(lr.item()) if isinstance(lr, Tensor) else float(lr)  # CPU tensor: no device sync


def _threads() -> int:
    return max(1, torch.get_num_threads())


def _bump_versions(tensors: list[Tensor]) -> None:
    """Tell autograd about the in-place writes done through raw pointers."""
    try:
        torch.autograd.graph.increment_version(tensors)
    except TypeError:  # torch < 2.5 takes one tensor at a time
        for t in tensors:
            torch.autograd.graph.increment_version(t)


# ---------------------------------------------------------------------------------------------
# native back end
# ---------------------------------------------------------------------------------------------


def _sizes(tensors: Sequence[Tensor], dtype: torch.dtype) -> list[int]:
    """Per tensor: its number of elements if the kernel can read it as a raw buffer (on the CPU, of
    ``dtype``, contiguous), else -1. One list comprehension per list: the per-tensor cost of a step."""
    return [t.numel() if t.is_cpu and t.dtype is dtype and t.is_contiguous() else -1 for t in tensors]


def _native_group(
    kind: str,
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    states: Sequence[Sequence[Tensor]],
    steps: Sequence[Tensor] | None,
    call: Callable[[Any, int, int, int, int, int], int],
) -> tuple[Tensor, list[int]]:
    """Pack raw pointers of one same-dtype CPU group (``params`` all on the CPU, of one dtype: the callers
    group them so) and run ``call(fn, n, ptrs, meta, views, spec_max)``; ``spec_max`` is the largest tensor the
    kernel may speculate on: 0 for half-precision parameters, which run through fresh float32 copies whose
    addresses say nothing about the previous step.

    Returns the view codes of the tensors the kernel took and the indices it
    refused (those run on the multi-tensor path): the kernel reads raw buffers,
    so every tensor must be on the CPU, contiguous, with the parameter's number
    of elements, and the state in the compute dtype. These checks run at every
    step (gradients are new tensors after ``zero_grad()``): about a microsecond
    per parameter, in list comprehensions.
    """
    lib = _native.load()
    assert lib is not None
    dtype = params[0].dtype
    cdt = _update.compute_dtype(dtype)
    fn = getattr(lib, f"torch_adamp_{kind}_{'f64' if cdt is torch.float64 else 'f32'}")
    numel = [p.numel() if p.is_contiguous() else -1 for p in params]  # one CPU dtype: see _partition
    others = [_sizes(grads, dtype), *(_sizes(lst, cdt) for lst in states)]
    steps_ok = steps is None or all([s.is_cpu and s.dtype is torch.float32 and s.numel() == 1 for s in steps])
    lists: list[Sequence[Tensor]] = [params, grads, *states] + ([steps] if steps is not None else [])
    refused: list[int] = []
    if not (steps_ok and -1 not in numel and all(o == numel for o in others)):  # some tensor is refused
        ok = [k >= 0 and all(o[i] == k for o in others) for i, k in enumerate(numel)]
        if steps is not None:
            f32 = torch.float32
            ok = [o and s.is_cpu and s.dtype is f32 and s.numel() == 1 for o, s in zip(ok, steps, strict=True)]
        refused = [i for i, o in enumerate(ok) if not o]
        taken = [i for i, o in enumerate(ok) if o]
        lists = [[lst[i] for i in taken] for lst in lists]
        numel = [numel[i] for i in taken]
    n = len(numel)
    codes = torch.zeros(n, dtype=torch.int64)
    if n == 0:
        return codes, refused
    write_back: list[tuple[Tensor, Tensor]] = []
    if dtype in _update.LOW_PRECISION:  # float32 copies of half-precision params and grads
        p32 = [p.float() for p in lists[0]]
        write_back = list(zip(lists[0], p32, strict=True))
        lists = [p32, [g.float() for g in lists[1]], *lists[2:]]
    ptrs = array("q", [t.data_ptr() for lst in lists for t in lst])
    meta = array("q", numel + [s[0] if len(s) > 1 else 0 for s in [p.shape for p in lists[0]]])
    spec_max = 0 if write_back else SPECULATE_MAX_BYTES
    if call(fn, n, ptrs.buffer_info()[0], meta.buffer_info()[0], codes.data_ptr(), spec_max) != 0:
        raise MemoryError(f"torch_adamp: the fused {kind} kernel could not allocate its scratch (nothing was updated)")
    for p, p32_ in write_back:
        p.copy_(p32_)
    _bump_versions([p for p, _ in write_back] or list(lists[0]))
    return codes, refused


def _adamp_native(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    delta: float,
    wd_ratio: float,
    nesterov: bool,
    maximize: bool,
    mode: int,
    capturable: bool = False,
) -> tuple[Tensor, list[int]]:
    """One CPU group through the native kernel; returns (view codes of the taken tensors, refused indices)."""
    lr_v = _lr_value(lr)

    def call(fn: Any, n: int, ptrs: int, meta: int, views: int, spec_max: int) -> int:
        return int(fn(n, ptrs, meta, lr_v, beta1, beta2, eps, weight_decay, delta, wd_ratio, nesterov, maximize,
                      mode, views, _threads(), STAGE_BYTES, spec_max))  # fmt: skip

    codes, refused = _native_group("adamp", params, grads, (exp_avgs, exp_avg_sqs), state_steps, call)
    if refused:
        from .adamp import _multi_tensor_adamp

        sub_views: list[Tensor | None] = [None] * len(refused)
        _multi_tensor_adamp(
            [params[i] for i in refused],
            [grads[i] for i in refused],
            [exp_avgs[i] for i in refused],
            [exp_avg_sqs[i] for i in refused],
            [state_steps[i] for i in refused],
            capturable=capturable,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            weight_decay=weight_decay,
            delta=delta,
            wd_ratio=wd_ratio,
            nesterov=nesterov,
            maximize=maximize,
            scale_invariant=_mode_name(mode),
            views=sub_views,
        )
        codes = _merge_codes(len(params), refused, codes, sub_views)
    return codes, refused


def _sgdp_native(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    lr: float | Tensor,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    eps: float,
    delta: float,
    wd_ratio: float,
    maximize: bool,
    project_momentum: bool,
    mode: int,
) -> tuple[Tensor, list[int]]:
    lr_v = _lr_value(lr)

    def call(fn: Any, n: int, ptrs: int, meta: int, views: int, spec_max: int) -> int:
        return int(fn(n, ptrs, meta, lr_v, momentum, dampening, weight_decay, eps, delta, wd_ratio, nesterov,
                      maximize, project_momentum, mode, views, _threads(), STAGE_BYTES, spec_max))  # fmt: skip

    codes, refused = _native_group("sgdp", params, grads, (momentum_buffers,), None, call)
    if refused:
        from .sgdp import _multi_tensor_sgdp

        sub_views: list[Tensor | None] = [None] * len(refused)
        _multi_tensor_sgdp(
            [params[i] for i in refused],
            [grads[i] for i in refused],
            [momentum_buffers[i] for i in refused],
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            eps=eps,
            delta=delta,
            wd_ratio=wd_ratio,
            maximize=maximize,
            project_momentum=project_momentum,
            scale_invariant=_mode_name(mode),
            views=sub_views,
        )
        codes = _merge_codes(len(params), refused, codes, sub_views)
    return codes, refused


def _mode_name(mode: int) -> projection.ScaleInvariant:
    return next(k for k, v in MODES.items() if v == mode)


def _merge_codes(n: int, refused: list[int], codes: Tensor, sub_views: list[Tensor | None]) -> Tensor:
    """View codes of all ``n`` tensors from the kernel's codes and the refused tensors' views."""
    out = torch.zeros(n, dtype=torch.int64)
    refused_set = set(refused)
    taken = [i for i in range(n) if i not in refused_set]
    if taken:
        out[taken] = codes
    for i, v in zip(refused, sub_views, strict=True):
        if v is not None:
            out[i] = v.to(device="cpu")
    return out


# custom ops: what torch.compile sees (an opaque, in-place call)


@torch.library.custom_op(
    "torch_adamp::adamp_cpu_", mutates_args=("params", "exp_avgs", "exp_avg_sqs", "state_steps"), device_types="cpu"
)
def _adamp_cpu_op(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    lr_tensor: Tensor | None,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    delta: float,
    wd_ratio: float,
    nesterov: bool,
    maximize: bool,
    view_mode: int,
) -> Tensor:
    codes, _ = _adamp_native(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        state_steps,
        lr_tensor if lr_tensor is not None else lr,
        beta1,
        beta2,
        eps,
        weight_decay,
        delta,
        wd_ratio,
        nesterov,
        maximize,
        view_mode,
    )
    return codes


@_adamp_cpu_op.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, state_steps, lr_tensor, lr, *args):  # type: ignore[no-untyped-def]
    return torch.empty(len(params), dtype=torch.int64)


@torch.library.custom_op(
    "torch_adamp::sgdp_cpu_", mutates_args=("params", "momentum_buffers"), device_types="cpu"
)  # fmt: skip
def _sgdp_cpu_op(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    lr_tensor: Tensor | None,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    eps: float,
    delta: float,
    wd_ratio: float,
    maximize: bool,
    project_momentum: bool,
    view_mode: int,
) -> Tensor:
    codes, _ = _sgdp_native(
        params,
        grads,
        momentum_buffers,
        lr_tensor if lr_tensor is not None else lr,
        momentum,
        dampening,
        weight_decay,
        nesterov,
        eps,
        delta,
        wd_ratio,
        maximize,
        project_momentum,
        view_mode,
    )
    return codes


@_sgdp_cpu_op.register_fake
def _(params, grads, momentum_buffers, *args):  # type: ignore[no-untyped-def]
    return torch.empty(len(params), dtype=torch.int64)


# ---------------------------------------------------------------------------------------------
# compile back end
# ---------------------------------------------------------------------------------------------

_compiled: dict[str, Callable[..., Any]] = {}
#: the ``backend`` argument of that ``torch.compile`` (tests swap in a counting backend)
COMPILE_BACKEND: Any = "inductor"


def _compiled_fn(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.compile`` of a multi-tensor functional, created once (dynamo caches one graph per model)."""
    if _update.is_compiling():
        return fn  # inside an outer torch.compile: trace the functional into the caller's graph
    if name not in _compiled:
        _compiled[name] = torch.compile(fn, fullgraph=True, dynamic=False, backend=COMPILE_BACKEND)
    return _compiled[name]


def _tensor_lr(lr: float | Tensor) -> Tensor:
    """``lr`` as a 0-d tensor, so that a new value is data, not a recompilation."""
    if isinstance(lr, Tensor):
        return lr
    return torch.tensor(float(lr), dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# entry points
# ---------------------------------------------------------------------------------------------


def _through_dispatcher(params: Sequence[Tensor]) -> bool:
    """Whether to call the kernel as the custom op rather than directly: under ``torch.compile``, under a
    ``TorchDispatchMode`` (fake tensors for memory estimation, tracing, profiling tools), or for tensor
    subclasses. In plain eager mode the direct call skips the dispatcher's per-tensor list handling."""
    return (
        _update.is_compiling()
        or torch._C._len_torch_dispatch_stack() > 0
        or any(type(p) is not Tensor and type(p) is not torch.nn.Parameter for p in params)
    )


def _partition(params: Sequence[Tensor]) -> list[tuple[list[int] | None, bool]]:
    """Groups of one device and dtype as ``(indices, native)``; ``indices`` is ``None`` for "all of them"."""
    native = native_available()
    first = params[0].dtype
    if native and all(p.is_cpu and p.dtype is first for p in params):  # the common case, in one cheap pass
        return [(None, True)]
    return [
        (idx, native and params[idx[0]].is_cpu)
        for idx in _update.group_by_device_and_dtype(range(len(params)), params).values()
    ]


def _drive(
    lists: Sequence[list[Tensor]],
    views: list[Tensor | None] | None,
    native: Callable[[list[list[Tensor]]], Tensor],
    other: Callable[[list[list[Tensor]], list[Tensor | None] | None], None],
) -> None:
    """Run each device/dtype group of ``lists`` (params first) through ``native`` or ``other``."""
    n = len(lists[0])
    for idx, use_native in _partition(lists[0]):
        sub = list(lists) if idx is None else [[lst[i] for i in idx] for lst in lists]
        where = range(n) if idx is None else idx
        if use_native:
            codes = native(sub)
            _update.scatter_views(views, where, codes.unbind(0) if views is not None else None)
            continue
        group_views = _update.sub_views(views, len(where))
        other(sub, group_views)
        _update.scatter_views(views, where, group_views)


def fused_adamp(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    capturable: bool,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    delta: float,
    wd_ratio: float,
    nesterov: bool,
    maximize: bool,
    scale_invariant: projection.ScaleInvariant,
    views: list[Tensor | None] | None,
    dist: Any = None,
    default: bool = False,
) -> None:
    """Fused AdamP step (see the module docstring); same arguments as :func:`torch_adamp.adamp`.

    ``default=True`` (the ``foreach=None, fused=None`` default) sends groups the
    native kernel cannot take to the multi-tensor path instead of compiling them.
    """
    from .adamp import _multi_tensor_adamp

    kw: dict[str, Any] = dict(
        capturable=capturable,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        delta=delta,
        wd_ratio=wd_ratio,
        nesterov=nesterov,
        maximize=maximize,
        scale_invariant=scale_invariant,
    )
    lists = [params, grads, exp_avgs, exp_avg_sqs, state_steps]
    if dist is not None:
        _multi_tensor_adamp(*lists, lr=lr, views=views, dist=dist, **kw)
        return
    hyper: tuple[float, float, float, float, float, float, bool, bool, int] = (
        beta1, beta2, eps, weight_decay, delta, wd_ratio, nesterov, maximize, _mode(scale_invariant)
    )  # fmt: skip

    def native(sub: list[list[Tensor]]) -> Tensor:
        p, g, m, v, s = sub
        if _through_dispatcher(p):  # an opaque in-place op in the caller's graph, or seen by a dispatch mode
            lr_t, lr_f = (lr, 0.0) if isinstance(lr, Tensor) else (None, float(lr))
            out: Tensor = torch.ops.torch_adamp.adamp_cpu_(p, g, m, v, s, lr_t, lr_f, *hyper)
            return out
        # eager: a direct call, without the dispatcher's per-tensor handling of the lists
        return _adamp_native(p, g, m, v, s, lr, *hyper, capturable=capturable)[0]

    def other(sub: list[list[Tensor]], group_views: list[Tensor | None] | None) -> None:
        if default:
            _multi_tensor_adamp(*sub, lr=lr, views=group_views, **kw)
        else:
            _compiled_fn("adamp", _multi_tensor_adamp)(*sub, lr=_tensor_lr(lr), views=group_views, **kw)

    _drive(lists, views, native, other)


def fused_sgdp(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    *,
    lr: float | Tensor,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    eps: float,
    delta: float,
    wd_ratio: float,
    maximize: bool,
    project_momentum: bool,
    scale_invariant: projection.ScaleInvariant,
    views: list[Tensor | None] | None,
    dist: Any = None,
    default: bool = False,
) -> None:
    """Fused SGDP step (see the module docstring); same arguments as :func:`torch_adamp.sgdp`."""
    from .sgdp import _multi_tensor_sgdp

    kw: dict[str, Any] = dict(
        momentum=momentum,
        dampening=dampening,
        weight_decay=weight_decay,
        nesterov=nesterov,
        eps=eps,
        delta=delta,
        wd_ratio=wd_ratio,
        maximize=maximize,
        project_momentum=project_momentum,
        scale_invariant=scale_invariant,
    )
    lists = [params, grads, momentum_buffers]
    if dist is not None:
        _multi_tensor_sgdp(*lists, lr=lr, views=views, dist=dist, **kw)
        return
    hyper: tuple[float, float, float, bool, float, float, float, bool, bool, int] = (
        momentum, dampening, weight_decay, nesterov, eps, delta, wd_ratio, maximize, project_momentum,
        _mode(scale_invariant),
    )  # fmt: skip

    def native(sub: list[list[Tensor]]) -> Tensor:
        p, g, b = sub
        if _through_dispatcher(p):
            lr_t, lr_f = (lr, 0.0) if isinstance(lr, Tensor) else (None, float(lr))
            out: Tensor = torch.ops.torch_adamp.sgdp_cpu_(p, g, b, lr_t, lr_f, *hyper)
            return out
        return _sgdp_native(p, g, b, lr, *hyper)[0]

    def other(sub: list[list[Tensor]], group_views: list[Tensor | None] | None) -> None:
        if default:
            _multi_tensor_sgdp(*sub, lr=lr, views=group_views, **kw)
        else:
            _compiled_fn("sgdp", _multi_tensor_sgdp)(*sub, lr=_tensor_lr(lr), views=group_views, **kw)

    _drive(lists, views, native, other)


def native_scratch_bytes(kind: str, params: Sequence[Tensor], threads: int | None = None) -> int:
    """C-heap scratch of one native call (invisible to torch's allocator statistics): row sums, the spare
    block of the speculative sweep (the largest projectable tensor above :data:`STAGE_BYTES`; kept between
    steps, see :func:`torch_adamp._native.forget`), for AdamP one row of ``u`` per thread and the staging
    buffer, plus the pointer, shape and hint arrays."""
    rows = [p.size(0) if p.dim() > 1 and p.numel() > 0 else 0 for p in params]
    cols = [p.numel() // r if r else p.numel() for p, r in zip(params, rows, strict=True)]
    item = 8 if any(p.dtype is torch.float64 for p in params) else 4
    large = [(r, c) for r, c in zip(rows, cols, strict=True) if r and r * c * item > STAGE_BYTES]
    spec = [r * c for r, c in large if r * c * item <= SPECULATE_MAX_BYTES]
    scratch = 4 * item * max(rows, default=1) + max(rows, default=1) + item * max(spec, default=0)
    if kind == "adamp":
        small = [r * c for r, c in zip(rows, cols, strict=True) if r and r * c * item <= STAGE_BYTES]
        row = max((c for _, c in large), default=1)
        scratch += item * (row * (threads or _threads()) + max(small, default=0))
    per_tensor = (5 if kind == "adamp" else 3) * 8 + 2 * 8 + 8 + 9
    return scratch + per_tensor * len(params)
