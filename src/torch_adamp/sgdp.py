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
the paper's algorithm box, timm and pytorch_optimizer. The direction is
:mod:`torch_adamp.rules.sgdp`; the projection and every path are shared with
AdamP (:mod:`torch_adamp.engine`).
"""

from __future__ import annotations

from torch import Tensor
from torch.optim.optimizer import required

from . import projection
from .functional import sgdp
from .optimizer import ParamsT, ProjectedOptimizer, defaults_of
from .rules import SGDP as SGDP_RULE

__all__ = ["SGDP", "sgdp"]


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
        scale_invariant: projection.ScaleInvariant = "auto",
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        track_stats: bool = False,
        fp32_state: bool = True,
    ) -> None:
        super().__init__(params, {**defaults_of(locals()), "capturable": False})
