"""AdamP: Adam(W) with the radial component of the update removed for scale-invariant weights.

Heo et al., ICLR 2021 (arXiv 2006.08217), Algorithm 2. Per parameter ``w``
with gradient ``g``, step ``t`` and moments ``m``, ``v``::

    m <- b1 m + (1 - b1) g            v <- b2 v + (1 - b2) g^2
    u  = m / (sqrt(v) / sqrt(1 - b2^t) + eps)     (nesterov: (b1 m + (1 - b1) g) / ...)
    u, r = proj(w, g, u)              (r = wd_ratio if projected, else 1)
    w <- w (1 - lr wd r) - lr / (1 - b1^t) u
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from . import _fused, _update, projection
from ._base import ParamsT, ProjectedOptimizer


def _log(beta: float) -> float:
    return math.log(beta) if beta > 0 else -math.inf  # beta = 0: -expm1(-inf) = 1, like 1 - 0**t


def _bias_corrections(step_t: Tensor, beta1: float, beta2: float, as_tensor: bool) -> tuple[Any, Any]:
    if as_tensor:  # 1 - b^t = -expm1(t log b): no float32 cancellation (1 - 0.999 loses 4 digits)
        return -torch.expm1(step_t * _log(beta1)), (-torch.expm1(step_t * _log(beta2))).sqrt()
    step = step_t.item()  # a CPU tensor: no device synchronisation
    return 1 - beta1**step, math.sqrt(1 - beta2**step)


def _single_tensor_adamp(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    capturable: bool,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    delta: float,
    wd_ratio: float,
    nesterov: bool,
    maximize: bool,
    scale_invariant: projection.ScaleInvariant,
    views: list[Tensor | None] | None,
) -> None:
    """Per-tensor loop in the reference package's operation order (bitwise equal to it)."""
    as_tensor = capturable or _update.is_compiling()
    for i, param in enumerate(params):
        p = _update.upcast(param)
        g = _update.upcast(grads[i])
        if maximize:
            g = -g
        m, v, step_t = _update.upcast(exp_avgs[i]), _update.upcast(exp_avg_sqs[i]), state_steps[i]
        step_t += 1
        bc1, sqrt_bc2 = _bias_corrections(step_t, beta1, beta2, as_tensor)
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (v.sqrt() / sqrt_bc2).add_(eps)
        step_size = lr / bc1
        u = (beta1 * m + (1 - beta1) * g) / denom if nesterov else m / denom
        u, view = projection.project_single(p, g, u, delta=delta, eps=eps, mode=scale_invariant)
        if views is not None:
            views[i] = view
        if weight_decay > 0:
            p.mul_(_update.decay_factor(view, p, lr, weight_decay, wd_ratio))
        if isinstance(step_size, Tensor):
            p.sub_(u * step_size)
        else:
            p.add_(u, alpha=-step_size)
        _update.write_back([param, exp_avgs[i], exp_avg_sqs[i]], [p, m, v])


