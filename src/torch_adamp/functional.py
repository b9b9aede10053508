"""The functional API: one step of a projected optimizer over lists of tensors (updated in place).

As ``torch.optim.adam.adam`` is to ``torch.optim.Adam``: each function is defined beside its class
(:mod:`torch_adamp.optimizers`), which only holds state and calls it.
"""

from .optimizers.adamp import adamp
from .optimizers.sgdp import sgdp

__all__ = ["adamp", "sgdp"]
