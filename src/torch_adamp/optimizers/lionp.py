"""LionP: Lion (Chen et al. 2023, arXiv 2302.06675) with AdamP's projection for scale-invariant weights.

Per parameter ``w`` with gradient ``g`` and momentum ``m`` (zeros at the start), lion-pytorch's update in
its operation order, then the projection and the decay every projected optimizer here takes::

    u  = sign(b1 m + (1 - b1) g)          (the update: a sign, computed from the momentum before its update)
    m <- b2 m + (1 - b2) g
    u, r = proj(w, g, u)                  (r = wd_ratio if projected, else 1)
    w <- w (1 - lr wd r) - lr u

``Projected(lion_pytorch.Lion(...))`` is the same optimizer (tests/test_lionp.py: within float32 rounding,
with identical decisions, on every path); LionP takes one fused sweep pair on the CPU
(``csrc/rules/lionp.h``) where ``Projected`` runs Lion's per-tensor loop and then its own two sweeps. The
rule (:class:`LionPRule`) is the first two lines; the projection and every path are the engine's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from .. import checks, engine
from ..checks import CorrectedDecay, ScaleInvariant
from ..optimizer import ParamsT, ProjectedOptimizer, defaults_of, functional_step
from ..rule import (
    NO_SCALING,
    Direction,
    Directions,
    Options,
    Rule,
    Scaling,
    State,
    States,
    Step,
    Steps,
    Tensors,
    option,
)

__all__ = ["LIONP_RULE", "LionP", "LionPOptions", "LionPRule", "lionp"]


@dataclass(frozen=True)
class LionPOptions(Options):
    beta1: float = option(0.9, "interpolation of the momentum and the gradient in the update", check=checks.below_one)
    beta2: float = option(0.99, "coefficient of the momentum's running average", check=checks.below_one)


class LionPRule(Rule[LionPOptions]):
    name = "lionp"
    options_type = LionPOptions
    state_names = ("exp_avg",)
    kernels = frozenset({"native"})
    kernel_fields = (("beta1", "double"), ("beta2", "double"))
    renames: ClassVar[dict[str, tuple[str, ...]]] = {"betas": ("beta1", "beta2")}

    def check_group(self, group: dict[str, Any]) -> None:
        checks.betas("betas", group["betas"])

    def direction(
        self,
        p: Tensor,
        g: Tensor,
        state: State,
        step: Step,
        o: LionPOptions,
        as_tensor: bool,
        scaling: Scaling = NO_SCALING,
    ) -> Direction:
        (m,) = state
        u = m.mul(o.beta1).add_(g, alpha=1 - o.beta1).sgn_()  # lion-pytorch: exp_avg.clone().mul_(b1).add(g).sgn_()
        m.mul_(scaling.factor(o.beta2, 1.0)).add_(g, alpha=1 - o.beta2)
        return u, o.lr

    def directions(
        self,
        p: Tensors,
        g: Tensors,
        state: States,
        steps: Steps,
        o: LionPOptions,
        as_tensor: bool,
        scaling: Scaling = NO_SCALING,
    ) -> Directions:
        (M,) = state
        U = list(torch._foreach_mul(M, o.beta1))
        torch._foreach_add_(U, g, alpha=1 - o.beta1)
        torch._foreach_sign_(U)
        torch._foreach_mul_(M, scaling.factor(o.beta2, 1.0))  # 1 where GradScaler skips the step: M unchanged
        torch._foreach_add_(M, g, alpha=1 - o.beta2)
        return U, o.lr


LIONP_RULE = LionPRule()


class LionP(ProjectedOptimizer):
    r"""LionP: Lion with projected updates for scale-invariant weights (docs/followups.md).

    lion-pytorch's ``Lion`` (its defaults: ``lr=1e-4, betas=(0.9, 0.99), weight_decay=0``) with AdamP's
    projection and ``wd_ratio``: ``Projected(lion_pytorch.Lion(...))`` as one optimizer, with a native CPU
    kernel.

    Args:
        params: parameters or parameter groups (``named_parameters()`` gives named errors and stats).
        lr: learning rate (float or one-element tensor). Lion's steps are signs: use a learning rate 3-10x
            smaller than AdamW's.
        betas: ``(beta1, beta2)``: the interpolation of the update, the momentum's running average.
        weight_decay: decoupled weight decay (multiplied by ``lr``; Lion's works best 3-10x larger than AdamW's).
        eps: the norm floor of the projection.
        delta: threshold of the cosine test, ``max cos < delta / sqrt(row length)``.
        wd_ratio: weight-decay multiplier for weights that are projected.
        scale_invariant: ``"auto"``, ``"channel"``, ``"layer"`` or ``False``.
        maximize: maximise the objective.
        foreach: ``True``: multi-tensor; ``False``: the per-tensor loop (lion-pytorch's operation order).
        fused: ``True``: the native kernel on the CPU, ``torch.compile`` elsewhere; with neither set, fused on
            the CPU, multi-tensor elsewhere.
        capturable: keep scalars on the device (CUDA graphs; LionP keeps no step counter).
        track_stats: record per-parameter statistics, read with :meth:`stats`.
        fp32_state: the momentum of float16/bfloat16 parameters in float32 (default).
        caution: timm's cautious update after the projection (per-tensor and multi-tensor paths).
        corrected_weight_decay: ``True``, ``"all"`` or ``False``: as for :class:`~torch_adamp.AdamP` (timm's
            ``lionc`` is ``"all"`` without the projection).
        lr_max: the correction's peak lr (``None``: the group's lr when it is added).
    """

    rule = LIONP_RULE

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0,
        eps: float = 1e-8,
        delta: float = 0.1,
        wd_ratio: float = 0.1,
        *,
        scale_invariant: ScaleInvariant = "auto",
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        track_stats: bool = False,
        fp32_state: bool = True,
        caution: bool = False,
        corrected_weight_decay: CorrectedDecay = False,
        lr_max: float | None = None,
    ) -> None:
        super().__init__(params, defaults_of(locals()))


def lionp(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    *,
    foreach: bool | None = None,
    fused: bool | None = None,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    weight_decay: float,
    eps: float = 1e-8,
    delta: float = 0.1,
    wd_ratio: float = 0.1,
    maximize: bool = False,
    scale_invariant: ScaleInvariant = "auto",
    views: list[Tensor | None] | None = None,
    dist: Any = None,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    corrected_weight_decay: CorrectedDecay = False,
    lr_max: float | None = None,
) -> None:
    """Functional LionP step over lists of tensors (updated in place): the math of :class:`LionP`;
    ``views``, ``dist``, ``grad_scale`` and ``found_inf`` as for :func:`torch_adamp.adamp`."""
    o = LionPOptions(lr=lr, eps=eps, weight_decay=weight_decay, delta=delta, wd_ratio=wd_ratio, maximize=maximize,
                     scale_invariant=scale_invariant, grad_scale=grad_scale, found_inf=found_inf,
                     corrected_weight_decay=corrected_weight_decay, lr_max=lr_max, beta1=beta1,
                     beta2=beta2)  # fmt: skip
    t = engine.Bundle(params, grads, [exp_avgs])
    functional_step(LIONP_RULE, t, o, foreach=foreach, fused=fused, views=views, dist=dist)
