"""AdamP: Adam(W) with the radial component of the update removed for scale-invariant weights.

Heo et al., ICLR 2021 (arXiv 2006.08217), Algorithm 2. Per parameter ``w``
with gradient ``g``, step ``t`` and moments ``m``, ``v``::

    m <- b1 m + (1 - b1) g            v <- b2 v + (1 - b2) g^2
    u  = m / (sqrt(v) / sqrt(1 - b2^t) + eps)     (nesterov: (b1 m + (1 - b1) g) / ...)
    u, r = proj(w, g, u)              (r = wd_ratio if projected, else 1)
    w <- w (1 - lr wd r) - lr / (1 - b1^t) u

The direction is :mod:`torch_adamp.rules.adamp`; the projection and every path
are shared with SGDP (:mod:`torch_adamp.engine`).
"""

from __future__ import annotations

from torch import Tensor

from . import projection
from .functional import adamp
from .optimizer import ParamsT, ProjectedOptimizer, defaults_of
from .rules import ADAMP

__all__ = ["AdamP", "adamp"]


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
        fp32_state: moments of float16/bfloat16 parameters are kept in float32
            (default); ``False`` keeps them in the parameter dtype to save memory.
            The math always runs in float32 for half-precision parameters, and
            results are rounded to nearest when written back.
    """

    rule = ADAMP

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
        super().__init__(params, defaults_of(locals()))
