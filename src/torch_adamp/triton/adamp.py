"""AdamP's element functions for the Triton driver (:mod:`.driver`): the arithmetic of the native CPU kernel
(``csrc/rules/adamp.h``) and of the multi-tensor path, element by element::

    m <- fma(g, 1 - b1, m b1)        v <- v b2 + ((1 - b2) g) g
    u  = m / (sqrt(v) / sqrt(1 - b2^t) + eps)     (nesterov: (b1 m + (1 - b1) g) / ...)
    s  = -lr / (1 - b1^t)

with the bias corrections in float64 from the step count (``1 - b^t = 1 - exp(t log b)``), rounded once.
"""

import math
from typing import Any

import triton
import triton.language as tl

#: state tensors (``exp_avg``, ``exp_avg_sq``), float32
NSTATE = 2


def hyper(o: Any) -> list[float]:
    """The float64 hyper-parameters the kernels read: beta1, beta2, their logarithms, eps."""

    def log(b: float) -> float:
        return math.log(b) if b > 0 else -math.inf  # beta = 0: 1 - exp(-inf) = 1, like 1 - 0**t

    return [float(o.beta1), float(o.beta2), log(float(o.beta1)), log(float(o.beta2)), float(o.eps)]


def flags(o: Any) -> int:
    """Compile-time switches: bit 0, nesterov."""
    return int(bool(o.nesterov))


def dir_state(o: Any) -> int:
    """No state holds the projected direction."""
    return -1


@triton.jit
def scalars(hyp_ptr, lr, t, RFLAGS: tl.constexpr):
    """``(s, K)``: the step multiplier ``-lr / (1 - b1^t)`` and ``(b1, b2, 1 - b1, 1 - b2, sqrt(1 - b2^t), eps)``."""
    b1 = tl.load(hyp_ptr)
    b2 = tl.load(hyp_ptr + 1)
    bc1 = 1.0 - tl.exp(t * tl.load(hyp_ptr + 2))
    sbc2 = tl.sqrt(1.0 - tl.exp(t * tl.load(hyp_ptr + 3)))  # float64: IEEE-rounded
    ss = (-(lr / bc1)).to(tl.float32)
    K = (
        b1.to(tl.float32),
        b2.to(tl.float32),
        (1.0 - b1).to(tl.float32),
        (1.0 - b2).to(tl.float32),
        sbc2.to(tl.float32),
        tl.load(hyp_ptr + 4).to(tl.float32),
    )
    return ss, K


@triton.jit
def restore(g, m, v, K, RFLAGS: tl.constexpr):
    """The direction from the stored moments: ``m / (sqrt(v) / sqrt(bc2) + eps)`` (nesterov: ``b1 m + (1 - b1) g``
    over the same denominator)."""
    d = tl.div_rn(tl.sqrt_rn(v), K[4]) + K[5]
    if RFLAGS & 1:
        u = tl.div_rn(K[0] * m + K[2] * g, d)
    else:
        u = tl.div_rn(m, d)
    return u


@triton.jit
def direction(g, m, v, K, RFLAGS: tl.constexpr):
    """The moments (``m.mul_(b1).add_(g, alpha=1-b1)``, ``v.mul_(b2).addcmul_(g, g, value=1-b2)``) and the
    direction."""
    m = tl.fma(g, K[2], m * K[0])
    v = v * K[1] + (K[3] * g) * g
    return restore(g, m, v, K, RFLAGS), m, v
