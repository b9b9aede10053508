"""SGDP's element functions for the Triton driver (:mod:`.driver`): the arithmetic of the native CPU kernel
(``csrc/rules/sgdp.h``) and of the multi-tensor path, element by element::

    b <- fma(g, 1 - dampening, b momentum)
    d  = g + momentum b   if nesterov else   b
    s  = -lr

Without nesterov the direction *is* the buffer: with ``project_momentum`` (the reference's semantics) the
buffer stores the projected direction (``dir_state`` is its slot); without, it keeps the raw one.
"""

from typing import Any

import triton
import triton.language as tl

#: state tensors (``momentum``), float32
NSTATE = 1


def hyper(o: Any) -> list[float]:
    """The float64 hyper-parameters the kernels read: momentum, 1 - dampening."""
    return [float(o.momentum), 1.0 - float(o.dampening)]


def flags(o: Any) -> int:
    """Compile-time switches: bit 0, nesterov."""
    return int(bool(o.nesterov))


def dir_state(o: Any) -> int:
    """The buffer (slot 0) stores the projected direction without nesterov, with ``project_momentum``."""
    return 0 if not o.nesterov and o.project_momentum else -1


@triton.jit
def scalars(hyp_ptr, lr, t, RFLAGS: tl.constexpr):
    """``(s, K)``: the step multiplier ``-lr`` and ``(momentum, 1 - dampening)``."""
    K = (tl.load(hyp_ptr).to(tl.float32), tl.load(hyp_ptr + 1).to(tl.float32))
    return (-lr).to(tl.float32), K


@triton.jit
def restore(g, b, unused, K, RFLAGS: tl.constexpr):
    """The direction from the stored buffer: ``g + momentum b`` (nesterov) or ``b``."""
    if RFLAGS & 1:
        u = g + K[0] * b
    else:
        u = b
    return u


@triton.jit
def direction(g, b, unused, K, RFLAGS: tl.constexpr):
    """The buffer (``buf.mul_(momentum).add_(g, alpha=1-dampening)``) and the direction."""
    b = tl.fma(g, K[1], b * K[0])
    return restore(g, b, unused, K, RFLAGS), b, b
