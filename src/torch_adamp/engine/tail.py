"""The tail every projected step shares: project, decay, step.

With a direction ``u`` (already scaled by the step size ``s`` when that is
folded in), the per-row projection coefficients ``c`` of
:func:`torch_adamp.projection.projection_coefficients` and the decoupled
weight-decay factor ``f`` (``1 - lr wd / D``, or ``1 - lr wd wd_ratio / D``
when projected; ``D`` is the rule's divisor)::

    w <- f * w - s * (u - c * w)

The decision behind ``c`` and ``f`` is taken on the device (``torch.where``),
never with a Python ``if`` on a tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .. import projection
from ..rules import Scaling

Scalar = float | Tensor
Views = list[Tensor | None] | None  # per-parameter view codes (0-d tensors), or None when not recorded


def sub_views(views: Views, n: int) -> Views:
    """A fresh list for the views of a sub-group of ``n`` tensors (``None`` when not recorded)."""
    return [None] * n if views is not None else None


def scatter_views(views: Views, idx: Sequence[int], sub: Sequence[Tensor | None] | None) -> None:
    """Put the views of a sub-group (``sub[k]`` for the tensor at position ``idx[k]``) into ``views``."""
    if views is not None and sub is not None:
        for i, v in zip(idx, sub, strict=True):
            views[i] = v


def decay_factors(lr: Scalar, weight_decay: float, wd_ratio: float, divisor: float = 1.0) -> tuple[Scalar, Scalar]:
    """``(factor if not projected, factor if projected)`` of decoupled weight decay."""
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
    views: Views,
    dist: Any = None,
    caution: bool = False,
    amp: Scaling | None = None,
) -> None:
    """Project, decay and step a list of same-device, same-dtype tensors.

    ``w <- f * w - step_size * proj(u)``. ``updates`` are projected in place,
    unless ``updates_are_state`` (they are state that must keep the unprojected
    values: then a projected copy is made). ``dist`` is the sharding helper of
    :mod:`torch_adamp.distributed` (global shapes, one packed all_reduce).
    ``caution``: timm's cautious masking after the projection, one tensor at a
    time (:func:`torch_adamp.projection.cautious`; local shards only).
    ``amp``: GradScaler's skip (:class:`torch_adamp.rules.Scaling`): the decay
    factors become 1 and the final updates ``+0.0`` on a skipped step.
    """
    skip = amp is not None and amp.skip is not None
    n = len(params)
    if n == 0:
        return
    shapes = dist.global_shapes(params) if dist is not None else [p.shape for p in params]
    proj_idx = [i for i in range(n) if mode is not False and projection.projectable_shape(shapes[i])]
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
    if caution:
        codes = [torch.zeros((), dtype=torch.long, device=params[0].device)] * n
        for k, i in enumerate(proj_idx):
            codes[i] = view[k]
        proj_set0 = set(proj_idx)
        for i in range(n):
            if updates_are_state and i not in proj_set0:
                updates[i] = updates[i].clone()  # the state keeps the unmasked values
            projection.cautious(params[i], grads[i], updates[i], codes[i], eps=eps)
    if proj_idx:
        if weight_decay != 0:
            f_proj = decay_factor(view, p_proj[0], lr, weight_decay, wd_ratio, wd_divisor)
            if skip:
                f_proj = amp.factor(f_proj, 1.0)  # type: ignore[union-attr, assignment]
            torch._foreach_mul_(p_proj, list(f_proj))
    if weight_decay != 0:
        proj_set = set(proj_idx)
        rest = [params[i] for i in range(n) if i not in proj_set]
        if rest:
            torch._foreach_mul_(rest, amp.factor(f_none, 1.0) if skip else f_none)  # type: ignore[union-attr]
    if skip:
        updates = [amp.update(u) for u in updates]  # type: ignore[union-attr]
    if isinstance(step_size, Tensor):
        torch._foreach_sub_(list(params), torch._foreach_mul(updates, step_size))
    else:
        torch._foreach_add_(list(params), updates, alpha=-step_size)
