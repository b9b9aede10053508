"""SGDP: SGD with momentum and the radial component removed for scale-invariant weights.

Heo et al., ICLR 2021 (arXiv 2006.08217), Algorithm 1, in the semantics of the
reference package ``adamp`` 0.3.0. Per parameter ``w`` with gradient ``g`` and
momentum buffer ``b`` (zeros at the start)::

    b <- momentum b + (1 - dampening) g
    d  = g + momentum b   if nesterov else   b
    d, r = proj(w, g, d)                      (r = wd_ratio if projected, else 1)
    w <- w (1 - lr wd r / (1 - momentum)) - lr d

Without nesterov the reference projects ``d`` in place, and ``d`` *is* the
buffer: the stored momentum is projected too (``project_momentum=True``, the
default here). ``project_momentum=False`` keeps the buffer unprojected, as in
the paper's algorithm box, timm and pytorch_optimizer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import _fused, _update, projection
from ._base import ParamsT, ProjectedOptimizer, _check_nonneg


def _single_tensor_sgdp(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    *,
    lr: float | Tensor,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    eps: float,
    delta: float,
    wd_ratio: float,
    maximize: bool,
    project_momentum: bool,
    scale_invariant: projection.ScaleInvariant,
    views: list[Tensor | None] | None,
) -> None:
    """Per-tensor loop in the reference package's operation order (bitwise equal to it)."""
    for i, param in enumerate(params):
        p = _update.upcast(param)
        g = _update.upcast(grads[i])
        if maximize:
            g = -g
        buf = _update.upcast(momentum_buffers[i])
        buf.mul_(momentum).add_(g, alpha=1 - dampening)
        if nesterov:
            d = g + momentum * buf
        else:
            d = buf if project_momentum else buf.clone()
        d, view = projection.project_single(p, g, d, delta=delta, eps=eps, mode=scale_invariant)
        if views is not None:
            views[i] = view
        if weight_decay > 0:
            p.mul_(_update.decay_factor(view, p, lr, weight_decay, wd_ratio, 1 - momentum))
        if isinstance(lr, Tensor):
            p.sub_(d * lr)
        else:
            p.add_(d, alpha=-lr)
        _update.write_back([param, momentum_buffers[i]], [p, buf])


def _multi_tensor_sgdp(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    *,
    lr: float | Tensor,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    eps: float,
    delta: float,
    wd_ratio: float,
    maximize: bool,
    project_momentum: bool,
    scale_invariant: projection.ScaleInvariant,
    views: list[Tensor | None] | None,
    dist: Any = None,
) -> None:
    """Foreach kernels for the buffer, batched row reductions and decisions, no host sync."""
    for idx in _update.group_by_device_and_dtype(range(len(params)), params).values():
        P = [_update.upcast(params[i]) for i in idx]
        G = [_update.upcast(grads[i]) for i in idx]
        if maximize:
            G = list(torch._foreach_neg(G))
        B = [_update.upcast(momentum_buffers[i]) for i in idx]
        torch._foreach_mul_(B, momentum)
        torch._foreach_add_(B, G, alpha=1 - dampening)
        if nesterov:
            D = list(torch._foreach_mul(B, momentum))
            torch._foreach_add_(D, G)
        else:
            D = B
        group_views = _update.sub_views(views, len(idx))
        _update.apply_multi(
            P,
            G,
            D,
            lr=lr,
            step_size=lr,
            weight_decay=weight_decay,
            wd_ratio=wd_ratio,
            wd_divisor=1 - momentum,
            delta=delta,
            eps=eps,
            mode=scale_invariant,
            updates_are_state=not nesterov and not project_momentum,
            views=group_views,
            dist=dist,
        )
        _update.write_back([params[i] for i in idx] + [momentum_buffers[i] for i in idx], P + B)
        _update.scatter_views(views, idx, group_views)


def sgdp(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    *,
    foreach: bool | None = None,
    fused: bool | None = None,
    lr: float | Tensor,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    eps: float,
    delta: float,
    wd_ratio: float,
    maximize: bool = False,
    project_momentum: bool = True,
    scale_invariant: projection.ScaleInvariant = "auto",
    views: list[Tensor | None] | None = None,
    dist: Any = None,
) -> None:
    """Functional SGDP step over lists of tensors (updates them in place)."""
    kwargs: dict[str, Any] = dict(
        lr=lr,
        momentum=momentum,
        dampening=dampening,
        weight_decay=weight_decay,
        nesterov=nesterov,
        eps=eps,
        delta=delta,
        wd_ratio=wd_ratio,
        maximize=maximize,
        project_momentum=project_momentum,
        scale_invariant=scale_invariant,
        views=views,
    )
    # default (both None): the fused native kernel on CPU when it is available, else multi-tensor
    if fused or (fused is None and foreach is None and dist is None and _fused.default_is_fused(params)):
        _fused.fused_sgdp(params, grads, momentum_buffers, dist=dist, default=not fused, **kwargs)
    elif foreach or foreach is None or dist is not None:
        _multi_tensor_sgdp(params, grads, momentum_buffers, dist=dist, **kwargs)
    else:
        _single_tensor_sgdp(params, grads, momentum_buffers, **kwargs)


