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
) -> None:
    """Functional AdamP step (:mod:`torch_adamp.rules.adamp`).

    ``views``, if given, receives per parameter a 0-d tensor with the view the
    projection used (:data:`~torch_adamp.projection.NONE`, ``CHANNEL`` or ``LAYER``).
    """
    o = AdamPOptions(
        lr, eps, weight_decay, delta, wd_ratio, maximize, scale_invariant, capturable, beta1, beta2, nesterov
    )
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
) -> None:
    """Functional SGDP step (:mod:`torch_adamp.rules.sgdp`)."""
    o = SGDPOptions(lr, eps, weight_decay, delta, wd_ratio, maximize, scale_invariant, False,
                    momentum, dampening, nesterov, project_momentum)  # fmt: skip
    engine.step(SGDP, params, grads, [momentum_buffers], None, o, foreach=foreach, fused=fused, views=views, dist=dist)
