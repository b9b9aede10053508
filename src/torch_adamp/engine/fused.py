"""The fused path (``fused=True``, and the CPU default): one kernel call per group, no host sync.

Two back ends, chosen per device/dtype group:

``native`` (CPU)
    The rule's C kernel (:mod:`torch_adamp._native`), float32 and float64
    (half-precision parameters run in float32 through an upcast copy). One
    call per group per step, whatever the number of tensors; nothing is ever
    recompiled (``lr``, step counts and shapes are plain arguments). Under
    ``torch.compile`` or a dispatch mode the call is the custom op
    ``torch_adamp::<rule>_cpu_``, opaque to the compiler (no graph break).
    Tensors the kernel cannot read as raw buffers (non-contiguous, or with
    state of another dtype) take the multi-tensor path. GradScaler's
    ``grad_scale`` / ``found_inf`` (CPU floats) go to the kernel by pointer: it
    multiplies every gradient it loads by the inverse scale, and returns at its
    entry, having written nothing, where ``found_inf`` is set.

``compile`` (other devices, or the CPU without the native kernels)
    ``torch.compile(fullgraph=True, dynamic=False)`` of the multi-tensor path,
    with ``lr`` passed as a tensor (a new value is data, not a recompilation).

``TORCH_ADAMP_FUSED=native|compile`` forces a back end (tests, benchmarks).
"""

import ctypes
import dataclasses
import os
from array import array
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from .. import _native
from ..rules import RULES, Rule
from . import paths, tail
from .precision import LOW_PRECISION, compute_dtype, group_by_device_and_dtype

#: tensors up to this many bytes are staged: their update kept in a scratch buffer (AdamP) between the
#: kernel's two sweeps, so that the second reads from the cache; larger ones are speculated or swept twice
STAGE_BYTES = 1 << 20
#: the largest tensor the kernel speculates on (it needs a spare block of the tensor's size)
SPECULATE_MAX_BYTES = 64 << 20

MODES: dict[Any, int] = {False: 0, "auto": 1, "channel": 2, "layer": 3}

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


def _assume_constant_result(fn: Callable[[], bool]) -> Callable[[], bool]:
    """``torch.compiler.assume_constant_result(fn)`` without importing ``torch._dynamo`` (2-3 s) when
    torch_adamp is imported: it only marks ``fn`` (tests/test_compile.py checks it is the same mark)."""
    fn._dynamo_marked_constant = True  # type: ignore[attr-defined]
    return fn


#: whether the CPU kernels can be used (builds them on first call; a constant under ``torch.compile``)
native_available: Callable[[], bool] = _assume_constant_result(_native_available)


def default_is_fused(params: Sequence[Tensor]) -> bool:
    """Whether ``foreach=None, fused=None`` takes the fused path: on the CPU, when the native kernels load."""
    return len(params) > 0 and params[0].device.type == "cpu" and native_available()


# -- native back end -------------------------------------------------------------------------------


def _sizes(tensors: Sequence[Tensor], dtype: torch.dtype) -> list[int]:
    """Per tensor, its number of elements if the kernel can read it as a raw buffer of ``dtype``, else -1."""
    return [t.numel() if t.is_cpu and t.dtype is dtype and t.is_contiguous() else -1 for t in tensors]


def _split_refused(
    lists: list[Sequence[Tensor]], steps: Sequence[Tensor] | None
) -> tuple[list[Sequence[Tensor]], list[int], list[int]]:
    """``(lists of the tensors the kernel takes, their numels, indices of the refused ones)``.

    ``lists`` = params (one CPU dtype), grads, states; ``steps`` are appended to the result. The kernel
    reads raw buffers: every tensor on the CPU, contiguous, with the parameter's number of elements, the
    state in the compute dtype. Checked at every step (gradients are new tensors after ``zero_grad()``).
    """
    params = lists[0]
    dtype = params[0].dtype
    cdt = compute_dtype(dtype)
    numel = [p.numel() if p.is_contiguous() else -1 for p in params]
    others = [_sizes(lists[1], dtype), *(_sizes(lst, cdt) for lst in lists[2:])]
    steps_ok = steps is None or all([s.is_cpu and s.dtype is torch.float32 and s.numel() == 1 for s in steps])
    out = [*lists, steps] if steps is not None else list(lists)
    if steps_ok and -1 not in numel and all(o == numel for o in others):
        return out, numel, []
    ok = [k >= 0 and all(o[i] == k for o in others) for i, k in enumerate(numel)]
    if steps is not None:
        f32 = torch.float32
        ok = [o and s.is_cpu and s.dtype is f32 and s.numel() == 1 for o, s in zip(ok, steps, strict=True)]
    taken = [i for i, o in enumerate(ok) if o]
    return [[lst[i] for i in taken] for lst in out], [numel[i] for i in taken], [i for i, o in enumerate(ok) if not o]


