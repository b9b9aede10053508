"""SGDP's rule: SGD's momentum direction (Heo et al., ICLR 2021, Algorithm 1, reference semantics).

Per parameter with gradient ``g`` and momentum buffer ``b`` (zeros at the start)::

    b <- momentum b + (1 - dampening) g
    d  = g + momentum b   if nesterov else   b
    s  = lr

Weight-decay divisor ``1 - momentum``. Without nesterov the reference projects
``d`` in place, and ``d`` *is* the buffer: the stored momentum is projected too
(``project_momentum=True``); with ``project_momentum=False`` the direction is a
copy and the buffer keeps the raw gradients (the paper's box, timm).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .base import Direction, Directions, Options, Rule, Scalar, Scaling, State, States, Step, Steps, Tensors


@dataclass(frozen=True)
class SGDPOptions(Options):
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    project_momentum: bool = True
    caution: bool = False


def _nonneg(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0.0 or not math.isfinite(value):
        raise ValueError(f"Invalid {name} value: {value!r}; expected a finite number >= 0")


class SGDPRule(Rule):
    name = "sgdp"
    state_names = ("momentum",)
    counts_steps = False
    kernel_fields = (
        ("momentum", "double"),
        ("dampening", "double"),
        ("nesterov", "int32"),
        ("project_momentum", "int32"),
    )

    options_type = SGDPOptions

    def check(self, group: dict[str, Any]) -> None:
        _nonneg("momentum", group["momentum"])
        _nonneg("dampening", group["dampening"])
        if group["momentum"] >= 1 and group["weight_decay"] > 0:
            raise ValueError(
                f"Invalid momentum value: {group['momentum']!r}; weight decay divides by (1 - momentum), "
                "so momentum must be < 1"
            )

    def wd_divisor(self, o: Any) -> float:
        return float(1 - o.momentum)

    def update_is_state(self, o: Any) -> bool:
        return not o.nesterov and not o.project_momentum

    def direction(
        self, p: Tensor, g: Tensor, state: State, step: Step, o: Any, as_tensor: bool, amp: Scaling | None = None
    ) -> Direction:
        (buf,) = state
        momentum: Scalar = o.momentum if amp is None else amp.factor(o.momentum, 1.0)
        buf.mul_(momentum).add_(g, alpha=1 - o.dampening)
        if o.nesterov:
            return g + o.momentum * buf, o.lr
        return (buf if o.project_momentum else buf.clone()), o.lr

    def directions(
        self, p: Tensors, g: Tensors, state: States, steps: Steps, o: Any, as_tensor: bool, amp: Scaling | None = None
    ) -> Directions:
        (B,) = state
        torch._foreach_mul_(B, o.momentum if amp is None else amp.factor(o.momentum, 1.0))
        torch._foreach_add_(B, g, alpha=1 - o.dampening)
        if o.nesterov:
            D = list(torch._foreach_mul(B, o.momentum))
            torch._foreach_add_(D, g)
            return D, o.lr
        return B, o.lr


SGDP = SGDPRule()
