"""The engine: one projected step for any rule, on every path.

:func:`step` chooses the path per device/dtype bucket: the per-tensor loop (``foreach=False``), the
multi-tensor path (``foreach=True``, the default off the CPU), the fused path (``fused=True``, and the
default on the CPU where the rule has a native kernel): the rule's native kernel on CPU buckets
(:mod:`.native`), its Triton kernels on CUDA buckets (:mod:`.triton`) or ``torch.compile`` of the
multi-tensor path (:mod:`.compiled`), as the optimizer's :class:`~.workspace.Backend` says. The rule
supplies the direction (:mod:`torch_adamp.rule`); the projection and the decay-and-step tail are shared
(:mod:`torch_adamp.projection`, :mod:`.tail`).
Sharded tensors take the multi-tensor path in two phases (:func:`begin`): a caller with several parameter
groups sums the packed totals of all of them in one collective between the phases.
"""

from __future__ import annotations

from typing import Any

from ..rule import Options, Rule
from . import compiled, native, paths, triton
from .bundle import Bundle
from .paths import MultiTensorStep
from .precision import group_by_device_and_dtype
from .tail import Views, scatter_views, sub_views
from .workspace import Backend, Workspace

__all__ = ["Backend", "Bundle", "MultiTensorStep", "Workspace", "begin", "default_is_fused", "step"]


def default_is_fused(rule: Rule[Any], t: Bundle, o: Options) -> bool:
    """Whether ``foreach=None, fused=None`` takes the fused path: on the CPU, where the rule has a native
    kernel for these options and the kernels built."""
    return len(t) > 0 and t.params[0].device.type == "cpu" and native.takes(rule, o)


def step(
    rule: Rule[Any],
    t: Bundle,
    o: Options,
    *,
    foreach: bool | None = None,
    fused: bool | None = None,
    views: Views = None,
    workspace: Workspace | None = None,
) -> None:
    """One step of ``rule`` with options ``o`` over the tensors of ``t`` (updated in place).

    ``views``, if given, receives per parameter a 0-d tensor with the view the projection used.
    ``workspace`` (owned by the optimizer) holds the back end of ``fused=True`` and what the back ends
    reuse between steps; without one, the back end is ``auto`` and the native kernel does not speculate
    (the same results, a little slower on large tensors).
    """
    if fused and o.caution:
        fused = None  # no kernel has the cautious mask: a fused request takes the multi-tensor path
    if foreach is False and not fused:
        paths.single_tensor(rule, t, o, views)
    elif fused or (fused is None and foreach is None and default_is_fused(rule, t, o)):
        _fused(rule, t, o, views, workspace, requested=bool(fused))
    else:
        paths.multi_tensor(rule, t, o, views)


def _fused(rule: Rule[Any], t: Bundle, o: Options, views: Views, workspace: Workspace | None, requested: bool) -> None:
    """The fused step of every device/dtype bucket. Not ``requested`` (the CPU default): buckets the native
    kernel cannot take go to the multi-tensor path instead of being compiled."""
    backend = workspace.backend if workspace is not None else Backend()
    native_ok = backend.native and native.takes(rule, o)
    if native_ok and workspace is not None and native.planned_step(rule, t, o, views, workspace):
        return  # the same CPU parameters as at an earlier step: checked by their plan
    if workspace is not None and triton.planned_step(rule, t, o, views, workspace):
        return  # the same parameters (one device and dtype) as at an earlier Triton step: checked by their plan
    first = t.params[0].dtype
    if native_ok and all(p.is_cpu and p.dtype is first for p in t.params):  # the common case, in one pass
        native.step(rule, t, o, views, workspace, try_plan=False)
        return
    buckets = list(group_by_device_and_dtype(range(len(t)), t.params).values())
    if requested and any(t.params[idx[0]].device.type == "meta" for idx in buckets):  # before any bucket steps
        raise ValueError(
            "fused=True cannot step parameters on the meta device (they have no data for a kernel, and torch.compile "
            "cannot trace them); use foreach=True, or move the parameters to a real device first"
        )
    for idx in buckets:
        sub, bucket_views = t.take(idx), sub_views(views, len(idx))
        if native_ok and sub.params[0].is_cpu:
            native.step(rule, sub, o, bucket_views, workspace)
        elif (requested or backend.fused == "triton") and triton.takes(rule, o, sub.params, backend):
            triton.step(rule, sub, o, bucket_views, workspace)
        elif requested:
            compiled.step(rule, sub, o, bucket_views, workspace, backend.compiler)
        else:
            paths.multi_tensor(rule, sub, o, bucket_views)
        scatter_views(views, idx, bucket_views)


def begin(rule: Rule[Any], t: Bundle, o: Options, views: Views, dist: Any) -> list[MultiTensorStep]:
    """Phase 1 of a sharded step (local shards, ``dist`` the sharding helper of :mod:`torch_adamp.distributed`):
    the multi-tensor path's directions and row sums of every bucket. Sum their decisions' packed totals
    (``distributed.reduce``), then :meth:`MultiTensorStep.finish` each."""
    return paths.multi_tensor_steps(rule, t, o, views, dist)