def _bump_versions(tensors: list[Tensor]) -> None:
    """Tell autograd about the in-place writes done through raw pointers."""
    try:
        torch.autograd.graph.increment_version(tensors)
    except TypeError:  # torch < 2.5 takes one tensor at a time
        for t in tensors:
            torch.autograd.graph.increment_version(t)


class Workspace:
    """What the native kernels keep between the steps of one optimizer (its ``_workspace``).

    * the view each parameter took at its last step: the guesses of the speculative sweep, kept per list
      of parameters handed to the kernel (a list not seen at the last steps starts without guesses);
    * the spare block of that sweep (a ``uint8`` tensor the size of the largest tensor stepped under a
      guess, reused between steps, freed with the optimizer or by :meth:`release`);
    * how many speculative sweeps guessed right and wrong (``spec_right``, ``spec_wrong``);
    * the compile back end's compiled steps (``compiled``), one per group signature.

    Only speed depends on it: results are the same bits with or without a workspace.
    """

    MAX_LISTS = 64

    def __init__(self) -> None:
        self.guesses: dict[tuple[int, ...], Tensor] = {}
        #: the compile back end's compiled steps, one per rule and tensor signature (see ``_compiled_fn``)
        self.compiled: dict[Any, Callable[..., Any]] = {}
        self.spare: Tensor | None = None
        self.spec_right = 0
        self.spec_wrong = 0

    def release(self) -> None:
        """Forget every guess and free the spare block."""
        self.guesses.clear()
        self.spare = None

    @property
    def spare_bytes(self) -> int:
        return 0 if self.spare is None else self.spare.numel()

    def _spare(self, nbytes: int) -> Tensor:
        if self.spare is None or self.spare.numel() < nbytes:
            self.spare = None  # free the old block first
            self.spare = torch.empty(nbytes, dtype=torch.uint8)
        return self.spare

    def _remember(self, key: tuple[int, ...], codes: Tensor) -> None:
        self.guesses.pop(key, None)
        self.guesses[key] = codes.to(torch.int8)
        while len(self.guesses) > self.MAX_LISTS:
            del self.guesses[next(iter(self.guesses))]


