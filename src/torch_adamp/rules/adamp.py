"""AdamP's rule: Adam's direction (Heo et al., ICLR 2021, Algorithm 2).

Per parameter with gradient ``g``, step ``t`` and moments ``m``, ``v``::

    m <- b1 m + (1 - b1) g            v <- b2 v + (1 - b2) g^2
    u  = m / (sqrt(v) / sqrt(1 - b2^t) + eps)     (nesterov: (b1 m + (1 - b1) g) / ...)
    s  = lr / (1 - b1^t)

in the reference package's operation order (``eps`` added after the bias-corrected
square root, as in ``torch.optim.AdamW``). Weight-decay divisor 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .base import Direction, Directions, Options, Rule, Scalar, Scaling, State, States, Step, Steps, Tensors


@dataclass(frozen=True)
class AdamPOptions(Options):
    beta1: float = 0.9
    beta2: float = 0.999
    nesterov: bool = False
    caution: bool = False


def _log(beta: float) -> float:
    return math.log(beta) if beta > 0 else -math.inf  # beta = 0: -expm1(-inf) = 1, like 1 - 0**t


def bias_corrections(step_t: Tensor, beta1: float, beta2: float, as_tensor: bool) -> tuple[Any, Any]:
    """``(1 - b1^t, sqrt(1 - b2^t))``; as tensors via ``-expm1(t log b)`` (no float32 cancellation)."""
    if as_tensor:
        return -torch.expm1(step_t * _log(beta1)), (-torch.expm1(step_t * _log(beta2))).sqrt()
    step = step_t.item()  # a CPU tensor: no device synchronisation
    return 1 - beta1**step, math.sqrt(1 - beta2**step)


class AdamPRule(Rule):
    name = "adamp"
    state_names = ("exp_avg", "exp_avg_sq")
    counts_steps = True
    kernel_fields = (("beta1", "double"), ("beta2", "double"), ("nesterov", "int32"))

    options_type = AdamPOptions

    def renamed(self, group: dict[str, Any]) -> dict[str, Any]:
        beta1, beta2 = group["betas"]
        return {"beta1": beta1, "beta2": beta2}

    def check(self, group: dict[str, Any]) -> None:
        betas = group["betas"]
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise ValueError(f"Invalid betas value: {betas!r}; expected a pair (beta1, beta2)")
        for k, b in enumerate(betas):
            if not isinstance(b, (int, float)) or isinstance(b, bool) or not 0.0 <= b < 1.0:
                raise ValueError(f"Invalid beta parameter at index {k}: {b!r}; expected 0 <= beta < 1")

    def direction(
        self, p: Tensor, g: Tensor, state: State, step: Step, o: Any, as_tensor: bool, amp: Scaling | None = None
    ) -> Direction:
        m, v = state
        assert step is not None
        b1: Scalar = o.beta1
        b2: Scalar = o.beta2
        if amp is None or amp.skip is None:
            step += 1
            t = step
        else:  # GradScaler: the counter advances unless skipped; corrections of the count if taken
            t = step + 1
            step.add_(amp.increment(step))
            b1, b2 = amp.factor(b1, 1.0), amp.factor(b2, 1.0)
        bc1, sqrt_bc2 = bias_corrections(t, o.beta1, o.beta2, as_tensor)
        m.mul_(b1).add_(g, alpha=1 - o.beta1)
        v.mul_(b2).addcmul_(g, g, value=1 - o.beta2)
        denom = (v.sqrt() / sqrt_bc2).add_(o.eps)
        u = (o.beta1 * m + (1 - o.beta1) * g) / denom if o.nesterov else m / denom
        step_size: Scalar = o.lr / bc1
        return u, step_size

    def directions(
        self, p: Tensors, g: Tensors, state: States, steps: Steps, o: Any, as_tensor: bool, amp: Scaling | None = None
    ) -> Directions:
        M, V = state
        assert steps is not None
        b1, b2, lr = o.beta1, o.beta2, o.lr
        b1_m: Scalar = b1
        b2_v: Scalar = b2
        if amp is None or amp.skip is None:
            torch._foreach_add_(steps, 1.0)
            counts = steps
        else:  # GradScaler: the counters advance unless skipped; corrections of the counts if taken
            counts = list(torch._foreach_add(steps, 1.0))
            torch._foreach_add_(steps, [amp.increment(steps[0])] * len(steps))  # a list: no .item() on the CPU
            b1_m, b2_v = amp.factor(b1, 1.0), amp.factor(b2, 1.0)
        torch._foreach_mul_(M, b1_m)
        torch._foreach_add_(M, g, alpha=1 - b1)
        torch._foreach_mul_(V, b2_v)
        torch._foreach_addcmul_(V, g, g, value=1 - b2)

        denom = torch._foreach_sqrt(V)
        if as_tensor:
            # 1 - b^t = -expm1(t log b), accurate in float32 (1 - pow(b, t) is not: 1e-5 off at b2 = 0.999)
            bc1 = torch._foreach_mul(counts, _log(b1))
            torch._foreach_expm1_(bc1)
            torch._foreach_neg_(bc1)
            sqrt_bc2 = torch._foreach_mul(counts, _log(b2))
            torch._foreach_expm1_(sqrt_bc2)
            torch._foreach_neg_(sqrt_bc2)
            torch._foreach_sqrt_(sqrt_bc2)
            torch._foreach_div_(denom, sqrt_bc2)
            step_sizes: list[Any] = [lr / b for b in bc1]
        else:
            corrections = [bias_corrections(s, b1, b2, False) for s in counts]
            torch._foreach_div_(denom, [c[1] for c in corrections])
            step_sizes = [lr / c[0] for c in corrections]
        torch._foreach_add_(denom, o.eps)

        if o.nesterov:
            U = torch._foreach_mul(M, b1)
            torch._foreach_add_(U, torch._foreach_mul(g, 1 - b1))
            torch._foreach_div_(U, denom)
        else:
            U = torch._foreach_div(M, denom)
        del denom

        if not as_tensor and not isinstance(lr, Tensor) and len(set(step_sizes)) == 1:
            return list(U), step_sizes[0]
        # per-tensor step counts, or a tensor lr: scale before projecting (the projection is linear)
        torch._foreach_mul_(U, step_sizes)
        return list(U), 1.0


ADAMP = AdamPRule()
