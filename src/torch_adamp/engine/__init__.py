"""The engine: one projected step for any rule, on every path.

``step(rule, ...)`` chooses the path (per-tensor, multi-tensor, fused: the
native CPU kernel or ``torch.compile``), groups tensors by device and dtype,
runs half-precision tensors in float32 and writes them back, records the views
the projection used, and falls back where a path cannot take a tensor. The
rule supplies the direction (:mod:`torch_adamp.rules`); the projection and the
decay-and-step tail are shared (:mod:`torch_adamp.projection`, :mod:`.tail`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from ..rules import Rule
from . import fused as _fused
from . import paths
from .fused import Workspace
from .tail import Views

__all__ = ["Workspace", "step"]


def step(
    rule: Rule,
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    states: Sequence[Sequence[Tensor]],
    steps: Sequence[Tensor] | None,
    o: Any,
    *,
    foreach: bool | None = None,
    fused: bool | None = None,
    views: Views = None,
    dist: Any = None,
    workspace: Workspace | None = None,
) -> None:
    """One step of ``rule`` with options ``o`` over lists of tensors (updated in place).

    Paths: ``fused=True`` (or both ``None`` on the CPU with the native kernels)
    the fused path; ``foreach=True`` (or ``None``) the multi-tensor path;
    ``foreach=False`` the per-tensor reference-order loop. Sharded tensors
    (``dist`` given) always take the multi-tensor path, which implements the
    one-collective protocol. ``views``, if given, receives per parameter a 0-d
    tensor with the view the projection used. ``workspace`` (owned by the
    optimizer) keeps what the native kernels reuse between steps; without one
    they do not speculate (same results, a little slower on large tensors).
    """
    if fused or (fused is None and foreach is None and dist is None and _fused.default_is_fused(params)):
        if dist is not None:
            paths.multi_tensor(rule, params, grads, states, steps, o, views, dist)
        else:
            _fused.fused_step(rule, params, grads, states, steps, o, views, default=not fused, workspace=workspace)
    elif foreach or foreach is None or dist is not None:
        paths.multi_tensor(rule, params, grads, states, steps, o, views, dist)
    else:
        paths.single_tensor(rule, params, grads, states, steps, o, views)
