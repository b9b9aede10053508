"""Pieces of the step shared by AdamP and SGDP: precision handling and the final update.

The last part of both optimizers is the same transform: with a direction ``u``
already scaled by the step size, the per-row projection coefficients ``c``
(see :mod:`torch_adamp.projection`) and a decoupled weight-decay factor ``f``
(``1 - lr * wd`` or ``1 - lr * wd * wd_ratio`` when projected)::

    w <- f * w - (u - c * w)  =  (f + c) * w - u

so projection, weight decay and step cost two passes over ``w``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from . import projection

LOW_PRECISION = (torch.float16, torch.bfloat16)
Scalar = float | Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the math runs in: float32 for half types, else the dtype itself."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


def upcast(t: Tensor) -> Tensor:
    return t.float() if t.dtype in LOW_PRECISION else t


def write_back(params: Sequence[Tensor], computed: Sequence[Tensor]) -> None:
    """Copy float32 results into half-precision parameters (round to nearest)."""
    for p, c in zip(params, computed, strict=True):
        if p is not c:
            p.copy_(c)


def group_by_device_and_dtype(indices: Sequence[int], tensors: Sequence[Tensor]) -> dict[Any, list[int]]:
    groups: dict[Any, list[int]] = defaultdict(list)
    for i in indices:
        t = tensors[i]
        groups[(t.device, compute_dtype(t.dtype))].append(i)
    return groups


Views = list[Tensor | None] | None  # per-parameter view codes (0-d tensors), or None when not recorded


def sub_views(views: Views, n: int) -> Views:
    """A fresh list for the views of a sub-group of ``n`` tensors (``None`` when not recorded)."""
    return [None] * n if views is not None else None


def scatter_views(views: Views, idx: Sequence[int], sub: Sequence[Tensor | None] | None) -> None:
    """Put the views of a sub-group (``sub[k]`` for the tensor at position ``idx[k]``) into ``views``."""
    if views is not None and sub is not None:
        for i, v in zip(idx, sub, strict=True):
            views[i] = v


def is_compiling() -> bool:
    return torch.compiler.is_compiling()


def decay_factors(lr: Scalar, weight_decay: float, wd_ratio: float, divisor: float = 1.0) -> tuple[Scalar, Scalar]:
    """``(factor if not projected, factor if projected)`` of decoupled weight decay.

    ``divisor`` is ``1 - momentum`` for SGDP, 1 for AdamP (reference semantics).
    """
    return 1 - lr * weight_decay / divisor, 1 - lr * weight_decay * wd_ratio / divisor


def decay_factor(
    view: Tensor, like: Tensor, lr: Scalar, weight_decay: float, wd_ratio: float, divisor: float = 1.0
) -> Tensor:
    """Weight-decay factor chosen on the device from a projection decision ``view``."""
    f_none, f_proj = decay_factors(lr, weight_decay, wd_ratio, divisor)
    if isinstance(f_none, Tensor) or isinstance(f_proj, Tensor):
        return torch.where(view > 0, f_proj, f_none).to(like.dtype)
    # fill + masked_fill: the Python floats round to the tensor dtype exactly as
    # ``p.mul_(python_float)`` does in the reference, and no host->device copy
    return torch.full(view.shape, f_none, dtype=like.dtype, device=like.device).masked_fill_(view > 0, f_proj)


def apply_multi(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    updates: Sequence[Tensor],
    *,
    lr: Scalar,
    step_size: Scalar,
    weight_decay: float,
    wd_ratio: float,
    wd_divisor: float,
    delta: float,
    eps: float,
    mode: projection.ScaleInvariant,
    updates_are_state: bool,
    views: list[Tensor | None] | None,
    dist: Any = None,
) -> None:
    """Project, decay and step a list of same-device, same-dtype tensors.

    ``w <- f * w - step_size * proj(u)``, with ``f`` the decoupled weight-decay
    factor of each tensor, chosen on the device from its projection decision.
    ``updates`` are projected in place unless ``updates_are_state`` is true and
    the caller wants the state kept (then a projected copy is made); SGDP's
    reference semantics pass the momentum buffer with ``updates_are_state=False``
    so that the buffer itself is projected.
    """
    n = len(params)
    if n == 0:
        return
    shapes = dist.global_shapes(params) if dist is not None else [p.shape for p in params]
    proj_idx = [i for i in range(n) if mode is not False and projectable_shape(shapes[i])]
    f_none, _ = decay_factors(lr, weight_decay, wd_ratio, wd_divisor)
    updates = list(updates)
    if proj_idx:
        p_proj = [params[i] for i in proj_idx]
        coefs, view, _ = projection.projection_coefficients(
            p_proj,
            [grads[i] for i in proj_idx],
            [updates[i] for i in proj_idx],
            delta=delta,
            eps=eps,
            mode=mode,
            global_shapes=[shapes[i] for i in proj_idx],
            rows_split=dist.rows_split(p_proj) if dist is not None else None,
            all_reduce=dist.all_reduce if dist is not None else None,
        )
        if views is not None:
            for k, i in enumerate(proj_idx):
                views[i] = view[k]
        # u <- u - c w  (c is zero on rows that are not projected)
        u_proj = [updates[i] for i in proj_idx]
        if updates_are_state:
            u_proj = list(torch._foreach_addcmul(u_proj, p_proj, coefs, value=-1))
            for k, i in enumerate(proj_idx):
                updates[i] = u_proj[k]
        else:
            torch._foreach_addcmul_(u_proj, p_proj, coefs, value=-1)
        if weight_decay != 0:
            torch._foreach_mul_(p_proj, list(decay_factor(view, p_proj[0], lr, weight_decay, wd_ratio, wd_divisor)))
    if weight_decay != 0:
        proj_set = set(proj_idx)
        rest = [params[i] for i in range(n) if i not in proj_set]
        if rest:
            torch._foreach_mul_(rest, f_none)
    if isinstance(step_size, Tensor):
        torch._foreach_sub_(list(params), torch._foreach_mul(updates, step_size))
    else:
        torch._foreach_add_(list(params), updates, alpha=-step_size)


def projectable_shape(shape: Sequence[int]) -> bool:
    return len(shape) > 1 and all(s > 0 for s in shape)