def _amp_floats(o: Any) -> tuple[Tensor | None, Tensor | None]:
    """GradScaler's ``grad_scale`` and ``found_inf`` as 0-d CPU float32 tensors the kernel reads by pointer.

    They are the scaler's own tensors when it runs on the CPU (``.to`` is then a no-op, nothing is read to
    Python); a scaler on another device than these CPU parameters costs the copy torch's fused optimizers
    make too."""

    def cpu(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.to(device="cpu", dtype=torch.float32).reshape(()).contiguous()

    return cpu(getattr(o, "grad_scale", None)), cpu(getattr(o, "found_inf", None))


def _run_kernel(
    rule: Rule,
    lists: list[Sequence[Tensor]],
    numel: list[int],
    lr: float,
    o: Any,
    workspace: Workspace | None,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> Tensor:
    """Run the rule's kernel on tensors it takes (``lists``: params, grads, states, [steps]); view codes.

    ``grad_scale`` / ``found_inf``: 0-d CPU float32 tensors of GradScaler's protocol (see :func:`_amp_floats`)."""
    n = len(numel)
    codes = torch.zeros(n, dtype=torch.int64)
    if n == 0:
        return codes
    write_back: list[tuple[Tensor, Tensor]] = []
    key = tuple(map(id, lists[0])) if workspace is not None else ()
    if lists[0][0].dtype in LOW_PRECISION:  # float32 copies of half-precision params and grads
        p32 = [p.float() for p in lists[0]]
        write_back = list(zip(lists[0], p32, strict=True))
        lists = [p32, [g.float() for g in lists[1]], *lists[2:]]
    ptrs = array("q", [t.data_ptr() for lst in lists for t in lst])
    meta = array("q", numel + [s[0] if len(s) > 1 else 0 for s in [p.shape for p in lists[0]]])
    a = _native.Args()
    a.n = n
    a.ptrs = ptrs.buffer_info()[0]
    a.meta = meta.buffer_info()[0]
    a.views = codes.data_ptr()
    a.lr = lr
    a.eps, a.weight_decay, a.delta, a.wd_ratio = float(o.eps), float(o.weight_decay), float(o.delta), float(o.wd_ratio)
    a.maximize = bool(o.maximize)
    a.mode = MODES[o.scale_invariant if o.scale_invariant is False else str(o.scale_invariant)]
    a.threads = max(1, torch.get_num_threads())
    a.stage_bytes = STAGE_BYTES
    a.spec_max_bytes = 0 if write_back else SPECULATE_MAX_BYTES  # half precision: fresh copies every step
    a.grad_scale = grad_scale.data_ptr() if grad_scale is not None else None
    a.found_inf = found_inf.data_ptr() if found_inf is not None else None
    rule_args = _native.rule_struct(rule.name, rule.kernel_fields)()  # alive until the call returns
    for (name, _), value in zip(rule.kernel_fields, rule.kernel_args(o), strict=True):
        setattr(rule_args, name, type(getattr(rule_args, name))(value))  # int or float, as the C field
    a.rule = ctypes.addressof(rule_args)
    step_fn, spare_fn = _native.kernel(rule.name, compute_dtype(lists[0][0].dtype) is torch.float64)
    guess = workspace.guesses.get(key) if workspace is not None else None
    if guess is not None and guess.numel() == n:
        a.guess = guess.data_ptr()
        need = int(spare_fn(ctypes.byref(a)))
        if need > 0:
            spare = workspace._spare(need)  # type: ignore[union-attr]
            a.spare, a.spare_bytes = spare.data_ptr(), spare.numel()
    if step_fn(ctypes.byref(a)) != 0:
        raise MemoryError(
            f"torch_adamp: the fused {rule.name} kernel could not allocate its scratch (nothing was updated)"
        )
    if workspace is not None:
        workspace._remember(key, codes)
        workspace.spec_right += a.spec_right
        workspace.spec_wrong += a.spec_wrong
    for p, p32_ in write_back:
        p.copy_(p32_)
    _bump_versions([p for p, _ in write_back] or list(lists[0]))
    return codes


_MODE_NAMES = {v: k for k, v in MODES.items()}


def _common(o: Any) -> list[float]:
    """What the custom op passes of the options every rule has: eps, weight decay, delta, wd_ratio, maximize, mode."""
    mode = MODES[o.scale_invariant if o.scale_invariant is False else str(o.scale_invariant)]
    return [float(o.eps), float(o.weight_decay), float(o.delta), float(o.wd_ratio), float(o.maximize), float(mode)]


class _OpOptions:
    """The options of a custom-op call, rebuilt from its float lists (only what the kernel reads)."""

    def __init__(self, rule: Rule, common: Sequence[float], args: Sequence[float]) -> None:
        self.eps, self.weight_decay, self.delta, self.wd_ratio = common[:4]
        self.maximize = bool(common[4])
        self.scale_invariant = _MODE_NAMES[int(common[5])]
        for (name, _), value in zip(rule.kernel_fields, args, strict=True):
            setattr(self, name, value)
        self._args = tuple(args)


def _options(rule: Rule, common: Sequence[float], args: Sequence[float]) -> Any:
    return _OpOptions(rule, common, args)


# custom ops: what torch.compile and dispatch modes see (an opaque, in-place call), one per rule
_ops: dict[str, Any] = {}


def _register_op(rule: Rule) -> Any:
    def kernel(
        params: list[Tensor],
        grads: list[Tensor],
        states: list[Tensor],
        steps: list[Tensor],
        lr_tensor: Tensor | None,
        lr: float,
        common: list[float],
        args: list[float],
        grad_scale: Tensor | None = None,
        found_inf: Tensor | None = None,
    ) -> Tensor:
        n = len(params)
        k = len(rule.state_names)
        lists: list[Sequence[Tensor]] = [params, grads, *(states[j * n : (j + 1) * n] for j in range(k))]
        if rule.counts_steps:
            lists.append(steps)
        lr_v = float(lr_tensor.item()) if lr_tensor is not None else lr
        o = _options(rule, common, args)
        return _run_kernel(rule, lists, [p.numel() for p in params], lr_v, o, None, grad_scale, found_inf)

    op = torch.library.custom_op(
        f"torch_adamp::{rule.name}_cpu_", kernel, mutates_args=("params", "states", "steps"), device_types="cpu"
    )

    def fake(params, grads, states, steps, lr_tensor, lr, common, args, grad_scale=None, found_inf=None):  # type: ignore[no-untyped-def]
        return torch.empty(len(params), dtype=torch.int64)

    op.register_fake(fake)
    return op


def _op(rule: Rule) -> Any:
    op = _ops.get(rule.name)
    if op is None:
        op = _ops[rule.name] = _register_op(rule)
    return op


def _through_dispatcher(params: Sequence[Tensor]) -> bool:
    """Whether to call the kernel as the custom op: under ``torch.compile``, under a ``TorchDispatchMode``
    (fake tensors, tracing, profilers), or for tensor subclasses. In plain eager mode the direct call
    skips the dispatcher's per-tensor list handling."""
    return (
        torch.compiler.is_compiling()
        or torch._C._len_torch_dispatch_stack() > 0
        or any(type(p) is not Tensor and type(p) is not torch.nn.Parameter for p in params)
    )


def _native_step(
    rule: Rule,
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    states: Sequence[Sequence[Tensor]],
    steps: Sequence[Tensor] | None,
    o: Any,
    workspace: Workspace | None = None,
) -> Tensor:
    """One same-dtype CPU group through the kernel (refused tensors through the multi-tensor path)."""
    lists, numel, refused = _split_refused([params, grads, *states], steps)
    grad_scale, found_inf = _amp_floats(o)
    if _through_dispatcher(params):
        common, args = _common(o), list(rule.kernel_args(o))
        taken = lists[0]
        lr_t, lr_f = (o.lr, 0.0) if isinstance(o.lr, Tensor) else (None, float(o.lr))
        k = len(rule.state_names)
        flat_states = [t for lst in lists[2 : 2 + k] for t in lst]
        step_list = list(lists[2 + k]) if rule.counts_steps else []
        codes: Tensor = _op(rule)(
            list(taken), list(lists[1]), flat_states, step_list, lr_t, lr_f, common, args, grad_scale, found_inf
        )
    else:
        lr_v = float(o.lr.item()) if isinstance(o.lr, Tensor) else float(o.lr)  # a CPU tensor: no device sync
        codes = _run_kernel(rule, lists, numel, lr_v, o, workspace, grad_scale, found_inf)
    if not refused:
        return codes
    sub_views: list[Tensor | None] = [None] * len(refused)
    paths.multi_tensor(
        rule,
        [params[i] for i in refused],
        [grads[i] for i in refused],
        [[lst[i] for i in refused] for lst in states],
        [steps[i] for i in refused] if steps is not None else None,
        o,
        sub_views,
    )
    out = torch.zeros(len(params), dtype=torch.int64)
    refused_set = set(refused)
    taken_idx = [i for i in range(len(params)) if i not in refused_set]
    if taken_idx:
        out[taken_idx] = codes
    for i, v in zip(refused, sub_views, strict=True):
        if v is not None:
            out[i] = v.to(device="cpu")
    return out


# -- compile back end -------------------------------------------------------------------------------

#: compiled steps of callers without a workspace (the functional API), by rule and tensor signature
_compiled: dict[Any, Callable[..., Any]] = {}
#: the ``backend`` argument of that ``torch.compile`` (tests swap in a counting backend)
COMPILE_BACKEND: Any = "inductor"


def _trampoline(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A new function that calls ``fn``: a code object of its own, so that dynamo's per-code cache, and its
    recompile limit, belong to one group of one optimizer instead of every group of the process."""
    namespace: dict[str, Any] = {}
    exec("def step(*args, **kwargs):\n    return fn(*args, **kwargs)\n", {"fn": fn}, namespace)
    return namespace["step"]  # type: ignore[no-any-return]


def _compiled_fn(rule: Rule, params: Sequence[Tensor], workspace: "Workspace | None") -> Callable[..., Any]:
    """``torch.compile`` of the multi-tensor path for one group: one compiled function per rule and tensor
    signature (shapes, dtypes, devices), kept by the optimizer's workspace (else by this module), each
    compiled once and reused for every later step and learning rate."""
    if torch.compiler.is_compiling():
        return paths.multi_tensor  # inside an outer torch.compile: trace into the caller's graph
    cache = workspace.compiled if workspace is not None else _compiled
    key = (rule.name, tuple((tuple(p.shape), p.dtype, p.device) for p in params))
    fn = cache.get(key)
    if fn is None:
        fn = cache[key] = torch.compile(
            _trampoline(paths.multi_tensor), fullgraph=True, dynamic=False, backend=COMPILE_BACKEND
        )
    return fn


def _tensor_lr(lr: float | Tensor) -> Tensor:
    """``lr`` as a 0-d tensor, so that a new value is data, not a recompilation."""
    return lr if isinstance(lr, Tensor) else torch.tensor(float(lr), dtype=torch.float32)


# -- entry point ------------------------------------------------------------------------------------


def _partition(params: Sequence[Tensor]) -> list[tuple[list[int] | None, bool]]:
    """Groups of one device and dtype as ``(indices, native)``; ``indices`` is ``None`` for "all of them"."""
    native = native_available()
    first = params[0].dtype
    if native and all(p.is_cpu and p.dtype is first for p in params):  # the common case, in one cheap pass
        return [(None, True)]
    return [
        (idx, native and params[idx[0]].is_cpu)
        for idx in group_by_device_and_dtype(range(len(params)), params).values()
    ]


def fused_step(
    rule: Rule,
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    states: Sequence[Sequence[Tensor]],
    steps: Sequence[Tensor] | None,
    o: Any,
    views: tail.Views,
    *,
    default: bool = False,
    workspace: Workspace | None = None,
) -> None:
    """The fused step of every device/dtype group (see the module docstring).

    ``default=True`` (``foreach=None, fused=None``) sends groups the native kernel
    cannot take to the multi-tensor path instead of compiling them.
    """
    n = len(params)
    for idx, use_native in _partition(params):

        def pick(lst: Sequence[Any], idx: list[int] | None = idx) -> list[Any]:
            return list(lst) if idx is None else [lst[i] for i in idx]

        where = range(n) if idx is None else idx
        sub = (pick(params), pick(grads), [pick(lst) for lst in states], pick(steps) if steps is not None else None)
        if use_native:
            codes = _native_step(rule, *sub, o, workspace)
            tail.scatter_views(views, where, codes.unbind(0) if views is not None else None)
            continue
        group_views = tail.sub_views(views, len(where))
        if default:
            paths.multi_tensor(rule, *sub, o, group_views)
        else:
            o_t = dataclasses.replace(o, lr=_tensor_lr(o.lr))
            _compiled_fn(rule, sub[0], workspace)(rule, *sub, o_t, group_views)
        tail.scatter_views(views, where, group_views)


for _rule in RULES:
    if _rule.name in _native.RULES:  # the rules with a kernel (csrc/rules/<name>.h)
        _op(_rule)


# -- Projected's row sums ---------------------------------------------------------------------------


def _rows_kernel(befores: list[Tensor], grads: list[Tensor], afters: list[Tensor], scale: float) -> Tensor:
    dtype = befores[0].dtype
    rows = [t.shape[0] for t in befores]
    out = torch.empty(sum(rows), 4, dtype=dtype)
    ptrs = array("q", [t.data_ptr() for lst in (befores, grads, afters) for t in lst])
    meta = array("q", [t.numel() for t in befores] + rows)
    a = _native.RowsArgs()
    a.n = len(befores)
    a.ptrs = ptrs.buffer_info()[0]
    a.meta = meta.buffer_info()[0]
    a.scale = scale
    a.threads = max(1, torch.get_num_threads())
    a.out = out.data_ptr()
    _native.projected("rows", dtype is torch.float64)(ctypes.byref(a))
    return out


def _rows_fake(befores: list[Tensor], grads: list[Tensor], afters: list[Tensor], scale: float) -> Tensor:
    return befores[0].new_empty(sum(t.shape[0] for t in befores), 4)


_rows_op = torch.library.custom_op("torch_adamp::projected_rows_cpu", _rows_kernel, mutates_args=(), device_types="cpu")
_rows_op.register_fake(_rows_fake)


def _plain_args(
    first: list[Tensor], grads: list[Tensor], third: list[Tensor], out: Tensor
) -> tuple[_native.RowsArgs, "array[int]", "array[int]"]:
    rows = [t.shape[0] for t in first]
    ptrs = array("q", [t.data_ptr() for lst in (first, grads, third) for t in lst])
    meta = array("q", [t.numel() for t in first] + rows)
    a = _native.RowsArgs()
    a.n = len(first)
    a.ptrs = ptrs.buffer_info()[0]
    a.meta = meta.buffer_info()[0]
    a.threads = max(1, torch.get_num_threads())
    a.out = out.data_ptr()
    return a, ptrs, meta  # the arrays must outlive the call


def _before_kernel(params: list[Tensor], grads: list[Tensor], befores: list[Tensor]) -> Tensor:
    out = torch.empty(sum(t.shape[0] for t in params), 4, dtype=params[0].dtype)
    a, _p, _m = _plain_args(params, grads, befores, out)
    _native.projected("before", params[0].dtype is torch.float64)(ctypes.byref(a))
    return out


def _before_fake(params: list[Tensor], grads: list[Tensor], befores: list[Tensor]) -> Tensor:
    return params[0].new_empty(sum(t.shape[0] for t in params), 4)


def _after_kernel(
    befores: list[Tensor], params: list[Tensor], sums: Tensor, views: Tensor, scale: float, eps: float, extra: float
) -> None:
    a, _p, _m = _plain_args(befores, befores, params, sums)
    a.scale, a.eps, a.extra = scale, eps, extra
    a.views = views.data_ptr()
    _native.projected("after", params[0].dtype is torch.float64)(ctypes.byref(a))
    _bump_versions(list(params))


def _after_fake(
    befores: list[Tensor], params: list[Tensor], sums: Tensor, views: Tensor, scale: float, eps: float, extra: float
) -> None:
    return None


_before_op = torch.library.custom_op(
    "torch_adamp::projected_before_cpu", _before_kernel, mutates_args=("befores",), device_types="cpu"
)
_before_op.register_fake(_before_fake)
_after_op = torch.library.custom_op(
    "torch_adamp::projected_after_cpu", _after_kernel, mutates_args=("params", "sums"), device_types="cpu"
)
_after_op.register_fake(_after_fake)


def projected_takes(params: Sequence[Tensor], grads: Sequence[Tensor], lr: float | Tensor) -> bool:
    """Whether :func:`projected_before` / :func:`projected_after` take these candidates of a group: plain
    (not DTensor) contiguous CPU tensors of one dtype, float32 or float64, a float ``lr``, the kernels."""
    if isinstance(lr, Tensor) or not params or not native_available():
        return False
    dtype = params[0].dtype
    if dtype not in (torch.float32, torch.float64):
        return False
    if any(type(p) is not Tensor and type(p) is not torch.nn.Parameter for p in params):
        return False
    return all(t.is_cpu and t.dtype is dtype and t.is_contiguous() for lst in (params, grads) for t in lst) and all(
        p.shape == g.shape for p, g in zip(params, grads, strict=True)
    )


def projected_before(params: Sequence[Tensor], grads: Sequence[Tensor], befores: Sequence[Tensor]) -> Tensor:
    """Before the inner step (tensors :func:`projected_takes` accepted, ``befores`` contiguous buffers like
    ``params``): ``befores <- params`` and the row sums ``<w,g>, ||w||^2, ||g||^2, 0`` per row, ``(rows, 4)``."""
    if _through_dispatcher(params):
        out: Tensor = _before_op(list(params), list(grads), list(befores))
        return out
    return _before_kernel(list(params), list(grads), list(befores))


def projected_after(
    befores: Sequence[Tensor],
    params: Sequence[Tensor],
    sums: Tensor,
    views: Tensor,
    scale: float,
    eps: float,
    extra: float,
) -> None:
    """After it: ``params <- params + k befores``, ``k`` per the views decided from ``sums`` (see
    csrc/projected.h: the channel view's ``<w_b,u>`` summed and applied row by row, ``u = scale befores -
    params``; ``extra`` added to ``k`` of projected tensors; tensors not projected untouched)."""
    if _through_dispatcher(params):
        _after_op(list(befores), list(params), sums, views, float(scale), float(eps), float(extra))
    else:
        _after_kernel(list(befores), list(params), sums, views, float(scale), float(eps), float(extra))


def projected_row_sums(
    befores: Sequence[Tensor], grads: Sequence[Tensor], afters: Sequence[Tensor], scale: float | Tensor
) -> Tensor | None:
    """``torch_adamp.Projected``'s row sums through the native kernel (csrc/projected.h), or ``None``.

    Per row of every tensor (the channel view, rows of all tensors in order), with ``u = scale * befores -
    afters``: ``<w,g>, ||w||^2, ||g||^2, <w,u>`` of ``w = befores``, as ``(total rows, 4)`` in their dtype: the
    ``sums`` of :func:`torch_adamp.projection.coefficients_from_row_sums`, in one sweep of the three lists
    without materialising ``u``. ``None`` when the kernel cannot take them (not all on the CPU, contiguous,
    of one dtype float32/float64 with one shape per triple; ``scale`` a tensor; no kernels): the caller
    computes them with torch operations.
    """
    if isinstance(scale, Tensor) or not befores or not native_available():
        return None
    dtype = befores[0].dtype
    if dtype not in (torch.float32, torch.float64):
        return None
    for lst in (befores, grads, afters):
        if not all(t.is_cpu and t.dtype is dtype and t.is_contiguous() for t in lst):
            return None
    if not all(b.shape == g.shape == a.shape for b, g, a in zip(befores, grads, afters, strict=True)):
        return None
    if _through_dispatcher(befores):
        out: Tensor = _rows_op(list(befores), list(grads), list(afters), float(scale))
        return out
    return _rows_kernel(list(befores), list(grads), list(afters), float(scale))


def native_scratch_bytes(rule: str, params: Sequence[Tensor], threads: int | None = None) -> int:
    """C-heap scratch of one native call (not seen by torch's allocator): what the kernel says it allocates
    (row sums, the written-row flags, the guesses, staged updates...), plus the pointer and shape arrays. The
    spare block of the speculative sweep is a tensor of the optimizer's workspace, not counted."""
    (kind,) = [r for r in RULES if r.name == rule]
    rows = [p.size(0) if p.dim() > 1 and p.numel() > 0 else 0 for p in params]
    meta = array("q", [p.numel() for p in params] + rows)
    a = _native.Args()
    a.n, a.meta = len(params), meta.buffer_info()[0]
    a.mode, a.threads = MODES["auto"], threads or max(1, torch.get_num_threads())
    a.stage_bytes, a.spec_max_bytes = STAGE_BYTES, SPECULATE_MAX_BYTES
    float64 = any(p.dtype is torch.float64 for p in params)
    scratch = int(_native.scratch_query(rule, float64)(ctypes.byref(a)))
    per_tensor = (2 + len(kind.state_names) + kind.counts_steps) * 8 + 2 * 8 + 8  # ptrs, meta, view codes
    return scratch + per_tensor * len(params)