class SGDP(ProjectedOptimizer):
    r"""SGDP (Heo et al., ICLR 2021): SGD with projected updates for scale-invariant weights.

    Same arguments, defaults and numbers as ``adamp.SGDP`` 0.3.0. As in the
    reference, the defaults are ``momentum=0, nesterov=False``; the paper and
    the reference README train with ``momentum=0.9, nesterov=True``.

    Args:
        params: parameters or parameter groups.
        lr: learning rate (float or 0-d tensor; required).
        momentum: momentum factor.
        dampening: dampening of the gradient in the buffer (applied from step 1).
        weight_decay: decoupled weight decay, divided by ``1 - momentum`` as in the reference.
        nesterov: Nesterov momentum.
        eps: norm floor of the cosine test and the projection.
        delta: threshold of the cosine test, ``max cos < delta / sqrt(row length)``.
        wd_ratio: weight-decay multiplier for weights that are projected.
        project_momentum: ``True`` (reference): without nesterov the stored
            buffer is projected along with the update. ``False``: the buffer
            keeps the raw gradients (paper box, timm, pytorch_optimizer).
        scale_invariant: ``"auto"``, ``"channel"``, ``"layer"`` or ``False``.
        maximize: maximise the objective.
        foreach: ``True``: multi-tensor implementation; ``False``: the
            per-tensor reference-order loop (bitwise equal to ``adamp``).
        fused: ``True``: the native kernel on the CPU, ``torch.compile`` of the
            step elsewhere. With neither set, the default is fused on the CPU and
            multi-tensor elsewhere.
        track_stats: record per-parameter statistics, read with :meth:`stats`.
        fp32_state: moments of float16/bfloat16 parameters in float32 (default)
            or in the parameter dtype; the math always runs in float32.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
        eps: float = 1e-8,
        delta: float = 0.1,
        wd_ratio: float = 0.1,
        *,
        project_momentum: bool = True,
        scale_invariant: projection.ScaleInvariant = "auto",
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        track_stats: bool = False,
        fp32_state: bool = True,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            eps=eps,
            delta=delta,
            wd_ratio=wd_ratio,
            project_momentum=project_momentum,
            scale_invariant=scale_invariant,
            maximize=maximize,
            foreach=foreach,
            fused=fused,
            capturable=False,
            track_stats=track_stats,
            fp32_state=fp32_state,
        )
        super().__init__(params, defaults)

    @staticmethod
    def _check_group(group: dict[str, Any]) -> None:
        _check_nonneg("momentum", group["momentum"])
        _check_nonneg("dampening", group["dampening"])
        if group["momentum"] >= 1 and group["weight_decay"] > 0:
            raise ValueError(
                f"Invalid momentum value: {group['momentum']!r}; weight decay divides by (1 - momentum), "
                "so momentum must be < 1"
            )
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError(
                f"Nesterov momentum requires a momentum > 0 and zero dampening "
                f"(got momentum={group['momentum']!r}, dampening={group['dampening']!r})"
            )

    def _step_group(self, group: dict[str, Any], params: list[Tensor], views: list[Tensor | None] | None) -> None:
        states = [self.state[p] for p in params]  # one lookup per parameter (Tensor.__hash__ is Python)
        for p, state in zip(params, states, strict=True):
            if "momentum" not in state:
                state["momentum"] = self._zeros_state(p, group)
        dist, lists = self._dist(
            group, params, [p.grad for p in params], [s["momentum"] for s in states]
        )  # DTensors (FSDP2) -> local shards
        sgdp(
            *lists,
            foreach=group["foreach"],
            fused=group["fused"],
            lr=group["lr"],
            momentum=group["momentum"],
            dampening=group["dampening"],
            weight_decay=group["weight_decay"],
            nesterov=group["nesterov"],
            eps=group["eps"],
            delta=group["delta"],
            wd_ratio=group["wd_ratio"],
            maximize=group["maximize"],
            project_momentum=group["project_momentum"],
            scale_invariant=group["scale_invariant"],
            views=views,
            dist=dist,
        )
