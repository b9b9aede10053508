"""The per-tensor and multi-tensor paths, written once for every rule.

``states`` holds one list per name of ``rule.state_names``; ``steps`` the float32
step counters when ``rule.counts_steps`` (else ``None``). Everything updates in
place; nothing synchronises with the host. With GradScaler's ``grad_scale`` /
``found_inf`` in the options, both paths unscale and skip on the device
(:class:`torch_adamp.rules.Scaling`); without them they run exactly as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .. import projection
from ..rules import Rule, Scaling
from . import tail
from .precision import group_by_device_and_dtype, upcast, write_back


def _as_tensor(o: Any, steps: Sequence[Tensor] | None = None) -> bool:
    """Whether step-dependent scalars must stay tensors: ``capturable``, under ``torch.compile``, or step
    counters on an accelerator (reading them would synchronise)."""
    on_device = bool(steps) and not steps[0].is_cpu  # type: ignore[index]
    return bool(o.capturable) or torch.compiler.is_compiling() or on_device


def _aliases_state(u: Any, states: Sequence[Any]) -> bool:
    """Whether the direction ``u`` (a tensor, or a list of them) is a state tensor (SGDP's buffer)."""
    first = u[0] if isinstance(u, list) else u
    return any((lst[0] if isinstance(lst, list) else lst) is first for lst in states)


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
    as_tensor = _as_tensor(o, steps)
    divisor = rule.wd_divisor(o)
    scalings: dict[torch.device, Scaling | None] = {}
    for i, param in enumerate(params):
        p = upcast(param)
        g = upcast(grads[i])
        amp = scalings[p.device] if p.device in scalings else scalings.setdefault(p.device, Scaling.of(o, p.device))
        if amp is not None:
            g = amp.grad(g, o.maximize)
        elif o.maximize:
            g = -g
        state = [upcast(lst[i]) for lst in states]
        u, step_size = rule.direction(p, g, state, steps[i] if steps is not None else None, o, as_tensor, amp)
        kept = None  # GradScaler: SGDP's buffer projected as a copy, written back unless the step is skipped
        if amp is not None and amp.skip is not None and _aliases_state(u, state):
            kept, u = u, u.clone()
        u, view = projection.project_single(p, g, u, delta=o.delta, eps=o.eps, mode=o.scale_invariant)
        if views is not None:
            views[i] = view
        if getattr(o, "caution", False):
            projection.cautious(p, g, u, view, eps=o.eps)
        if kept is not None and amp is not None:
            kept.copy_(torch.where(amp.skip, kept, u))  # type: ignore[arg-type]
        if o.weight_decay > 0:
            f = tail.decay_factor(view, p, o.lr, o.weight_decay, o.wd_ratio, divisor)
            p.mul_(f if amp is None else amp.factor(f, 1.0))
        if amp is not None:
            u = amp.update(u)
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
    as_tensor = _as_tensor(o, steps)
    for idx in group_by_device_and_dtype(range(len(params)), params).values():
        P = [upcast(params[i]) for i in idx]
        G = [upcast(grads[i]) for i in idx]
        amp = Scaling.of(o, P[0].device)
        if amp is not None:
            G = amp.grads(G, o.maximize)
        elif o.maximize:
            G = list(torch._foreach_neg(G))
        S = [[upcast(lst[i]) for i in idx] for lst in states]
        T = [steps[i] for i in idx] if steps is not None else None
        U, step_size = rule.directions(P, G, S, T, o, as_tensor, amp)
        kept = None  # GradScaler: SGDP's buffers projected as copies, written back unless the step is skipped
        if amp is not None and amp.skip is not None and not rule.update_is_state(o) and _aliases_state(U, S):
            kept, U = U, [u.clone() for u in U]
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
            caution=getattr(o, "caution", False),
            amp=amp,
        )
        if kept is not None and amp is not None:
            for b, u in zip(kept, U, strict=True):
                b.copy_(torch.where(amp.skip, b, u))  # type: ignore[arg-type]
        write_back([params[i] for i in idx] + [lst[i] for lst in states for i in idx], P + [t for s in S for t in s])
        tail.scatter_views(views, idx, group_views)
