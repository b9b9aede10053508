"""The tail every batched projected step shares, in two parts: the coefficients, then their application.

With a direction ``u`` (already scaled by the step size ``s`` when that is folded in), the per-row
projection coefficients ``c`` (:class:`torch_adamp.projection.RowDecision`: ``c = <w,u> / (||w|| + eps)^2``
on the rows of the view taken, 0 elsewhere) and the decoupled weight-decay factor ``f`` (``1 - lr wd / D``,
or ``1 - lr wd wd_ratio / D`` when projected; ``D`` is the rule's divisor; ``corrected_weight_decay``
multiplies ``wd`` or ``wd_ratio`` by ``lr / lr_max``: :func:`decay_terms`)::

    w <- f * w - s * (u - c * w)

:func:`decision` is the first part (the row sums and the decision's first phase, whose packed sums a
sharded caller reduces before the second); :func:`apply` the second. The multi-tensor path, DeepSpeed's
flat partitions (:mod:`torch_adamp.zero`) and, for the coefficients, ``Projected`` use them. The decision
is taken on the device (``torch.where``), never with a Python ``if`` on a tensor. (The per-tensor path
keeps the reference package's own operation order: :func:`torch_adamp.projection.project_single`.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .. import projection
from ..rule import NO_SCALING, Options, Scaling

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


def decay_terms(o: Any, lr: Scalar | None = None) -> tuple[Scalar, Scalar]:
    """``(weight_decay, wd_ratio)`` of the decay factors, with ``corrected_weight_decay`` folded in (every path
    and the native kernel take the decay through this one function; ``lr``: the value of ``o.lr`` where the
    caller has read it, as the native kernel does). With ``k = lr / lr_max`` (AdamC's correction,
    ``lr^2 / lr_max`` in place of ``lr``): ``False``: unchanged (the same numbers, so the same bits);
    ``True``: ``wd_ratio k``, the decay of the weights the projection judged scale-invariant at this step;
    ``"all"``: ``weight_decay k``, every weight."""
    mode = o.corrected_weight_decay
    if mode is False:
        return o.weight_decay, o.wd_ratio
    k = (o.lr if lr is None else lr) / o.lr_max
    if mode == "all":
        return o.weight_decay * k, o.wd_ratio
    return o.weight_decay, o.wd_ratio * k


def decay_factors(lr: Scalar, weight_decay: Scalar, wd_ratio: Scalar, divisor: float = 1.0) -> tuple[Scalar, Scalar]:
    """``(factor if not projected, factor if projected)`` of decoupled weight decay."""
    return 1 - lr * weight_decay / divisor, 1 - lr * weight_decay * wd_ratio / divisor


def decay_factor(
    view: Tensor, like: Tensor, lr: Scalar, weight_decay: Scalar, wd_ratio: Scalar, divisor: float = 1.0
) -> Tensor:
    """Weight-decay factor chosen on the device from a projection decision ``view``."""
    f_none, f_proj = decay_factors(lr, weight_decay, wd_ratio, divisor)
    if isinstance(f_none, Tensor) or isinstance(f_proj, Tensor):
        return torch.where(view > 0, f_proj, f_none).to(like.dtype)
    # fill + masked_fill: the Python floats round to the tensor dtype exactly as
    # ``p.mul_(python_float)`` does in the reference, and no host->device copy
    return torch.full(view.shape, f_none, dtype=like.dtype, device=like.device).masked_fill_(view > 0, f_proj)


def projected_indices(shapes: Sequence[Sequence[int]], mode: Any) -> list[int]:
    """The positions of the tensors the projection may apply to (``scale_invariant`` not ``False``)."""
    return [i for i, s in enumerate(shapes) if mode is not False and projection.projectable(s)]


def decision(
    params: Sequence[Tensor], grads: Sequence[Tensor], updates: Sequence[Tensor], o: Options, dist: Any = None
) -> projection.RowDecision:
    """Phase 1 of the projection of these (projectable, same-device, same-dtype) tensors: their row sums
    and the totals of the decision. ``dist``: the sharding helper (:mod:`torch_adamp.distributed`), which
    knows their global shapes and whether their rows are split; it sums :attr:`~RowDecision.packed`
    before phase 2."""
    layouts = dist.layouts(params) if dist is not None else None
    d = projection.RowDecision(
        projection.channel_row_sums(params, grads, updates),
        [lay.shape for lay in layouts] if layouts is not None else [p.shape for p in params],
        delta=o.delta,
        eps=o.eps,
        mode=o.scale_invariant,
        local_rows=[p.shape[0] for p in params],
        rows_split=[lay.rows_split for lay in layouts] if layouts is not None else None,
    )
    d.layouts = layouts
    return d


def apply(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    updates: Sequence[Tensor],
    step_size: Scalar,
    o: Options,
    *,
    proj_idx: Sequence[int],
    coefs: Sequence[Tensor],
    view: Tensor | None,
    wd_divisor: float,
    direction_is_state: bool,
    views: Views = None,
    scaling: Scaling = NO_SCALING,
) -> None:
    """Phase 2: project, decay and step a list of same-device, same-dtype tensors.

    ``w <- f * w - step_size * (u - c * w)`` with ``coefs[k]`` (shaped ``(rows, 1, ...)``) and ``view[k]``
    the coefficients and view code of ``params[proj_idx[k]]``; the others are not projected. ``updates``
    are projected in place, unless ``direction_is_state`` (they are state that must keep the unprojected
    values: then projected copies are made). ``o.caution``: timm's cautious masking after the projection,
    one tensor at a time (:func:`torch_adamp.projection.cautious`; whole tensors only). ``scaling``:
    GradScaler's skip: the decay factors become 1 and the final updates ``+0.0`` on a skipped step.
    """
    n = len(params)
    skip = scaling.skip is not None
    lr, weight_decay = o.lr, o.weight_decay
    wd, wd_ratio = decay_terms(o)
    f_none, _ = decay_factors(lr, wd, wd_ratio, wd_divisor)
    updates = list(updates)
    p_proj = [params[i] for i in proj_idx]
    if proj_idx:
        assert view is not None
        if views is not None:
            for k, i in enumerate(proj_idx):
                views[i] = view[k]
        # u <- u - c w  (c is zero on rows that are not projected)
        u_proj = [updates[i] for i in proj_idx]
        if direction_is_state:
            u_proj = list(torch._foreach_addcmul(u_proj, p_proj, list(coefs), value=-1))
            for k, i in enumerate(proj_idx):
                updates[i] = u_proj[k]
        else:
            torch._foreach_addcmul_(u_proj, p_proj, list(coefs), value=-1)
    if o.caution:
        codes = [torch.zeros((), dtype=torch.long, device=params[0].device)] * n
        for k, i in enumerate(proj_idx):
            codes[i] = view[k]  # type: ignore[index]
        proj_set0 = set(proj_idx)
        for i in range(n):
            if direction_is_state and i not in proj_set0:
                updates[i] = updates[i].clone()  # the state keeps the unmasked values
            projection.cautious(params[i], grads[i], updates[i], codes[i], eps=o.eps)
    if proj_idx and weight_decay != 0:
        f_proj: Tensor = decay_factor(view, p_proj[0], lr, wd, wd_ratio, wd_divisor)  # type: ignore[arg-type]
        if skip:
            f_proj = scaling.factor(f_proj, 1.0)  # type: ignore[assignment]
        torch._foreach_mul_(p_proj, list(f_proj))
    if weight_decay != 0:
        proj_set = set(proj_idx)
        rest = [params[i] for i in range(n) if i not in proj_set]
        if rest:
            torch._foreach_mul_(rest, scaling.factor(f_none, 1.0) if skip else f_none)
    if skip:
        updates = [scaling.update(u) for u in updates]
    if isinstance(step_size, Tensor):
        torch._foreach_sub_(list(params), torch._foreach_mul(updates, step_size))
    else:
        torch._foreach_add_(list(params), updates, alpha=-step_size)
