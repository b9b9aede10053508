"""The per-tensor and multi-tensor paths, written once for every rule.

Everything updates the tensors of the :class:`~.bundle.Bundle` in place; nothing synchronises with the
host. With GradScaler's ``grad_scale`` / ``found_inf`` in the options, both paths unscale and skip on the
device (:class:`torch_adamp.rule.Scaling`); without them they run exactly as before.

The multi-tensor path runs in two phases per device/dtype bucket (:class:`MultiTensorStep`): the
directions and the decision's row sums, then the decision, projection, decay and step. Between them a
sharded step sums the packed totals of every bucket and every parameter group in one collective
(:mod:`torch_adamp.distributed`); otherwise the second phase follows the first at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .. import projection
from ..rule import Options, Rule, Scaling
from . import tail
from .bundle import Bundle
from .precision import group_by_device_and_dtype, upcast, write_back


def as_tensor(o: Options, steps: Sequence[Tensor] | None = None) -> bool:
    """Whether step-dependent scalars must stay tensors: ``capturable``, under ``torch.compile``, or step
    counters on an accelerator (reading them would synchronise)."""
    on_device = bool(steps) and not steps[0].is_cpu  # type: ignore[index]
    return bool(o.capturable) or torch.compiler.is_compiling() or on_device


def _aliases_state(u: Any, states: Sequence[Any]) -> bool:
    """Whether the direction ``u`` (a tensor, or a list of them) is a state tensor (SGDP's buffer)."""
    first = u[0] if isinstance(u, list) else u
    return any((lst[0] if isinstance(lst, list) else lst) is first for lst in states)


def single_tensor(rule: Rule[Any], t: Bundle, o: Options, views: tail.Views) -> None:
    """One tensor at a time, in the reference package's operation order (bitwise equal to it)."""
    tensor_scalars = as_tensor(o, t.steps)
    divisor = rule.wd_divisor(o)
    scalings: dict[torch.device, Scaling] = {}
    for i, param in enumerate(t.params):
        p = upcast(param)
        g = upcast(t.grads[i])
        scaling = scalings.get(p.device)
        if scaling is None:
            scaling = scalings[p.device] = Scaling.of(o, p.device)
        g = scaling.grad(g, o.maximize)
        state = [upcast(lst[i]) for lst in t.states]
        step = t.steps[i] if t.steps is not None else None
        u, step_size = rule.direction(p, g, state, step, o, tensor_scalars, scaling)
        kept = None  # GradScaler: SGDP's buffer projected as a copy, written back unless the step is skipped
        if scaling.skip is not None and _aliases_state(u, state):
            kept, u = u, u.clone()
        u, view = projection.project_single(p, g, u, delta=o.delta, eps=o.eps, mode=o.scale_invariant)
        if views is not None:
            views[i] = view
        if o.caution:
            projection.cautious(p, g, u, view, eps=o.eps)
        if kept is not None:
            kept.copy_(torch.where(scaling.skip, kept, u))  # type: ignore[arg-type]
        if o.weight_decay > 0:
            f = tail.decay_factor(view, p, o.lr, *tail.decay_terms(o), divisor)
            p.mul_(scaling.factor(f, 1.0))
        u = scaling.update(u)
        if isinstance(step_size, Tensor):
            p.sub_(u * step_size)
        else:
            p.add_(u, alpha=-step_size)
        write_back([param, *(lst[i] for lst in t.states)], [p, *state])


class MultiTensorStep:
    """One device/dtype bucket of the multi-tensor path, between its two phases.

    Phase 1 (the constructor): float32 copies of half-precision tensors, GradScaler's unscaling, the
    rule's directions, the row sums and the first phase of the decision (:attr:`decision`, whose
    :attr:`~torch_adamp.projection.RowDecision.packed` a sharded caller sums). Phase 2 (:meth:`finish`):
    the decision, projection, decay and step, and the write-back of half-precision tensors.
    """

    def __init__(
        self, rule: Rule[Any], t: Bundle, idx: list[int], o: Options, views: tail.Views, dist: Any = None
    ) -> None:
        self.rule, self.t, self.idx, self.o, self.views = rule, t, idx, o, views
        sub = t.take(idx)
        self.P = [upcast(p) for p in sub.params]
        G = [upcast(g) for g in sub.grads]
        self.scaling = scaling = Scaling.of(o, self.P[0].device)
        self.G = G = scaling.grads(G, o.maximize)
        self.S = [[upcast(s) for s in lst] for lst in sub.states]
        steps = list(sub.steps) if sub.steps is not None else None
        U, self.step_size = rule.directions(self.P, G, self.S, steps, o, as_tensor(o, t.steps), scaling)
        self.direction_is_state = rule.direction_is_state(o)
        self.kept = None  # GradScaler: SGDP's buffers projected as copies, written back unless the step is skipped
        if scaling.skip is not None and not self.direction_is_state and _aliases_state(U, self.S):
            self.kept, U = U, [u.clone() for u in U]
        self.U = U
        shapes = dist.layouts(self.P) if dist is not None else None
        self.proj_idx = tail.projected_indices(
            [lay.shape for lay in shapes] if shapes is not None else [p.shape for p in self.P], o.scale_invariant
        )
        self.decision = None
        if self.proj_idx:
            pick = self.proj_idx
            self.decision = tail.decision(
                [self.P[i] for i in pick], [G[i] for i in pick], [U[i] for i in pick], o, dist
            )

    def finish(self) -> None:
        coefs: list[Tensor] = []
        view = None
        if self.decision is not None:
            coefs, view, _ = self.decision.coefficients()
        group_views = tail.sub_views(self.views, len(self.idx))
        tail.apply(
            self.P,
            self.G,
            self.U,
            self.step_size,
            self.o,
            proj_idx=self.proj_idx,
            coefs=coefs,
            view=view,
            wd_divisor=self.rule.wd_divisor(self.o),
            direction_is_state=self.direction_is_state,
            views=group_views,
            scaling=self.scaling,
        )
        if self.kept is not None:
            for b, u in zip(self.kept, self.U, strict=True):
                b.copy_(torch.where(self.scaling.skip, b, u))  # type: ignore[arg-type]
        sub = self.t.take(self.idx)
        write_back(sub.stored(), [*self.P, *(s for lst in self.S for s in lst)])
        tail.scatter_views(self.views, self.idx, group_views)


def multi_tensor_steps(
    rule: Rule[Any], t: Bundle, o: Options, views: tail.Views, dist: Any = None
) -> list[MultiTensorStep]:
    """Phase 1 of the multi-tensor path for every device/dtype bucket of ``t``."""
    buckets = group_by_device_and_dtype(range(len(t)), t.params).values()
    return [MultiTensorStep(rule, t, idx, o, views, dist) for idx in buckets]


def multi_tensor(rule: Rule[Any], t: Bundle, o: Options, views: tail.Views) -> None:
    """Foreach kernels per device/dtype bucket, batched row reductions and decisions (see :mod:`.tail`);
    each bucket finished before the next starts (one bucket's temporaries at a time)."""
    for idx in group_by_device_and_dtype(range(len(t)), t.params).values():
        MultiTensorStep(rule, t, idx, o, views).finish()
