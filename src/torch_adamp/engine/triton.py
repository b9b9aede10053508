"""The Triton back end: the rule's Triton kernels (:mod:`torch_adamp.triton`) on a bucket, three launches per step.

What ``fused=True`` runs on CUDA tensors where the rule has a Triton kernel (``"triton" in rule.kernels``)
and Triton is installed, and, with ``TORCH_ADAMP_FUSED=triton``, on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1``: how this machine's CI runs the kernels). The kernels and their tables are
:mod:`torch_adamp.triton.driver`; this module chooses the tensors they take, keeps their tables per list of
parameters (:class:`Plan`, in the optimizer's workspace: built once, checked cheaply at every step) and
launches them. Nothing here reads a device value to the host: ``lr``, step counters and GradScaler's
``grad_scale``/``found_inf`` are read by the kernels, so a step with ``capturable=True`` can be captured in
a CUDA graph once its plan exists (after one eager step).

Tensors the kernels take: float32, bfloat16 or float16 parameters whose gradient has their dtype and
strides, float32 state with their strides, dense in memory with rows (dim 0) outermost (contiguous and
channels_last weights; a transposed weight is not), float32 step counters on the parameters' device or on
the CPU. The others take the multi-tensor path, as do float64 buckets, ``caution=True``, tensor
subclasses (DTensor shards, fake tensors) and steps traced by ``torch.compile`` (which trace the
multi-tensor path, as the compile back end does).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import itertools
import operator
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .. import projection
from ..rule import Options, Rule
from . import paths, tail
from .bundle import Bundle
from .workspace import Backend, Workspace

#: parameter dtypes the kernels take (float32 math and state)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: whether projectable tensors are stepped in the first launch under the view of their last step
SPECULATE = True
#: the most bytes of spare blocks (old weights kept for a wrong guess) of one list of parameters; tensors past
#: it take two passes
SPARE_MAX_BYTES = 16 << 30
#: the tiles of new plans, where set (tests: ``driver.GPU`` on the CPU, ``driver.SMALL`` for every kind of tile)
CONFIG: Any = None
#: steps counted on the host even where the counters are on the parameters' device (tests: the CUDA case on the CPU)
FORCE_HOST_STEPS = False


@functools.cache
def installed() -> bool:
    """Whether Triton can be imported (not imported here: ``import torch_adamp`` never imports it)."""
    return importlib.util.find_spec("triton") is not None


def _driver() -> Any:
    from ..triton import driver

    return driver


def _kernels(rule: Rule[Any]) -> Any:
    """The rule's Triton module: ``torch_adamp.triton.<rule name>``."""
    return importlib.import_module(f"torch_adamp.triton.{rule.name}")


def takes(rule: Rule[Any], o: Options, params: Sequence[Tensor], backend: Backend) -> bool:
    """Whether ``fused=True`` runs these parameters (one device) through the Triton back end."""
    if "triton" not in rule.kernels or o.caution or not params or torch.compiler.is_compiling() or not installed():
        return False  # (steps traced by torch.compile keep the multi-tensor path: asked first, before the cache)
    if o.corrected_weight_decay is not False and isinstance(o.lr, Tensor):
        return False  # the correction's lr / lr_max with a tensor lr: on the device, by the multi-tensor path
    device = params[0].device.type
    if device == "cuda":
        ok = backend.fused in ("auto", "native", "triton")
    else:
        ok = device == "cpu" and backend.fused == "triton"
    return ok and _plain(params)


def _plain(params: Sequence[Tensor]) -> bool:
    """Tensors whose memory the kernels can read (not subclasses: DTensor shards, fake tensors)."""
    return all(type(p) is Tensor or type(p) is torch.nn.Parameter for p in params)


# ----------------------------------------------------------------------------------------------------
# which tensors the kernels take
# ----------------------------------------------------------------------------------------------------


def _rows_outermost(t: Tensor, projectable: bool) -> bool:
    """Dense in memory (a permutation of a contiguous layout), and, for a projectable tensor, each row of the
    channel view one block (dim 0 outermost): contiguous and channels_last weights."""
    if t.numel() == 0:
        return True
    expect = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride(), strict=True) if sz != 1):
        if stride != expect:
            return False
        expect *= size
    return not projectable or t.shape[0] == 1 or t.stride(0) == t.numel() // t.shape[0]


