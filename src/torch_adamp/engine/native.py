"""The native back end: the rule's C kernel (:mod:`torch_adamp._native`) on a CPU bucket, one call per step.

float32 and float64 (half-precision parameters run in float32 through an upcast copy). One call per
bucket per step, whatever the number of tensors; nothing is ever recompiled (``lr``, step counts and
shapes are plain arguments). Under ``torch.compile`` or a dispatch mode the call is the custom op
``torch_adamp::<rule>_cpu_``, one per kernel rule, opaque to the compiler (no graph break). Tensors the
kernel cannot read as raw buffers (non-contiguous, or with state of another dtype) take the
multi-tensor path. GradScaler's ``grad_scale`` / ``found_inf`` (CPU floats) go to the kernel by pointer:
it multiplies every gradient it loads by the inverse scale, and returns at its entry, having written
nothing, where ``found_inf`` is set.
"""

from __future__ import annotations

import ctypes
import operator
from array import array
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .. import _native
from ..rule import Options, Rule
from . import paths, tail
from .bundle import Bundle
from .precision import LOW_PRECISION, compute_dtype
from .workspace import Workspace

#: tensors up to this many bytes are staged: their update kept in a scratch buffer (AdamP) between the
#: kernel's two sweeps, so that the second reads from the cache; larger ones are speculated or swept twice
STAGE_BYTES = 1 << 20
#: the largest tensor the kernel speculates on (it needs a spare block of the tensor's size)
SPECULATE_MAX_BYTES = 64 << 20

MODES: dict[Any, int] = {False: 0, "auto": 1, "channel": 2, "layer": 3}
_MODE_NAMES = {v: k for k, v in MODES.items()}


def _available() -> bool:
    return _native.load() is not None


def _assume_constant_result(fn: Callable[[], bool]) -> Callable[[], bool]:
    """``torch.compiler.assume_constant_result(fn)`` without importing ``torch._dynamo`` (seconds) when
    torch_adamp is imported: it only marks ``fn`` (tests/test_compile.py checks it is the same mark)."""
    fn._dynamo_marked_constant = True  # type: ignore[attr-defined]
    return fn


#: whether the CPU kernels can be used (builds them on first call; a constant under ``torch.compile``)
available: Callable[[], bool] = _assume_constant_result(_available)


def takes(rule: Rule[Any], o: Options) -> bool:
    """Whether the rule has a native kernel for these options (none has the cautious mask) and it built."""
    return "native" in rule.kernels and not o.caution and available()


def _mode(o: Options) -> int:
    return MODES[o.scale_invariant if o.scale_invariant is False else str(o.scale_invariant)]


def _sizes(tensors: Sequence[Tensor], dtype: torch.dtype) -> list[int]:
    """Per tensor, its number of elements if the kernel can read it as a raw buffer of ``dtype``, else -1."""
    return [t.numel() if t.is_cpu and t.dtype is dtype and t.is_contiguous() else -1 for t in tensors]


def _split_refused(t: Bundle) -> tuple[Bundle, list[int], list[int]]:
    """``(the bundle of the tensors the kernel takes, their numels, indices of the refused ones)``.

    The kernel reads raw buffers: every tensor on the CPU, contiguous, with the parameter's number of
    elements, the state in the compute dtype, float32 step counters. Checked at every step (gradients are
    new tensors after ``zero_grad()``).
    """
    params = t.params
    dtype = params[0].dtype
    cdt = compute_dtype(dtype)
    numel = [p.numel() if p.is_contiguous() else -1 for p in params]
    others = [_sizes(t.grads, dtype), *(_sizes(lst, cdt) for lst in t.states)]
    steps = t.steps
    steps_ok = steps is None or all([s.is_cpu and s.dtype is torch.float32 and s.numel() == 1 for s in steps])
    if steps_ok and -1 not in numel and all(o == numel for o in others):
        return t, numel, []
    ok = [k >= 0 and all(o[i] == k for o in others) for i, k in enumerate(numel)]
    if steps is not None:
        f32 = torch.float32
        ok = [o and s.is_cpu and s.dtype is f32 and s.numel() == 1 for o, s in zip(ok, steps, strict=True)]
    taken = [i for i, o in enumerate(ok) if o]
    return t.take(taken), [numel[i] for i in taken], [i for i, o in enumerate(ok) if not o]


def bump_versions(tensors: list[Tensor]) -> None:
    """Tell autograd about the in-place writes done through raw pointers."""
    try:
        torch.autograd.graph.increment_version(tensors)
    except TypeError:  # torch < 2.5 takes one tensor at a time
        for t in tensors:
            torch.autograd.graph.increment_version(t)


