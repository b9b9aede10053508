"""The functional API: one AdamP or SGDP step over lists of tensors (updated in place).

The math of each optimizer is its rule (:mod:`torch_adamp.rules`); these
functions only name the arguments and hand them to the engine.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from . import engine
from .projection import ScaleInvariant
from .rules import ADAMP, SGDP, AdamPOptions, SGDPOptions


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
    scale_invariant: ScaleInvariant = "auto",
    views: list[Tensor | None] | None = None,
    dist: Any = None,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    """Functional AdamP step (:mod:`torch_adamp.rules.adamp`).

    ``views``, if given, receives per parameter a 0-d tensor with the view the
    projection used (:data:`~torch_adamp.projection.NONE`, ``CHANNEL`` or ``LAYER``).
    ``grad_scale`` / ``found_inf``: GradScaler's protocol, as in ``torch.optim.adam``
    (gradients divided by ``grad_scale``; nothing changes, counters included, where
    ``found_inf != 0``), decided on the device (:class:`torch_adamp.rules.Scaling`).
    """
    o = AdamPOptions(lr=lr, eps=eps, weight_decay=weight_decay, delta=delta, wd_ratio=wd_ratio, maximize=maximize,
                     scale_invariant=scale_invariant, capturable=capturable, grad_scale=grad_scale,
                     found_inf=found_inf, beta1=beta1, beta2=beta2, nesterov=nesterov)  # fmt: skip
    engine.step(ADAMP, params, grads, [exp_avgs, exp_avg_sqs], state_steps, o,
                foreach=foreach, fused=fused, views=views, dist=dist)  # fmt: skip


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
) -> None:
    """Functional SGDP step (:mod:`torch_adamp.rules.sgdp`); ``grad_scale`` / ``found_inf`` as for :func:`adamp`."""
    o = SGDPOptions(lr=lr, eps=eps, weight_decay=weight_decay, delta=delta, wd_ratio=wd_ratio, maximize=maximize,
                    scale_invariant=scale_invariant, capturable=False, grad_scale=grad_scale, found_inf=found_inf,
                    momentum=momentum, dampening=dampening, nesterov=nesterov,
                    project_momentum=project_momentum)  # fmt: skip
    engine.step(SGDP, params, grads, [momentum_buffers], None, o, foreach=foreach, fused=fused, views=views, dist=dist)