def _split(t: Bundle, nstate: int, mode: Any) -> tuple[list[int], list[int]]:
    """Indices of the tensors of a same-dtype bucket the kernels take, and of those they refuse."""
    taken: list[int] = []
    refused: list[int] = []
    dtype = t.params[0].dtype
    device = t.params[0].device
    for i, p in enumerate(t.params):
        g = t.grads[i]
        stride = p.stride()
        proj = mode is not False and projection.projectable(p)
        ok = p.dtype in DTYPES and g.dtype is dtype and g.device == device and g.stride() == stride
        ok = ok and g.shape == p.shape and _rows_outermost(p, proj)
        for lst in t.states[:nstate]:
            s = lst[i]
            ok = ok and s.dtype is torch.float32 and s.device == device and s.shape == p.shape and s.stride() == stride
        if ok and t.steps is not None:
            s = t.steps[i]
            ok = s.dtype is torch.float32 and s.numel() == 1 and (s.device == device or s.is_cpu)
        (taken if ok else refused).append(i)
    return taken, refused


def _steps_kind(t: Bundle) -> int:
    """Where the step counters are (all on the parameters' device, or all on the CPU), or -1 (mixed)."""
    driver = _driver()
    if t.steps is None:
        return int(driver.STEPS_NONE)
    device = t.params[0].device
    here = [s.device == device for s in t.steps]
    if all(here) and not FORCE_HOST_STEPS:
        return int(driver.STEPS_DEVICE)
    if all(s.is_cpu for s in t.steps):
        return int(driver.STEPS_HOST)
    return -1


# ----------------------------------------------------------------------------------------------------
# plans
# ----------------------------------------------------------------------------------------------------


def _config(device: torch.device) -> Any:
    """The tiles: :data:`CONFIG` where set (tests), else the interpreter's on the CPU, a GPU's elsewhere."""
    if CONFIG is not None:
        return CONFIG
    driver = _driver()
    return driver.INTERPRETER if device.type == "cpu" else driver.GPU