def _multi_tensor_adamp(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    capturable: bool,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    delta: float,
    wd_ratio: float,
    nesterov: bool,
    maximize: bool,
    scale_invariant: projection.ScaleInvariant,
    views: list[Tensor | None] | None,
    dist: Any = None,
) -> None:
    """Foreach kernels for the moments, batched row reductions and decisions, no host sync."""
    as_tensor = capturable or _update.is_compiling()
    for idx in _update.group_by_device_and_dtype(range(len(params)), params).values():
        P = [_update.upcast(params[i]) for i in idx]
        G = [_update.upcast(grads[i]) for i in idx]
        if maximize:
            G = list(torch._foreach_neg(G))
        M = [_update.upcast(exp_avgs[i]) for i in idx]
        V = [_update.upcast(exp_avg_sqs[i]) for i in idx]
        S = [state_steps[i] for i in idx]
        torch._foreach_add_(S, 1.0)

        torch._foreach_mul_(M, beta1)
        torch._foreach_add_(M, G, alpha=1 - beta1)
        torch._foreach_mul_(V, beta2)
        torch._foreach_addcmul_(V, G, G, value=1 - beta2)

        denom = torch._foreach_sqrt(V)
        if as_tensor:
            # 1 - b^t = -expm1(t log b), accurate in float32 (1 - pow(b, t) is not: 1e-5 off at b2 = 0.999)
            bc1 = torch._foreach_mul(S, _log(beta1))
            torch._foreach_expm1_(bc1)
            torch._foreach_neg_(bc1)
            sqrt_bc2 = torch._foreach_mul(S, _log(beta2))
            torch._foreach_expm1_(sqrt_bc2)
            torch._foreach_neg_(sqrt_bc2)
            torch._foreach_sqrt_(sqrt_bc2)
            torch._foreach_div_(denom, sqrt_bc2)
            step_sizes: list[Any] = [lr / b for b in bc1]
        else:
            corrections = [_bias_corrections(s, beta1, beta2, False) for s in S]
            torch._foreach_div_(denom, [c[1] for c in corrections])
            step_sizes = [lr / c[0] for c in corrections]
        torch._foreach_add_(denom, eps)

        if nesterov:
            U = torch._foreach_mul(M, beta1)
            torch._foreach_add_(U, torch._foreach_mul(G, 1 - beta1))
            torch._foreach_div_(U, denom)
        else:
            U = torch._foreach_div(M, denom)
        del denom

        if not as_tensor and not isinstance(lr, Tensor) and len(set(step_sizes)) == 1:
            step_size: float | Tensor = step_sizes[0]
        else:  # per-tensor step counts, or tensor lr: scale before projecting (it is linear)
            torch._foreach_mul_(U, step_sizes)
            step_size = 1.0
        group_views = _update.sub_views(views, len(idx))
        _update.apply_multi(
            P,
            G,
            U,
            lr=lr,
            step_size=step_size,
            weight_decay=weight_decay,
            wd_ratio=wd_ratio,
            wd_divisor=1.0,
            delta=delta,
            eps=eps,
            mode=scale_invariant,
            updates_are_state=False,
            views=group_views,
            dist=dist,
        )
        _update.write_back(
            [params[i] for i in idx] + [exp_avgs[i] for i in idx] + [exp_avg_sqs[i] for i in idx], P + M + V
        )
        _update.scatter_views(views, idx, group_views)


def adamp(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    foreach: bool | None = None,
    fused: bool | None = None,
    capturable: bool = False,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    delta: float,
    wd_ratio: float,
    nesterov: bool,
    maximize: bool = False,
    scale_invariant: projection.ScaleInvariant = "auto",
    views: list[Tensor | None] | None = None,
    dist: Any = None,
) -> None:
    """Functional AdamP step over lists of tensors (updates them in place).

    ``views``, if given, receives per parameter a 0-d tensor with the view the
    projection used (:data:`~torch_adamp.projection.NONE`, ``CHANNEL`` or ``LAYER``).
    """
    kwargs: dict[str, Any] = dict(
        capturable=capturable,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        delta=delta,
        wd_ratio=wd_ratio,
        nesterov=nesterov,
        maximize=maximize,
        scale_invariant=scale_invariant,
        views=views,
    )
    # default (both None): the fused native kernel on CPU when it is available, else multi-tensor
    if fused or (fused is None and foreach is None and dist is None and _fused.default_is_fused(params)):
        _fused.fused_adamp(params, grads, exp_avgs, exp_avg_sqs, state_steps, dist=dist, default=not fused, **kwargs)
    elif foreach or foreach is None or dist is not None:
        _multi_tensor_adamp(params, grads, exp_avgs, exp_avg_sqs, state_steps, dist=dist, **kwargs)
    else:
        _single_tensor_adamp(params, grads, exp_avgs, exp_avg_sqs, state_steps, **kwargs)


