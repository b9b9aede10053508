"""timm's optimizer factory with torch_adamp's AdamP and SGDP.

``timm.optim.create_optimizer_v2(model, "adamp", ...)`` builds timm's own AdamP. After
:func:`register`, the same factory builds this package's classes under the names ``tadamp`` and
``tsgdp`` (and, with ``replace=True``, under ``adamp`` and ``sgdp`` too, so that existing timm
configurations and ``train.py --opt adamp`` switch without edits)::

    import timm
    from torch_adamp.integrations.timm import register

    register()
    opt = timm.optim.create_optimizer_v2(model, "tadamp", lr=1e-3, weight_decay=0.05)

The factory works as for its own entries: it groups the parameters (no weight decay on 1-D
parameters and the model's ``no_weight_decay()``), applies ``layer_decay`` and ``lookahead_``, and
passes ``lr``, ``weight_decay``, ``eps``, ``betas`` / ``momentum`` and ``foreach`` through. The
defaults it adds are timm's for its own ``adamp`` / ``sgdp`` entries (:data:`TIMM_DEFAULTS`, checked
against the installed timm by the tests), so that a timm run keeps its numbers:

* ``tadamp``: ``torch_adamp.AdamP`` with ``wd_ratio=0.01, nesterov=True`` (the class defaults are
  the paper's ``wd_ratio=0.1, nesterov=False``);
* ``tsgdp``: ``torch_adamp.SGDP`` with ``nesterov=True``, ``momentum=0.9`` (timm's factory default
  for every optimizer with momentum) and ``project_momentum=False`` (timm's SGDP keeps the stored
  momentum buffer unprojected; with ``nesterov=True`` the two agree anyway).

Arguments given to the factory override these. timm's own entries are left alone unless
``replace=True``.
"""

from __future__ import annotations

import importlib
from typing import Any

from ..optimizers.adamp import AdamP
from ..optimizers.sgdp import SGDP

#: The factory's defaults for the names registered here: those of timm's ``adamp`` / ``sgdp`` entries,
#: plus ``project_momentum=False``, which makes this SGDP step as timm's does.
TIMM_DEFAULTS: dict[str, dict[str, Any]] = {
    "adamp": {"wd_ratio": 0.01, "nesterov": True},
    "sgdp": {"nesterov": True, "project_momentum": False},
}

#: The names :func:`register` adds, and the timm name each one mirrors.
NAMES = {"tadamp": "adamp", "tsgdp": "sgdp"}


def install_hint() -> str:
    """What to install for ``import timm`` to work beside the installed torch (timm imports torchvision, which
    must be the build made for that torch: a plain ``pip install timm`` replaces a CPU torch by PyPI's CUDA
    build, and PyPI's torchvision does not import beside a CPU torch)."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    try:  # the distribution's version says where it came from (PyPI's wheels report "+cu130" at run time only)
        installed = version("torch")
    except PackageNotFoundError:  # a build from source
        installed = torch.__version__
    base, _, label = installed.partition("+")
    parts = base.split(".")
    if len(parts) < 2 or parts[0] != "2" or not parts[1].isdigit():
        return f"timm with a torchvision built for torch {installed}"
    series = f"0.{int(parts[1]) + 15}.*"
    if label:  # +cpu, +cu128, ...: PyTorch's own index for that variant
        index = f" --index-url https://download.pytorch.org/whl/{label}"
    else:  # PyPI's build (CUDA on Linux, CPU elsewhere): its torchvision is on PyPI too
        index = ""
    return (
        f"timm with the torchvision built for torch {installed}: from a clone, bash scripts/setup.sh timm; "
        f"by hand, pip install 'torch=={installed}' 'torchvision=={series}'{index}, then pip install timm"
    )


def _default_registry() -> Any:
    try:
        factory = importlib.import_module("timm.optim._optim_factory")
    except Exception as e:  # ImportError, or a torchvision built for another torch
        raise ImportError(
            f"torch_adamp.integrations.timm.register needs an importable timm ({install_hint()}): "
            f"{type(e).__name__}: {e}"
        ) from e
    return factory.default_registry


def register(*, replace: bool = False, registry: Any | None = None) -> list[str]:
    """Register torch_adamp's AdamP and SGDP in timm's optimizer factory.

    Args:
        replace: also register them under timm's names ``adamp`` and ``sgdp``, in place of
            timm's own classes (timm logs that it overwrites them).
        registry: a ``timm.optim.OptimizerRegistry``; default: the one behind
            ``timm.optim.create_optimizer_v2`` (``timm.optim._optim_factory.default_registry``,
            the only place timm keeps it).

    Returns:
        The names registered: ``["tadamp", "tsgdp"]``, then ``"adamp", "sgdp"`` with ``replace``.
        Calling it again registers the same entries again (harmless).

    Raises:
        ImportError: ``registry`` is not given and timm cannot be imported.
    """
    if registry is None:
        registry = _default_registry()
    optim_info = importlib.import_module(type(registry).__module__).OptimInfo
    entries = {
        "adamp": dict(
            opt_class=AdamP,
            description="torch_adamp.AdamP: Adam with the projection for scale-invariant weights (sync-free)",
            has_betas=True,
        ),
        "sgdp": dict(
            opt_class=SGDP,
            description="torch_adamp.SGDP: SGD with the projection for scale-invariant weights (sync-free)",
            has_momentum=True,
        ),
    }
    names = list(NAMES) + (list(NAMES.values()) if replace else [])
    for name in names:
        kind = NAMES.get(name, name)
        registry.register(optim_info(name=name, defaults=dict(TIMM_DEFAULTS[kind]), **entries[kind]))
    return names
