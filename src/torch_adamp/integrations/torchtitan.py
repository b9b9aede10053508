"""torchtitan (0.3): ``"AdamP"`` and ``"SGDP"`` as optimizer names of its optimizer container.

torchtitan builds its optimizers in ``OptimizersContainer``, which resolves each parameter group's
``optimizer_name`` in ``_resolve_optimizer_factory`` (``"Adam"``, ``"AdamW"``, ``"DistMuon"``) and invites
subclassing. :class:`OptimizersContainer` here is that container with this package's names added; its
``Config`` builds it, so a trainer configuration switches by replacing the optimizer config::

    from torch_adamp.integrations.torchtitan import default_adamp

    config.optimizer = default_adamp(lr=8e-4)      # in place of torchtitan's default_adamw(lr=8e-4)

or, group by group, with torchtitan's own ``ParamGroupConfig`` (first matching pattern wins)::

    from torchtitan.components.optimizer import ParamGroupConfig
    from torch_adamp.integrations.torchtitan import OptimizersContainer

    no_decay = {"lr": 8e-4, "weight_decay": 0.0}
    config.optimizer = OptimizersContainer.Config(param_groups=[
        ParamGroupConfig(pattern=r"norm\\.weight$", optimizer_name="AdamP", optimizer_kwargs=no_decay),
        ParamGroupConfig(pattern=r".*", optimizer_name="AdamP", optimizer_kwargs={"lr": 8e-4, "weight_decay": 0.1}),
    ])

The container passes ``fused=`` and ``foreach=`` from its ``implementation`` setting; AdamP and SGDP
take both (``"fused"``: the native kernel on the CPU, the step compiled with ``torch.compile`` on other
devices; ``"foreach"``: the multi-tensor step; ``"for-loop"``: the per-tensor step).
``"fused_opt_states_bf16"`` is torchtitan's option for its Adam/AdamW only: here it is ``"fused"``,
with float32 moments. The container's checkpoints (flat, keyed by parameter name) hold our state
tensors as they hold AdamW's. FSDP2 parameters (one mesh dimension) are supported as everywhere in
this package; a weight sharded over two mesh dimensions (FSDP2 with tensor parallelism) is refused by
AdamP/SGDP with ``NotImplementedError`` (docs/distributed.md).

Importing this module imports torchtitan (``pip install 'torchtitan>=0.3,<0.4'``; the library's
``torchtitan`` extra). torchtitan's own models import triton at import time, which the extra adds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..optimizers.adamp import AdamP
from ..optimizers.sgdp import SGDP

try:
    from torchtitan.components.optimizer import OptimizersContainer as _Container
    from torchtitan.components.optimizer import ParamGroupConfig
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"torch_adamp.integrations.torchtitan needs torchtitan 0.3 (pip install 'torchtitan>=0.3,<0.4', or the "
        f"torchtitan extra of torch-adamp): {type(e).__name__}: {e}"
    ) from e

__all__ = ["OPTIMIZERS", "OptimizersContainer", "default_adamp", "resolve_optimizer_factory"]

#: the optimizer names this module adds to torchtitan's
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {"AdamP": AdamP, "SGDP": SGDP}


def resolve_optimizer_factory(name: str) -> Callable[..., torch.optim.Optimizer]:
    """The optimizer class or factory for ``name``: ``"AdamP"``, ``"SGDP"``, else torchtitan's own names."""
    if name in OPTIMIZERS:
        return OPTIMIZERS[name]
    factory: Callable[..., torch.optim.Optimizer] = _Container._resolve_optimizer_factory(name)
    return factory


class OptimizersContainer(_Container):  # type: ignore[misc]  # torchtitan is untyped (no py.typed)
    """torchtitan's ``OptimizersContainer``, with ``"AdamP"`` and ``"SGDP"`` among the optimizer names."""

    @dataclass(kw_only=True, slots=True)
    class Config(_Container.Config):  # type: ignore[misc]
        """torchtitan's ``OptimizersContainer.Config``; ``build()`` makes this container."""

    @staticmethod
    def _resolve_optimizer_factory(name: str) -> Callable[..., torch.optim.Optimizer]:
        return resolve_optimizer_factory(name)


def default_adamp(lr: float = 8e-4, **kwargs: Any) -> Any:
    """torchtitan's ``default_adamw`` with AdamP: one catch-all group, ``betas=(0.9, 0.95), eps=1e-8,
    weight_decay=0.1`` (its AdamW defaults), ``kwargs`` added or overriding. Returns an
    :class:`OptimizersContainer` ``.Config``."""
    return OptimizersContainer.Config(
        param_groups=[
            ParamGroupConfig(
                pattern=r".*",
                optimizer_name="AdamP",
                optimizer_kwargs={"lr": lr, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1, **kwargs},
            )
        ]
    )
