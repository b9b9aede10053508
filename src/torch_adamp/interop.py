"""Interoperability with the reference package ``adamp`` 0.3.0: state dicts it can load.

(Loading the reference's state dicts into this package's optimizers needs no
conversion: :meth:`~torch_adamp.optimizer.ProjectedOptimizer.load_state_dict`
normalises their integer step counters, as torch's optimizers do.)
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import Tensor

from .optimizers.adamp import AdamP
from .optimizers.sgdp import SGDP

#: group options of the reference package ``adamp`` 0.3.0 (AdamP and SGDP)
_REFERENCE_OPTIONS = {"lr", "betas", "eps", "weight_decay", "delta", "wd_ratio", "nesterov", "momentum", "dampening"}
#: our options whose non-default values the reference cannot reproduce, with the value it implies
_REFERENCE_IMPLIED = {"maximize": False, "scale_invariant": "auto", "project_momentum": True}


def to_reference_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Convert a ``state_dict()`` of :class:`~torch_adamp.AdamP` / :class:`~torch_adamp.SGDP` for the reference package.

    The result loads into ``adamp.AdamP`` / ``adamp.SGDP`` (0.3.0), which then
    continues exactly as if it had run from the start (bitwise, for the
    per-tensor path ``foreach=False`` with a float ``lr``). Tensor ``step``
    counters become Python ints (the reference computes its bias corrections
    from an int), a tensor ``lr`` becomes a float, and the options the reference
    does not have are dropped from the groups (keys it has, and keys of other
    tools such as ``initial_lr`` of the schedulers, are kept). Tensors are
    shared, not copied. The input is not modified.

    Raises ``ValueError`` for a group that uses an option the reference cannot
    reproduce: ``maximize=True``, ``scale_invariant`` other than ``"auto"``, or
    ``project_momentum=False``.
    """
    ours_only = {
        name
        for cls in (AdamP, SGDP)
        for name in inspect.signature(cls.__init__).parameters
        if name not in ("self", "params")
    } - _REFERENCE_OPTIONS
    groups = []
    for i, group in enumerate(state_dict["param_groups"]):
        for name, implied in _REFERENCE_IMPLIED.items():
            if name in group and group[name] != implied:
                raise ValueError(
                    f"param group {i} has {name}={group[name]!r}; the reference package has no such option "
                    f"(it always behaves as {name}={implied!r}), so its state dict cannot carry this run"
                )
        new = {k: v for k, v in group.items() if k not in ours_only}
        if isinstance(new.get("lr"), Tensor):
            new["lr"] = float(new["lr"].item())
        groups.append(new)
    state = {}
    for key, st in state_dict["state"].items():
        st = dict(st)
        if isinstance(st.get("step"), Tensor):
            st["step"] = int(st["step"].item())
        state[key] = st
    return {**state_dict, "state": state, "param_groups": groups}
