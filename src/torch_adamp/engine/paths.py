"""The per-tensor and multi-tensor paths, written once for every rule.

``states`` holds one list per name of ``rule.state_names``; ``steps`` the float32
step counters when ``rule.counts_steps`` (else ``None``). Everything updates in
place; nothing synchronises with the host.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .. import projection
from ..rules import Rule
from . import tail
from .precision import group_by_device_and_dtype, upcast, write_back


def _as_tensor(o: Any) -> bool:
    """Whether step-dependent scalars must stay tensors: ``capturable``, or under ``torch.compile``."""
    return bool(o.capturable) or torch.compiler.is_compiling()


def single_tensor(
    rule: Rule,
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    states: Sequence[Sequence[Tensor]],
    steps: Sequence[Tensor] | None,
    o: Any,
    views: tail.Views,
) -> None:
    """One tensor at a time, in the reference package's operation order (bitwise equal to it)."""
    as_tensor = _as_tensor(o)
    divisor = rule.wd_divisor(o)
    for i, param in enumerate(params):
        p = upcast(param)
        g = upcast(grads[i])
        if o.maximize:
            g = -g
        state = [upcast(lst[i]) for lst in states]
        u, step_size = rule.direction(p, g, state, steps[i] if steps is not None else None, o, as_tensor)
        u, view = projection.project_single(p, g, u, delta=o.delta, eps=o.eps, mode=o.scale_invariant)
        if views is not None:
            views[i] = view
        if o.weight_decay > 0:
            p.mul_(tail.decay_factor(view, p, o.lr, o.weight_decay, o.wd_ratio, divisor))
        if isinstance(step_size, Tensor):
            p.sub_(u * step_size)
        else:
            p.add_(u, alpha=-step_size)
        write_back([param, *(lst[i] for lst in states)], [p, *state])


def multi_tensor(
    rule: Rule,
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    states: Sequence[Sequence[Tensor]],
    steps: Sequence[Tensor] | None,
    o: Any,
    views: tail.Views,
    dist: Any = None,
) -> None:
    """Foreach kernels per device/dtype group, batched row reductions and decisions (see :mod:`.tail`)."""
    as_tensor = _as_tensor(o)
    for idx in group_by_device_and_dtype(range(len(params)), params).values():
        P = [upcast(params[i]) for i in idx]
        G = [upcast(grads[i]) for i in idx]
        if o.maximize:
            G = list(torch._foreach_neg(G))
        S = [[upcast(lst[i]) for i in idx] for lst in states]
        T = [steps[i] for i in idx] if steps is not None else None
        U, step_size = rule.directions(P, G, S, T, o, as_tensor)
        group_views = tail.sub_views(views, len(idx))
        tail.apply_multi(
            P,
            G,
            U,
            lr=o.lr,
            step_size=step_size,
            weight_decay=o.weight_decay,
            wd_ratio=o.wd_ratio,
            wd_divisor=rule.wd_divisor(o),
            delta=o.delta,
            eps=o.eps,
            mode=o.scale_invariant,
            updates_are_state=rule.update_is_state(o),
            views=group_views,
            dist=dist,
        )
        write_back([params[i] for i in idx] + [lst[i] for lst in states for i in idx], P + [t for s in S for t in s])
        tail.scatter_views(views, idx, group_views)