class Plan:
    """The tables and device buffers of one list of parameters, built once and checked cheaply at every step.

    Reused where the parameters are the same objects with the same storage (``p.data = ...`` and
    ``module.to()`` give a parameter new storage), the state tensors and step counters the same objects (the
    optimizer creates them, ``load_state_dict`` replaces them), and the options that shape the tables
    (``scale_invariant``, the rule's direction-state slot) the same; the gradients' pointers are checked at
    every step and uploaded when they change (never during a CUDA-graph capture, where they must be static
    anyway); hyper-parameters and a float ``lr`` are uploaded when they change. The buffers hold the view each
    tensor took last (the guesses of the next step) and its spare blocks."""

    def __init__(self, rule: Rule[Any], t: Bundle, o: Options, steps: int) -> None:
        driver = _driver()
        self.rule, self.mod = rule, _kernels(rule)
        params = list(t.params)
        self.params = params
        self.states = [list(s) for s in t.states]
        self.steps_list = list(t.steps) if t.steps is not None else None
        self.param_ptrs = [p.data_ptr() for p in params]
        self.state_ptrs = [[s.data_ptr() for s in lst] for lst in self.states]
        self.device, self.dtype = params[0].device, params[0].dtype
        self.steps = steps
        self.config = config = _config(self.device)
        self.shapes = [tuple(p.shape) for p in params]
        self.strides = [p.stride() for p in params]
        self.mode = driver.MODES[o.scale_invariant if o.scale_invariant is False else str(o.scale_invariant)]
        self.dir_state = int(self.mod.dir_state(o))
        projectable = [self.mode != 0 and projection.projectable(s) for s in self.shapes]
        self.spec = SPECULATE and self.mode == 1
        spare, spare2, room = [], [], SPARE_MAX_BYTES
        item = params[0].element_size()
        for p, proj in zip(params, projectable, strict=True):
            cost = p.numel() * (item + (4 if self.dir_state >= 0 else 0))
            keep = proj and self.spec and cost <= room
            room -= cost if keep else 0
            spare.append(keep)
            spare2.append(keep and self.dir_state >= 0)
        self.layout = driver.Layout(self.shapes, projectable, config, spare, spare2)
        hyp_len = int(driver.HYP_COMMON) + len(self.mod.hyper(o))
        self.buf = driver.Buffers(self.layout, self.device, self.dtype, hyp_len)
        n = len(params)
        table = torch.zeros(int(driver.PTRS), max(n, 1), dtype=torch.int64)
        table[0, :n] = torch.tensor(self.param_ptrs, dtype=torch.int64)
        for k in range(self.mod.NSTATE):
            table[2 + k, :n] = torch.tensor(self.state_ptrs[k], dtype=torch.int64)
        if self.mod.NSTATE == 1:
            table[3] = table[2]
        if steps == driver.STEPS_DEVICE and t.steps is not None:
            table[4, :n] = torch.tensor([s.data_ptr() for s in t.steps], dtype=torch.int64)
        self.table = table
        self.grad_ptrs: list[int] = []
        self.values: tuple[Any, ...] | None = None
        self.delta: float | None = None
        driver.upload(self.buf.ptrs, table)

    def matches(self, t: Bundle, o: Options, steps: int) -> bool:
        """Whether ``t`` holds the same parameters (same storage), state tensors and counters as when it was
        built, and the options shape the same tables."""
        if not t.holds(self.params, self.states, self.steps_list, self.param_ptrs):
            return False
        driver = _driver()
        mode = driver.MODES[o.scale_invariant if o.scale_invariant is False else str(o.scale_invariant)]
        return mode == self.mode and self.mod.dir_state(o) == self.dir_state and steps == self.steps

    def run(self, t: Bundle, o: Options) -> Tensor:
        """One step (``t`` holds the plan's tensors and this step's gradients); returns the views (int8)."""
        driver = _driver()
        n = len(self.params)
        device = self.device
        grad_ptrs = list(map(Tensor.data_ptr, t.grads))
        if grad_ptrs != self.grad_ptrs:
            self.table[1, :n] = torch.tensor(grad_ptrs, dtype=torch.int64)
            driver.upload(self.buf.ptrs.narrow(0, 1, 1), self.table.narrow(0, 1, 1))
            self.grad_ptrs = grad_ptrs
        lr = o.lr
        if isinstance(lr, Tensor) and lr.device != device:
            lr = float(lr.item())  # a CPU tensor lr with parameters elsewhere: a host value, no device read
        lr_value = lr if not isinstance(lr, Tensor) else 0.0
        weight_decay, wd_ratio = tail.decay_terms(o, lr_value)  # corrected_weight_decay folded in (a float lr)
        values = (lr_value, o.eps, weight_decay, wd_ratio, self.rule.wd_divisor(o), *self.mod.hyper(o))
        if values != self.values:
            driver.upload(self.buf.hyp, torch.tensor([float(v) for v in values], dtype=torch.float64))
            self.values = values
        if o.delta != self.delta:
            thr = driver.thresholds(self.shapes, float(o.delta)) or [[0.0, 0.0]]
            driver.upload(self.buf.thr, torch.tensor(thr, dtype=torch.float64).float())
            self.delta = o.delta
        if self.steps == driver.STEPS_HOST and t.steps is not None:
            torch._foreach_add_(list(t.steps), 1.0)
            driver.upload(self.buf.counts.narrow(0, 0, n), torch.stack([s.reshape(()) for s in t.steps]))

        def here(x: Tensor | None) -> Tensor | None:
            return None if x is None else x.to(device=device, non_blocking=True)

        x = driver.Launch(
            lr=lr if isinstance(lr, Tensor) else self.buf.hyp,
            counts=self.buf.counts,
            grad_scale=here(o.grad_scale),
            found_inf=here(o.found_inf),
            steps=self.steps,
            mode=self.mode,
            spec=self.spec,
            maximize=bool(o.maximize),
            decay=o.weight_decay != 0,
            rflags=int(self.mod.flags(o)),
            dir_state=self.dir_state,
        )
        if device.type == "cuda":  # Triton launches on the current device: make it the parameters'
            with torch.cuda.device(device):
                driver.launch(self.layout, self.buf, self.params[0], self.mod, x)
        else:
            driver.launch(self.layout, self.buf, self.params[0], self.mod, x)
        _bump_versions(self.params)
        views: Tensor = self.buf.views.narrow(0, 0, n)
        return views


