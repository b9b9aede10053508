"""LightningCLI (and other jsonargparse command lines): class paths that build this package's optimizers.

``torch_adamp.AdamP`` works as it is: ``--optimizer torch_adamp.AdamP --optimizer.lr 1e-3``.
``torch_adamp.SGDP`` keeps the reference's signature, in which ``lr`` has no value until given
(``torch.optim.optimizer.required``, as ``adamp.SGDP`` and torch's SGD before 2.2); jsonargparse, which
LightningCLI uses to read an optimizer's arguments from its signature, rejects that default even when
``--optimizer.lr`` is given ("Given value: <required parameter>"). The class here is ``torch_adamp.SGDP``
with ``lr`` declared required instead, nothing else::

    python train.py fit --optimizer torch_adamp.integrations.lightning.SGDP --optimizer.lr 0.1 \\
        --optimizer.momentum 0.9 --optimizer.nesterov true

Its objects are ``torch_adamp.SGDP`` objects (``isinstance`` holds, checkpoints are interchangeable).
Lightning itself is not imported.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torch.optim.optimizer import ParamsT

from ..optimizers.adamp import AdamP
from ..optimizers.sgdp import SGDP as _SGDP

__all__ = ["SGDP", "AdamP"]


class SGDP(_SGDP):
    """``torch_adamp.SGDP`` with ``lr`` a required argument (for jsonargparse); every other argument as there."""

    def __init__(self, params: ParamsT, lr: float | Tensor, **kwargs: Any) -> None:
        super().__init__(params, lr, **kwargs)