def _scaling_floats(o: Options) -> tuple[Tensor | None, Tensor | None]:
    """GradScaler's ``grad_scale`` and ``found_inf`` as 0-d CPU float32 tensors the kernel reads by pointer.

    They are the scaler's own tensors when it runs on the CPU (``.to`` is then a no-op, nothing is read to
    Python); a scaler on another device than these CPU parameters costs the copy torch's fused optimizers
    make too."""

    def cpu(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.to(device="cpu", dtype=torch.float32).reshape(()).contiguous()

    return cpu(o.grad_scale), cpu(o.found_inf)


def _tables(t: Bundle, numel: list[int]) -> tuple[array[int], array[int]]:
    """The kernel's tables: every data pointer (params, grads, each state, steps), then numels and rows."""
    ptrs = array("q", [x.data_ptr() for lst in t.lists() for x in lst])
    meta = array("q", numel + [p.size(0) if p.dim() > 1 else 0 for p in t.params])
    return ptrs, meta


def _run_kernel(
    rule: Rule[Any],
    t: Bundle,
    numel: list[int],
    lr: float,
    o: Any,
    workspace: Workspace | None,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    tables: tuple[array[int], array[int]] | None = None,
    key: tuple[int, ...] | None = None,
) -> Tensor:
    """Run the rule's kernel on a bundle it takes; returns the view codes.

    ``o`` holds the options the kernel reads (:class:`Options`, or the custom op's :class:`_OpOptions`);
    ``grad_scale`` / ``found_inf``: 0-d CPU float32 tensors of GradScaler's protocol (:func:`_scaling_floats`);
    ``tables``: the pointer and shape tables when the caller has them (:class:`Plan`), ``key`` the list's
    identity in the workspace."""
    n = len(numel)
    codes = torch.zeros(n, dtype=torch.int64)
    if n == 0:
        return codes
    write_back: list[tuple[Tensor, Tensor]] = []
    params = t.params
    if params[0].dtype in LOW_PRECISION:  # float32 copies of half-precision params and grads
        p32 = [p.float() for p in params]
        write_back = list(zip(params, p32, strict=True))
        t = Bundle(p32, [g.float() for g in t.grads], t.states, t.steps)
        tables = None
    ptrs, meta = tables if tables is not None else _tables(t, numel)
    if workspace is not None and key is None:
        key = tuple(map(id, params))
    a = _native.Args()
    a.n = n
    a.ptrs = ptrs.buffer_info()[0]
    a.meta = meta.buffer_info()[0]
    a.views = codes.data_ptr()
    a.lr = lr
    wd, wd_ratio = tail.decay_terms(o, lr)  # corrected_weight_decay folded in (the C decay takes the numbers)
    a.eps, a.weight_decay, a.delta, a.wd_ratio = float(o.eps), float(wd), float(o.delta), float(wd_ratio)
    a.maximize = bool(o.maximize)
    a.mode = _mode(o)
    a.threads = max(1, torch.get_num_threads())
    a.stage_bytes = STAGE_BYTES
    a.spec_max_bytes = 0 if write_back else SPECULATE_MAX_BYTES  # half precision: fresh copies every step
    a.grad_scale = grad_scale.data_ptr() if grad_scale is not None else None
    a.found_inf = found_inf.data_ptr() if found_inf is not None else None
    rule_args = _native.rule_struct(rule.name, rule.kernel_fields)()  # alive until the call returns
    for (name, _), value in zip(rule.kernel_fields, rule.kernel_args(o), strict=True):
        setattr(rule_args, name, type(getattr(rule_args, name))(value))  # int or float, as the C field
    a.rule = ctypes.addressof(rule_args)
    step_fn, spare_fn = _native.kernel(rule.name, compute_dtype(t.params[0].dtype) is torch.float64)
    guess = workspace.guesses.get(key) if workspace is not None and key is not None else None
    if guess is not None and guess.numel() == n:
        a.guess = guess.data_ptr()
        need = int(spare_fn(ctypes.byref(a)))
        if need > 0:
            spare = workspace.spare_block(need)  # type: ignore[union-attr]
            a.spare, a.spare_bytes = spare.data_ptr(), spare.numel()
    if step_fn(ctypes.byref(a)) != 0:
        raise MemoryError(
            f"torch_adamp: the fused {rule.name} kernel could not allocate its scratch (nothing was updated)"
        )
    if workspace is not None and key is not None:
        workspace.remember(key, codes)
        workspace.spec_right += a.spec_right
        workspace.spec_wrong += a.spec_wrong
    for p, p32_ in write_back:
        p.copy_(p32_)
    bump_versions([p for p, _ in write_back] or list(params))
    return codes


class Plan:
    """The kernel's tables for one list of parameters, built once and checked cheaply at every step.

    Built where every tensor of the list was checked (on the CPU, contiguous, float32 or float64, the state in
    its dtype with the parameter's numel). A later step reuses it when the parameters are the same objects with
    the same data pointers (``p.data = ...`` and ``module.to()`` give a parameter new storage) and the state
    tensors the same objects (the optimizer creates them, ``load_state_dict`` replaces them); only the
    gradients, new tensors after ``zero_grad()``, are checked and their pointers written into the table.
    """

    def __init__(self, t: Bundle, numel: list[int]) -> None:
        self.params = list(t.params)
        self.states = [list(s) for s in t.states]
        self.steps = list(t.steps) if t.steps is not None else None
        self.param_ptrs = [p.data_ptr() for p in self.params]
        self.numel = numel
        self.dtypes = [self.params[0].dtype] * len(numel)
        self.tables = _tables(t, numel)

    def matches(self, t: Bundle) -> bool:
        """Whether ``t`` holds the same parameters (same storage) and state tensors as when it was built."""
        return t.holds(self.params, self.states, self.steps, self.param_ptrs)

    def take_grads(self, grads: Sequence[Tensor]) -> bool:
        """Check the gradients as the kernel reads them and write their pointers into the table, or ``False``
        (the table unchanged) where one is not a raw buffer like its parameter's (one C-level pass per check)."""
        if not (
            all(map(operator.is_, map(_DTYPE, grads), self.dtypes))
            and all(map(_IS_CPU, grads))
            and all(map(Tensor.is_contiguous, grads))
            and list(map(Tensor.numel, grads)) == self.numel
        ):
            return False
        n = len(self.numel)
        self.tables[0][n : 2 * n] = array("q", map(Tensor.data_ptr, grads))
        return True


_DTYPE = operator.attrgetter("dtype")
_IS_CPU = operator.attrgetter("is_cpu")


def _planned(rule: Rule[Any], t: Bundle, o: Options, workspace: Workspace) -> Tensor | None:
    """The step through the workspace's plan of this list of parameters, or ``None`` (nothing done) where there
    is none that matches or a gradient cannot be read as a raw buffer."""
    key = tuple(map(id, t.params))
    plan = workspace.plans.get(key)
    if plan is None or not plan.matches(t) or not plan.take_grads(t.grads):
        return None
    grad_scale, found_inf = _scaling_floats(o)
    lr = float(o.lr.item()) if isinstance(o.lr, Tensor) else float(o.lr)  # a CPU tensor: no device sync
    return _run_kernel(rule, t, plan.numel, lr, o, workspace, grad_scale, found_inf, plan.tables, key)


class _OpOptions:
    """The options of a custom-op call, rebuilt from its float lists (only what the kernel reads)."""

    def __init__(self, rule: Rule[Any], common: Sequence[float], args: Sequence[float]) -> None:
        self.eps, self.weight_decay, self.delta, self.wd_ratio = common[:4]
        self.maximize = bool(common[4])
        self.scale_invariant = _MODE_NAMES[int(common[5])]
        self.corrected_weight_decay = _CORRECTED_NAMES[int(common[6])]
        self.lr_max = common[7]
        for (name, _), value in zip(rule.kernel_fields, args, strict=True):
            setattr(self, name, value)


_CORRECTED: dict[Any, int] = {False: 0, True: 1, "all": 2}
_CORRECTED_NAMES = {v: k for k, v in _CORRECTED.items()}


def _common(o: Options) -> list[float]:
    """What the custom op passes of the options every rule has: eps, weight decay, delta, wd_ratio, maximize, mode,
    corrected_weight_decay and lr_max (the op reads a tensor lr: the correction is computed there)."""
    corrected = _CORRECTED[o.corrected_weight_decay]
    return [
        float(o.eps),
        float(o.weight_decay),
        float(o.delta),
        float(o.wd_ratio),
        float(o.maximize),
        float(_mode(o)),
        float(corrected),
        float(o.lr_max) if o.lr_max is not None else 0.0,
    ]


def _register_op(name: str) -> Any:
    """The custom op ``torch_adamp::<name>_cpu_`` of a kernel rule: what ``torch.compile`` and dispatch modes
    see (an opaque, in-place call)."""

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
        rule = Rule.named(name)
        n, k = len(params), len(rule.state_names)
        t = Bundle(params, grads, [states[j * n : (j + 1) * n] for j in range(k)], steps if rule.counts_steps else None)
        lr_v = float(lr_tensor.item()) if lr_tensor is not None else lr
        o = _OpOptions(rule, common, args)
        return _run_kernel(rule, t, [p.numel() for p in params], lr_v, o, None, grad_scale, found_inf)

    op = torch.library.custom_op(
        f"torch_adamp::{name}_cpu_", kernel, mutates_args=("params", "states", "steps"), device_types="cpu"
    )

    def fake(params, grads, states, steps, lr_tensor, lr, common, args, grad_scale=None, found_inf=None):  # type: ignore[no-untyped-def]
        return torch.empty(len(params), dtype=torch.int64)

    op.register_fake(fake)
    return op


#: one custom op per kernel rule (csrc/rules/<name>.h), registered when the engine is imported (never while tracing)
OPS = {name: _register_op(name) for name in _native.RULES}


def through_dispatcher(params: Sequence[Tensor]) -> bool:
    """Whether to call a kernel as its custom op: under ``torch.compile``, under a ``TorchDispatchMode``
    (fake tensors, tracing, profilers), or for tensor subclasses. In plain eager mode the direct call
    skips the dispatcher's per-tensor list handling."""
    return (
        torch.compiler.is_compiling()
        or torch._C._len_torch_dispatch_stack() > 0
        or any(type(p) is not Tensor and type(p) is not torch.nn.Parameter for p in params)
    )


def planned_step(rule: Rule[Any], t: Bundle, o: Options, views: tail.Views, workspace: Workspace) -> bool:
    """The step of a list of parameters stepped before, through its :class:`Plan`: ``True`` if it ran, ``False``
    (nothing done) where there is none that matches, a gradient cannot be read as a raw buffer, or the call must
    go through the dispatcher (under ``torch.compile``, a dispatch mode)."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0:
        return False
    codes = _planned(rule, t, o, workspace)
    if codes is None:
        return False
    tail.scatter_views(views, range(len(t)), codes.unbind(0) if views is not None else None)
    return True


def step(
    rule: Rule[Any],
    t: Bundle,
    o: Options,
    views: tail.Views,
    workspace: Workspace | None = None,
    try_plan: bool = True,
) -> None:
    """One same-dtype CPU bucket through the kernel (refused tensors through the multi-tensor path);
    ``try_plan=False``: the caller tried :func:`planned_step` already."""
    if try_plan and workspace is not None and planned_step(rule, t, o, views, workspace):
        return
    plain = workspace is not None and not torch.compiler.is_compiling() and torch._C._len_torch_dispatch_stack() == 0
    taken, numel, refused = _split_refused(t)
    grad_scale, found_inf = _scaling_floats(o)
    if through_dispatcher(t.params):
        lr_t, lr_f = (o.lr, 0.0) if isinstance(o.lr, Tensor) else (None, float(o.lr))
        codes: Tensor = OPS[rule.name](
            list(taken.params),
            list(taken.grads),
            [x for lst in taken.states for x in lst],
            list(taken.steps) if taken.steps is not None else [],
            lr_t,
            lr_f,
            _common(o),
            list(rule.kernel_args(o)),
            grad_scale,
            found_inf,
        )
    else:
        lr_v = float(o.lr.item()) if isinstance(o.lr, Tensor) else float(o.lr)  # a CPU tensor: no device sync
        if plain and not refused and t.params and t.params[0].dtype not in LOW_PRECISION:
            plan = Plan(taken, numel)  # the next steps check only what can change (see Plan)
            workspace.plans[tuple(map(id, taken.params))] = plan  # type: ignore[union-attr]
            codes = _run_kernel(rule, taken, numel, lr_v, o, workspace, grad_scale, found_inf, plan.tables)
        else:
            codes = _run_kernel(rule, taken, numel, lr_v, o, workspace, grad_scale, found_inf)
    if refused:
        sub_views: list[Tensor | None] = [None] * len(refused)
        paths.multi_tensor(rule, t.take(refused), o, sub_views)
        out = torch.zeros(len(t), dtype=torch.int64)
        refused_set = set(refused)
        taken_idx = [i for i in range(len(t)) if i not in refused_set]
        if taken_idx:
            out[taken_idx] = codes
        for i, v in zip(refused, sub_views, strict=True):
            if v is not None:
                out[i] = v.to(device="cpu")
        codes = out
    tail.scatter_views(views, range(len(t)), codes.unbind(0) if views is not None else None)


def native_scratch_bytes(rule: str, params: Sequence[Tensor], threads: int | None = None) -> int:
    """C-heap scratch of one native call (not seen by torch's allocator): what the kernel says it allocates
    (row sums, the written-row flags, the guesses, staged updates...), plus the pointer and shape arrays. The
    spare block of the speculative sweep is a tensor of the optimizer's workspace, not counted."""
    kind = Rule.named(rule)
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
