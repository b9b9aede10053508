"""AdamP: Adam(W) with the radial component of the update removed for scale-invariant weights.

Heo et al., ICLR 2021 (arXiv 2006.08217), Algorithm 2. Per parameter ``w`` with gradient ``g``, step ``t``
and moments ``m``, ``v``::

    m <- b1 m + (1 - b1) g            v <- b2 v + (1 - b2) g^2
    u  = m / (sqrt(v) / sqrt(1 - b2^t) + eps)     (nesterov: (b1 m + (1 - b1) g) / ...)
    u, r = proj(w, g, u)              (r = wd_ratio if projected, else 1)
    w <- w (1 - lr wd r) - lr / (1 - b1^t) u

in the reference package's operation order (``eps`` added after the bias-corrected square root, as in
``torch.optim.AdamW``). The rule (:class:`AdamPRule`) is the first two lines; the projection and every
path are the engine's (:mod:`torch_adamp.engine`); the native kernel is ``csrc/rules/adamp.h``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
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
    Scalar,
    Scaling,
    State,
    States,
    Step,
    Steps,
    Tensors,
    option,
)

__all__ = ["ADAMP_RULE", "AdamP", "AdamPOptions", "AdamPRule", "adamp"]


@dataclass(frozen=True)
class AdamPOptions(Options):
    beta1: float = option(0.9, "coefficient of the running average of the gradient", check=checks.below_one)
    beta2: float = option(0.999, "coefficient of the running average of its square", check=checks.below_one)
    nesterov: bool = option(False, "Nesterov momentum on the first moment")


def _log(beta: float) -> float:
    return math.log(beta) if beta > 0 else -math.inf  # beta = 0: -expm1(-inf) = 1, like 1 - 0**t


def bias_corrections(step_t: Tensor, beta1: float, beta2: float, as_tensor: bool) -> tuple[Any, Any]:
    """``(1 - b1^t, sqrt(1 - b2^t))``; as tensors via ``-expm1(t log b)`` (no float32 cancellation)."""
    if as_tensor:
        return -torch.expm1(step_t * _log(beta1)), (-torch.expm1(step_t * _log(beta2))).sqrt()
    step = step_t.item()  # a CPU tensor: no device synchronisation
    return 1 - beta1**step, math.sqrt(1 - beta2**step)


class AdamPRule(Rule[AdamPOptions]):
    name = "adamp"
    options_type = AdamPOptions
    state_names = ("exp_avg", "exp_avg_sq")
    counts_steps = True
    kernels = frozenset({"native", "triton"})
    kernel_fields = (("beta1", "double"), ("beta2", "double"), ("nesterov", "int32"))
    renames: ClassVar[dict[str, tuple[str, ...]]] = {"betas": ("beta1", "beta2")}

    def check_group(self, group: dict[str, Any]) -> None:
        checks.betas("betas", group["betas"])

    def direction(
        self,
        p: Tensor,
        g: Tensor,
        state: State,
        step: Step,
        o: AdamPOptions,
        as_tensor: bool,
        scaling: Scaling = NO_SCALING,
    ) -> Direction:
        m, v = state
        assert step is not None
        b1: Scalar = o.beta1
        b2: Scalar = o.beta2
        if scaling.skip is None:
            step += 1
            t = step
        else:  # GradScaler: the counter advances unless skipped; corrections of the count if taken
            t = step + 1
            step.add_(scaling.increment(step))
            b1, b2 = scaling.factor(b1, 1.0), scaling.factor(b2, 1.0)
        bc1, sqrt_bc2 = bias_corrections(t, o.beta1, o.beta2, as_tensor)
        m.mul_(b1).add_(g, alpha=1 - o.beta1)
        v.mul_(b2).addcmul_(g, g, value=1 - o.beta2)
        denom = (v.sqrt() / sqrt_bc2).add_(o.eps)
        u = (o.beta1 * m + (1 - o.beta1) * g) / denom if o.nesterov else m / denom
        step_size: Scalar = o.lr / bc1
        return u, step_size

    def directions(
        self,
        p: Tensors,
        g: Tensors,
        state: States,
        steps: Steps,
        o: AdamPOptions,
        as_tensor: bool,
        scaling: Scaling = NO_SCALING,
    ) -> Directions:
        M, V = state
        assert steps is not None
        b1, b2, lr = o.beta1, o.beta2, o.lr
        b1_m: Scalar = b1
        b2_v: Scalar = b2
        if scaling.skip is None:
            torch._foreach_add_(steps, 1.0)
            counts = steps
        else:  # GradScaler: the counters advance unless skipped; corrections of the counts if taken
            counts = list(torch._foreach_add(steps, 1.0))
            torch._foreach_add_(steps, [scaling.increment(steps[0])] * len(steps))  # a list: no .item() on the CPU
            b1_m, b2_v = scaling.factor(b1, 1.0), scaling.factor(b2, 1.0)
        torch._foreach_mul_(M, b1_m)
        torch._foreach_add_(M, g, alpha=1 - b1)
        torch._foreach_mul_(V, b2_v)
        torch._foreach_addcmul_(V, g, g, value=1 - b2)

        if as_tensor:
            # 1 - b^t = -expm1(t log b), accurate in float32 (1 - pow(b, t) is not: 1e-5 off at b2 = 0.999)
            bc1 = torch._foreach_mul(counts, _log(b1))
            torch._foreach_expm1_(bc1)
            torch._foreach_neg_(bc1)
            sqrt_bc2: list[Any] = list(torch._foreach_mul(counts, _log(b2)))
            torch._foreach_expm1_(sqrt_bc2)
            torch._foreach_neg_(sqrt_bc2)
            torch._foreach_sqrt_(sqrt_bc2)
            step_sizes: list[Any] = [lr / b for b in bc1]
        else:
            corrections = [bias_corrections(s, b1, b2, False) for s in counts]
            sqrt_bc2 = [c[1] for c in corrections]
            step_sizes = [lr / c[0] for c in corrections]
        # the update, a chunk of tensors at a time: one chunk's denominator alive beside the updates (torch's
        # foreach AdamW keeps one copy of the group too), the same arithmetic element by element
        U: list[Tensor] = []
        for idx in _chunks(M, CHUNK_ELEMENTS):
            denom = torch._foreach_sqrt([V[i] for i in idx])
            torch._foreach_div_(denom, [sqrt_bc2[i] for i in idx])
            torch._foreach_add_(denom, o.eps)
            if o.nesterov:
                Uc = torch._foreach_mul([M[i] for i in idx], b1)
                torch._foreach_add_(Uc, torch._foreach_mul([g[i] for i in idx], 1 - b1))
                torch._foreach_div_(Uc, denom)
            else:
                Uc = torch._foreach_div([M[i] for i in idx], denom)
            del denom
            U.extend(Uc)

        if not as_tensor and not isinstance(lr, Tensor) and len(set(step_sizes)) == 1:
            return list(U), step_sizes[0]
        # per-tensor step counts, or a tensor lr: scale before projecting (the projection is linear)
        torch._foreach_mul_(U, step_sizes)
        return list(U), 1.0


#: the elements of the tensors whose update denominators the multi-tensor path computes at once (16 MiB of
#: float32): what its step allocates beyond the updates themselves
CHUNK_ELEMENTS = 1 << 22


def _chunks(tensors: Sequence[Tensor], limit: int) -> list[list[int]]:
    """Consecutive indices of ``tensors`` in runs of at most ``limit`` elements (a larger tensor alone)."""
    out: list[list[int]] = []
    size = 0
    for i, t in enumerate(tensors):
        n = t.numel()
        if not out or (size + n > limit and out[-1]):
            out.append([])
            size = 0
        out[-1].append(i)
        size += n
    return out


ADAMP_RULE = AdamPRule()


class AdamP(ProjectedOptimizer):
    r"""AdamP (Heo et al., ICLR 2021): Adam with projected updates for scale-invariant weights.

    Same arguments, defaults and numbers as ``adamp.AdamP`` 0.3.0, plus:

    Args:
        params: parameters or parameter groups (``named_parameters()`` gives named errors and stats).
        lr: learning rate (float or one-element tensor). Default ``1e-3``.
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
        caution: timm's "cautious" update (its ``cadamp``): see
            :func:`torch_adamp.projection.cautious`. Runs on the per-tensor and
            multi-tensor paths (a fused request takes the multi-tensor path).
        fp32_state: moments of float16/bfloat16 parameters are kept in float32
            (default); ``False`` keeps them in the parameter dtype to save memory.
            The math always runs in float32 for half-precision parameters, and
            results are rounded to nearest when written back.
        corrected_weight_decay: AdamC's corrected decay (Defazio et al. 2025):
            ``True`` multiplies the decay of each weight the projection judges
            scale-invariant at the step by ``lr / lr_max`` (composing with
            ``wd_ratio``); ``"all"`` every weight (timm's ``adamc``); ``False``
            (default) never. See docs/followups.md.
        lr_max: the peak lr of the correction; ``None``: the group's lr when the
            group is added (kept in the group, so in ``state_dict()``).
    """

    rule = ADAMP_RULE

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
    corrected_weight_decay: CorrectedDecay = False,
    lr_max: float | None = None,
) -> None:
    """Functional AdamP step over lists of tensors (updated in place): the math of :class:`AdamP`.

    ``views``, if given, receives per parameter a 0-d tensor with the view the
    projection used (:data:`~torch_adamp.projection.NONE`, ``CHANNEL`` or ``LAYER``).
    ``grad_scale`` / ``found_inf``: GradScaler's protocol, as in ``torch.optim.adam``
    (gradients divided by ``grad_scale``; nothing changes, counters included, where
    ``found_inf != 0``), decided on the device (:class:`torch_adamp.rule.Scaling`).
    ``dist``: the sharding helper of local shards (:func:`torch_adamp.distributed.localize`).
    """
    o = AdamPOptions(lr=lr, eps=eps, weight_decay=weight_decay, delta=delta, wd_ratio=wd_ratio, maximize=maximize,
                     scale_invariant=scale_invariant, capturable=capturable, grad_scale=grad_scale,
                     found_inf=found_inf, corrected_weight_decay=corrected_weight_decay, lr_max=lr_max,
                     beta1=beta1, beta2=beta2, nesterov=nesterov)  # fmt: skip
    t = engine.Bundle(params, grads, [exp_avgs, exp_avg_sqs], state_steps)
    functional_step(ADAMP_RULE, t, o, foreach=foreach, fused=fused, views=views, dist=dist)
