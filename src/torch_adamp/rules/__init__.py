"""Optimizer rules: what each projected optimizer adds to the shared projection (see :mod:`.base`)."""

from .adamp import ADAMP, AdamPOptions, AdamPRule
from .base import Options, Rule, Scaling
from .sgdp import SGDP, SGDPOptions, SGDPRule

#: every rule (those with a native kernel, csrc/rules/<name>.h, get its custom op: engine/fused.py)
RULES: tuple[Rule, ...] = (ADAMP, SGDP)

__all__ = ["ADAMP", "SGDP", "AdamPOptions", "AdamPRule", "Options", "Rule", "SGDPOptions", "SGDPRule", "Scaling"]
