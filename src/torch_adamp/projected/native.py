"""``Projected``'s native CPU ops (``csrc/projected.h``): its two sweeps, around the inner optimizer's step.

Before the step, one sweep copies the candidates' weights and sums what the scale-invariance test needs
(:func:`before`); after it, one sweep projects the channel view row by row, ``w <- w + k w_b`` (:func:`after`).
:func:`row_sums` is the one-sweep form used where the decision must wait for the step (sharded tensors).
Each is a custom op (``torch_adamp::projected_*_cpu``) under ``torch.compile`` and dispatch modes.
"""

from __future__ import annotations

import ctypes
from array import array
from collections.abc import Sequence

import torch
from torch import Tensor

from .. import _native
from ..engine import native


def _rows_kernel(befores: list[Tensor], grads: list[Tensor], afters: list[Tensor], scale: float) -> Tensor:
    out = torch.empty(sum(t.shape[0] for t in befores), 4, dtype=befores[0].dtype)
    a, _p, _m = _plain_args(befores, grads, afters, out)
    a.scale = scale
    _native.projected("rows", befores[0].dtype is torch.float64)(ctypes.byref(a))
    return out


def _rows_fake(befores: list[Tensor], grads: list[Tensor], afters: list[Tensor], scale: float) -> Tensor:
    return befores[0].new_empty(sum(t.shape[0] for t in befores), 4)


_rows_op = torch.library.custom_op("torch_adamp::projected_rows_cpu", _rows_kernel, mutates_args=(), device_types="cpu")
_rows_op.register_fake(_rows_fake)


def _plain_args(
    first: list[Tensor], grads: list[Tensor], third: list[Tensor], out: Tensor
) -> tuple[_native.RowsArgs, array[int], array[int]]:
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
    native.bump_versions(list(params))


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


def takes(params: Sequence[Tensor], grads: Sequence[Tensor], lr: float | Tensor) -> bool:
    """Whether :func:`before` / :func:`after` take these candidates of a group: plain
    (not DTensor) contiguous CPU tensors of one dtype, float32 or float64, a float ``lr``, the kernels."""
    if isinstance(lr, Tensor) or not params or not native.available():
        return False
    dtype = params[0].dtype
    if dtype not in (torch.float32, torch.float64):
        return False
    if any(type(p) is not Tensor and type(p) is not torch.nn.Parameter for p in params):
        return False
    return all(t.is_cpu and t.dtype is dtype and t.is_contiguous() for lst in (params, grads) for t in lst) and all(
        p.shape == g.shape for p, g in zip(params, grads, strict=True)
    )


def before(params: Sequence[Tensor], grads: Sequence[Tensor], befores: Sequence[Tensor]) -> Tensor:
    """Before the inner step (tensors :func:`takes` accepted, ``befores`` contiguous buffers like
    ``params``): ``befores <- params`` and the row sums ``<w,g>, ||w||^2, ||g||^2, 0`` per row, ``(rows, 4)``."""
    if native.through_dispatcher(params):
        out: Tensor = _before_op(list(params), list(grads), list(befores))
        return out
    return _before_kernel(list(params), list(grads), list(befores))


def after(
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
    if native.through_dispatcher(params):
        _after_op(list(befores), list(params), sums, views, float(scale), float(eps), float(extra))
    else:
        _after_kernel(list(befores), list(params), sums, views, float(scale), float(eps), float(extra))


def row_sums(
    befores: Sequence[Tensor], grads: Sequence[Tensor], afters: Sequence[Tensor], scale: float | Tensor
) -> Tensor | None:
    """``torch_adamp.Projected``'s row sums through the native kernel (csrc/projected.h), or ``None``.

    Per row of every tensor (the channel view, rows of all tensors in order), with ``u = scale * befores -
    afters``: ``<w,g>, ||w||^2, ||g||^2, <w,u>`` of ``w = befores``, as ``(total rows, 4)`` in their dtype: the
    ``sums`` of :class:`torch_adamp.projection.RowDecision`, in one sweep of the three lists
    without materialising ``u``. ``None`` when the kernel cannot take them (not all on the CPU, contiguous,
    of one dtype float32/float64 with one shape per triple; ``scale`` a tensor; no kernels): the caller
    computes them with torch operations.
    """
    if isinstance(scale, Tensor) or not befores or not native.available():
        return None
    dtype = befores[0].dtype
    if dtype not in (torch.float32, torch.float64):
        return None
    for lst in (befores, grads, afters):
        if not all(t.is_cpu and t.dtype is dtype and t.is_contiguous() for t in lst):
            return None
    if not all(b.shape == g.shape == a.shape for b, g, a in zip(befores, grads, afters, strict=True)):
        return None
    if native.through_dispatcher(befores):
        out: Tensor = _rows_op(list(befores), list(grads), list(afters), float(scale))
        return out
    return _rows_kernel(list(befores), list(grads), list(afters), float(scale))
