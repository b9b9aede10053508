"""SGDP: SGD with momentum and the radial component removed for scale-invariant weights.

Heo et al., ICLR 2021 (arXiv 2006.08217), Algorithm 1, in the semantics of the reference package
``adamp`` 0.3.0. Per parameter ``w`` with gradient ``g`` and momentum buffer ``b`` (zeros at the start)::

    b <- momentum b + (1 - dampening) g
    d  = g + momentum b   if nesterov else   b
    d, r = proj(w, g, d)                      (r = wd_ratio if projected, else 1)
    w <- w (1 - lr wd r / (1 - momentum)) - lr d

Without nesterov the reference projects ``d`` in place, and ``d`` *is* the buffer: the stored momentum is
projected too (``project_momentum=True``, the default here). ``project_momentum=False`` keeps the buffer
unprojected, as in the paper's algorithm box, timm and pytorch_optimizer. The rule (:class:`SGDPRule`) is
the first two lines; the projection and every path are the engine's; the native kernel is
``csrc/rules/sgdp.h``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import required

from .. import checks, engine
from ..checks import CorrectedDecay, ScaleInvariant
from ..optimizer import ParamsT, ProjectedOptimizer, defaults_of, functional_step
from ..rule import (
    NO_SCALING,
    Direction,
    Directions,
    Options,
    Rule,
    Scalar,
    Scaling,
    State,
    States,
    Step,
    Steps,
    Tensors,
    option,
)

__all__ = ["SGDP", "SGDP_RULE", "SGDPOptions", "SGDPRule", "sgdp"]


@dataclass(frozen=True)
class SGDPOptions(Options):
    momentum: float = option(0.0, "momentum factor", check=checks.nonneg)
    dampening: float = option(0.0, "dampening of the gradient in the buffer (applied from step 1)", check=checks.nonneg)
    nesterov: bool = option(False, "Nesterov momentum")
    project_momentum: bool = option(True, "without nesterov, the stored buffer is projected along with the update")


class SGDPRule(Rule[SGDPOptions]):
    name = "sgdp"
    options_type = SGDPOptions
    state_names = ("momentum",)
    kernels = frozenset({"native", "triton"})
    kernel_fields = (
        ("momentum", "double"),
        ("dampening", "double"),
        ("nesterov", "int32"),
        ("project_momentum", "int32"),
    )

    def check_group(self, group: dict[str, Any]) -> None:
        if group["momentum"] >= 1 and group["weight_decay"] > 0:
            raise ValueError(
                f"Invalid momentum value: {group['momentum']!r}; weight decay divides by (1 - momentum), "
                "so momentum must be < 1"
            )

    def wd_divisor(self, o: SGDPOptions) -> float:
        return float(1 - o.momentum)

    def direction_is_state(self, o: SGDPOptions) -> bool:
        return not o.nesterov and not o.project_momentum

    def direction(
        self,
        p: Tensor,
        g: Tensor,
        state: State,
        step: Step,
        o: SGDPOptions,
        as_tensor: bool,
        scaling: Scaling = NO_SCALING,
    ) -> Direction:
        (buf,) = state
        buf.mul_(scaling.factor(o.momentum, 1.0)).add_(g, alpha=1 - o.dampening)
        if o.nesterov:
            return g + o.momentum * buf, o.lr
        return (buf if o.project_momentum else buf.clone()), o.lr

    def directions(
        self,
        p: Tensors,
        g: Tensors,
        state: States,
        steps: Steps,
        o: SGDPOptions,
        as_tensor: bool,
        scaling: Scaling = NO_SCALING,
    ) -> Directions:
        (B,) = state
        momentum: Scalar = scaling.factor(o.momentum, 1.0)
        torch._foreach_mul_(B, momentum)
        torch._foreach_add_(B, g, alpha=1 - o.dampening)
        if o.nesterov:
            D = list(torch._foreach_mul(B, o.momentum))
            torch._foreach_add_(D, g)
            return D, o.lr
        return B, o.lr


SGDP_RULE = SGDPRule()


class SGDP(ProjectedOptimizer):
    r"""SGDP (Heo et al., ICLR 2021): SGD with projected updates for scale-invariant weights.

    Same arguments, defaults and numbers as ``adamp.SGDP`` 0.3.0. As in the
    reference, the defaults are ``momentum=0, nesterov=False``; the paper and
    the reference README train with ``momentum=0.9, nesterov=True``.

    Args:
        params: parameters or parameter groups.
        lr: learning rate (float or one-element tensor); required unless every parameter group sets it.
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
        caution: timm's "cautious" update (its ``csgdp``, with ``project_momentum=False``):
            see :func:`torch_adamp.projection.cautious`; per-tensor and multi-tensor paths only.
        corrected_weight_decay: AdamC's corrected decay (Defazio et al. 2025):
            ``True`` multiplies the decay of each weight the projection judges
            scale-invariant at the step by ``lr / lr_max`` (composing with
            ``wd_ratio``); ``"all"`` every weight (timm's ``adamc``); ``False``
            (default) never. See docs/followups.md.
        lr_max: the peak lr of the correction; ``None``: the group's lr when the
            group is added (kept in the group, so in ``state_dict()``).
    """

    rule = SGDP_RULE

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = required,  # type: ignore[assignment]  # torch.optim's sentinel, as in adamp 0.3.0
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
        eps: float = 1e-8,
        delta: float = 0.1,
        wd_ratio: float = 0.1,
        *,
        project_momentum: bool = True,
        scale_invariant: ScaleInvariant = "auto",
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        track_stats: bool = False,
        fp32_state: bool = True,
        caution: bool = False,
        corrected_weight_decay: CorrectedDecay = False,
        lr_max: float | None = None,
    ) -> None:
        super().__init__(params, {**defaults_of(locals()), "capturable": False})


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
    scale_invariant: ScaleInvariant = "auto",
    views: list[Tensor | None] | None = None,
    dist: Any = None,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    corrected_weight_decay: CorrectedDecay = False,
    lr_max: float | None = None,
) -> None:
    """Functional SGDP step over lists of tensors (updated in place): the math of :class:`SGDP`;
    ``views``, ``dist``, ``grad_scale`` and ``found_inf`` as for :func:`torch_adamp.adamp`."""
    o = SGDPOptions(lr=lr, eps=eps, weight_decay=weight_decay, delta=delta, wd_ratio=wd_ratio, maximize=maximize,
                    scale_invariant=scale_invariant, capturable=False, grad_scale=grad_scale, found_inf=found_inf,
                    corrected_weight_decay=corrected_weight_decay, lr_max=lr_max, momentum=momentum,
                    dampening=dampening, nesterov=nesterov,
                    project_momentum=project_momentum)  # fmt: skip
    t = engine.Bundle(params, grads, [momentum_buffers])
    functional_step(SGDP_RULE, t, o, foreach=foreach, fused=fused, views=views, dist=dist)