class AdamP(ProjectedOptimizer):
    r"""AdamP (Heo et al., ICLR 2021): Adam with projected updates for scale-invariant weights.

    Same arguments, defaults and numbers as ``adamp.AdamP`` 0.3.0, plus:

    Args:
        params: parameters or parameter groups (``named_parameters()`` gives named errors and stats).
        lr: learning rate (float or 0-d tensor). Default ``1e-3``.
        betas: coefficients of the running averages of the gradient and its square.
        eps: added to the denominator; also the norm floor of the projection.
        weight_decay: decoupled weight decay (AdamW convention, multiplied by ``lr``).
        delta: threshold of the cosine test, ``max cos < delta / sqrt(row length)``.
        wd_ratio: weight-decay multiplier for weights that are projected.
        nesterov: Nesterov momentum on the first moment.
        scale_invariant: ``"auto"`` (the paper's cosine test), ``"channel"`` or
            ``"layer"`` (always project in that view), or ``False`` (never: AdamW).
        maximize: maximise the objective.
        foreach: ``True``: multi-tensor implementation; ``False``: the
            per-tensor reference-order loop (bitwise equal to ``adamp``).
        fused: ``True``: the native kernel on the CPU, ``torch.compile`` of the
            step elsewhere (compiled once per model). With neither set, the
            default is fused on the CPU and multi-tensor elsewhere.
        capturable: keep step counters on the device (CUDA graphs).
        track_stats: record per-parameter statistics, read with :meth:`stats`.
        fp32_state: moments of float16/bfloat16 parameters are kept in float32
            (default); ``False`` keeps them in the parameter dtype to save memory.
            The math always runs in float32 for half-precision parameters, and
            results are rounded to nearest when written back.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        delta: float = 0.1,
        wd_ratio: float = 0.1,
        nesterov: bool = False,
        *,
        scale_invariant: projection.ScaleInvariant = "auto",
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        track_stats: bool = False,
        fp32_state: bool = True,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            delta=delta,
            wd_ratio=wd_ratio,
            nesterov=nesterov,
            scale_invariant=scale_invariant,
            maximize=maximize,
            foreach=foreach,
            fused=fused,
            capturable=capturable,
            track_stats=track_stats,
            fp32_state=fp32_state,
        )
        super().__init__(params, defaults)

    @staticmethod
    def _check_group(group: dict[str, Any]) -> None:
        betas = group["betas"]
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise ValueError(f"Invalid betas value: {betas!r}; expected a pair (beta1, beta2)")
        for k, b in enumerate(betas):
            if not isinstance(b, (int, float)) or isinstance(b, bool) or not 0.0 <= b < 1.0:
                raise ValueError(f"Invalid beta parameter at index {k}: {b!r}; expected 0 <= beta < 1")

    def _step_group(self, group: dict[str, Any], params: list[Tensor], views: list[Tensor | None] | None) -> None:
        states = [self.state[p] for p in params]  # one lookup per parameter (Tensor.__hash__ is Python)
        for p, state in zip(params, states, strict=True):
            if "exp_avg" not in state:
                state["step"] = self._new_step(p, group)
                state["exp_avg"] = self._zeros_state(p, group)
                state["exp_avg_sq"] = self._zeros_state(p, group)
        beta1, beta2 = group["betas"]
        dist, lists = self._dist(
            group,
            params,
            [p.grad for p in params],
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [s["step"] for s in states],
        )  # DTensors (FSDP2) -> local shards
        adamp(
            *lists,
            foreach=group["foreach"],
            fused=group["fused"],
            capturable=group["capturable"],
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            delta=group["delta"],
            wd_ratio=group["wd_ratio"],
            nesterov=group["nesterov"],
            maximize=group["maximize"],
            scale_invariant=group["scale_invariant"],
            views=views,
            dist=dist,
        )
