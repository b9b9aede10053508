"""Pieces every experiment shares: the optimizer pairs, weight-norm tracking, mean and spread over seeds.

The baselines are ``torch.optim.SGD`` (Nesterov) and ``torch.optim.AdamW``;
their projected twins are this package's ``SGDP`` and ``AdamP`` with the same
hyperparameters and ``track_stats=True``, so that the norm and the effective
step size ``lr / ||w||^2`` of each tracked weight come from the optimizer
itself (``opt.stats()``: the weight before the step) rather than from a
separate pass.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence

import torch
from torch import nn

import torch_adamp

OPTIMIZERS = ("sgd", "sgdp", "adamw", "adamp")
LABELS = {"sgd": "SGD", "sgdp": "SGDP", "adamw": "AdamW", "adamp": "AdamP"}
#: each projected optimizer and the torch.optim baseline it is compared with
PAIRS = (("sgd", "sgdp"), ("adamw", "adamp"))
PROJECTED = {"sgdp": "sgd", "adamp": "adamw"}
BASELINE_CLASSES = {"sgd": "torch.optim.SGD", "adamw": "torch.optim.AdamW"}


def implementation(name: str) -> str:
    """The class behind an optimizer name, for tables and results.json."""
    return BASELINE_CLASSES.get(name, f"torch_adamp.{LABELS[name]}")


def build_optimizer(
    name: str,
    named_params: Iterable[tuple[str, nn.Parameter]],
    *,
    lr: float,
    weight_decay: float,
    momentum: float = 0.9,
    betas: tuple[float, float] = (0.9, 0.999),
) -> torch.optim.Optimizer:
    """One of ``OPTIMIZERS`` over ``named_params``: SGD/SGDP with Nesterov momentum, AdamW/AdamP with
    decoupled weight decay; SGDP and AdamP get ``track_stats=True`` (and the names, for ``stats()``)."""
    named = list(named_params)
    params = [p for _, p in named]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=True, weight_decay=weight_decay)
    if name == "sgdp":
        return torch_adamp.SGDP(
            named, lr=lr, momentum=momentum, nesterov=True, weight_decay=weight_decay, track_stats=True
        )
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
    if name == "adamp":
        return torch_adamp.AdamP(named, lr=lr, betas=betas, weight_decay=weight_decay, track_stats=True)
    raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")


def weight_stats(
    opt: torch.optim.Optimizer, model: nn.Module, names: Sequence[str]
) -> tuple[list[float], list[float], list[bool] | None]:
    """Per tracked weight after the last step: norm, effective step size ``lr / ||w||^2`` and,
    for SGDP/AdamP, whether the optimizer projected it (from ``opt.stats()``, the weight before the step);
    for the torch.optim baselines the norm is read from the model and ``None`` stands for "projected"."""
    if isinstance(opt, (torch_adamp.ProjectedOptimizer, torch_adamp.Projected)):
        s = opt.stats()
        return (
            [s[f"{n}/weight_norm"] for n in names],
            [s[f"{n}/lr_over_norm_sq"] for n in names],
            [s[f"{n}/view"] > 0 for n in names],
        )
    params = dict(model.named_parameters())
    lr = float(opt.param_groups[0]["lr"])
    norms = [float(params[n].detach().norm()) for n in names]
    return norms, [lr / v**2 for v in norms], None


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)