def _bump_versions(tensors: list[Tensor]) -> None:
    """Tell autograd about the in-place writes done through raw pointers."""
    try:
        torch.autograd.graph.increment_version(tensors)
    except TypeError:  # torch < 2.5 takes one tensor at a time
        for x in tensors:
            torch.autograd.graph.increment_version(x)


def _plan(rule: Rule[Any], t: Bundle, o: Options, steps: int, workspace: Workspace | None) -> Plan:
    if workspace is None:
        return Plan(rule, t, o, steps)
    key = (rule.name, *map(id, t.params))
    plan: Plan | None = workspace.triton_plans.get(key)
    if plan is None or not plan.matches(t, o, steps):
        plan = workspace.triton_plans[key] = Plan(rule, t, o, steps)
    return plan


_DTYPE = operator.attrgetter("dtype")
_DEVICE = operator.attrgetter("device")


def planned_step(rule: Rule[Any], t: Bundle, o: Options, views: tail.Views, workspace: Workspace) -> bool:
    """The step of a list of parameters stepped before through its plan, before any grouping (the engine tries
    it first): ``True`` if it ran, ``False`` (nothing done) where there is no plan for exactly these parameters,
    the back end or the options no longer take it, or a gradient is not read as the plan reads it."""
    if not workspace.triton_plans or o.caution or torch.compiler.is_compiling():
        return False
    return _planned(rule, t, o, views, workspace)


def _planned(rule: Rule[Any], t: Bundle, o: Options, views: tail.Views, workspace: Workspace) -> bool:
    """The step of a list of parameters stepped before, checked in C-level passes (identity of every tensor,
    the gradients' dtype, device and strides): ``True`` if it ran, ``False`` (nothing done) otherwise."""
    plan: Plan | None = workspace.triton_plans.get((rule.name, *map(id, t.params)))
    if plan is None or not plan.matches(t, o, plan.steps):
        return False
    fused = workspace.backend.fused
    if not (fused == "triton" or (plan.device.type == "cuda" and fused in ("auto", "native"))):
        return False
    if plan.steps == _driver().STEPS_HOST and o.found_inf is not None:
        return False
    grads = t.grads
    if not (
        all(map(operator.is_, map(_DTYPE, grads), itertools.repeat(plan.dtype)))
        and all(map(operator.eq, map(_DEVICE, grads), itertools.repeat(plan.device)))
        and list(map(Tensor.stride, grads)) == plan.strides
    ):
        return False
    codes = plan.run(t, o)
    if views is not None:
        tail.scatter_views(views, range(len(t)), codes.to(torch.int64).clamp_min_(0).unbind(0))
    return True


def step(rule: Rule[Any], t: Bundle, o: Options, views: tail.Views, workspace: Workspace | None = None) -> None:
    """One device bucket through the Triton kernels, per parameter dtype (refused tensors: multi-tensor path)."""
    device = t.params[0].device
    if device.type == "cpu" and not _driver().interpreted():
        raise RuntimeError(
            "TORCH_ADAMP_FUSED=triton on CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 in the "
            "environment before the process imports triton (it was imported without it)"
        )
    if workspace is not None and _planned(rule, t, o, views, workspace):
        return
    mod = _kernels(rule)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, p in enumerate(t.params):
        by_dtype.setdefault(p.dtype, []).append(i)
    for idx in by_dtype.values():
        sub = t.take(idx)
        sub_views = tail.sub_views(views, len(idx))
        taken, refused = _split(sub, mod.NSTATE, o.scale_invariant)
        if taken:
            part = sub.take(taken) if refused else sub
            steps = _steps_kind(part)
            if steps < 0 or (steps == _driver().STEPS_HOST and o.found_inf is not None):
                refused, taken = sorted(refused + taken), []  # counters the kernels cannot read or advance here
            else:
                plan = _plan(rule, part, o, steps, workspace)
                codes = plan.run(part, o)
                if sub_views is not None:
                    got = codes.to(torch.int64).clamp_min_(0).unbind(0)
                    tail.scatter_views(sub_views, taken, got)
        if refused:
            rest_views = tail.sub_views(views, len(refused))
            paths.multi_tensor(rule, sub.take(refused), o, rest_views)
            tail.scatter_views(sub_views, refused, rest_views)
        tail.scatter_views(views, idx, sub_views)
