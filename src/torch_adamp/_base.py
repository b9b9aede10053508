"""What AdamP and SGDP share as ``torch.optim.Optimizer`` classes.

Argument checks, gathering the parameters that have gradients, the sparse and
complex refusals, state-dict migration from the reference package, and the
optional statistics. The math lives in plain functions (``adamp.adamp``,
``sgdp.sgdp``); classes only hold state.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import projection

ParamsT = Iterable[Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, Tensor]]


def _check_nonneg(name: str, value: Any) -> None:
    v = value.item() if isinstance(value, Tensor) else value
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not v >= 0.0 or not math.isfinite(v):
        raise ValueError(f"Invalid {name} value: {value!r}; expected a finite number >= 0")


def check_lr(lr: Any) -> None:
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError(f"Invalid lr value: a tensor lr must have one element, got shape {tuple(lr.shape)}")
    _check_nonneg("lr", lr)


class ProjectedOptimizer(Optimizer):
    """Base of :class:`~torch_adamp.AdamP` and :class:`~torch_adamp.SGDP`."""

    #: extra per-group checks of the subclass: ``f(group)`` raising ValueError
    _check_group: Callable[[dict[str, Any]], None]

    def __init__(self, params: ParamsT, defaults: dict[str, Any]) -> None:
        self._check_common(defaults)
        self._check_group(defaults)
        super().__init__(params, defaults)

    # -- argument checks -------------------------------------------------------------
    @staticmethod
    def _check_common(group: dict[str, Any]) -> None:
        check_lr(group["lr"])
        for name in ("eps", "weight_decay", "delta"):
            _check_nonneg(name, group[name])
        wd_ratio = group["wd_ratio"]
        _check_nonneg("wd_ratio", wd_ratio)
        if wd_ratio > 1:
            raise ValueError(f"Invalid wd_ratio value: {wd_ratio!r}; expected a number in [0, 1]")
        projection.check_scale_invariant(group["scale_invariant"])
        if group.get("foreach") and group.get("fused"):
            raise ValueError("foreach and fused cannot both be True")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        merged = {**self.defaults, **param_group}
        self._check_common(merged)
        self._check_group(merged)
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        for i, p in enumerate(params):
            if isinstance(p, Tensor) and p.is_complex():
                raise ValueError(
                    f"{self._describe(param_group, i, p)} is complex; {type(self).__name__} does not support "
                    "complex parameters (pass torch.view_as_real(p) as a real parameter instead)"
                )
        super().add_param_group(param_group)

    # -- the step ----------------------------------------------------------------------
    def _step_group(self, group: dict[str, Any], params: list[Tensor], views: list[Tensor | None] | None) -> None:
        """Initialise state and run the functional step of one group (subclasses)."""
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Perform one optimisation step; ``closure`` re-evaluates the loss (run with grad enabled)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_grads()
        before = self._stats_before()
        all_views: dict[Tensor, Tensor] = {}
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            views: list[Tensor | None] | None = [None] * len(params) if group["track_stats"] else None
            self._step_group(group, params, views)
            if views is not None:
                all_views.update((p, v) for p, v in zip(params, views, strict=True) if v is not None)
        self._stats_after(before, all_views)
        return loss

    def _dist(self, params: list[Tensor]) -> Any:
        """Sharding helper for DTensor parameters (None for plain tensors)."""
        return None

    # -- helpers for step() ----------------------------------------------------------
    @staticmethod
    def _describe(group: dict[str, Any], i: int, p: Tensor) -> str:
        names = group.get("param_names")
        if names is not None and i < len(names):
            return f"parameter {names[i]!r}"
        return f"parameter #{i} (shape {tuple(p.shape)}) of its parameter group"

    def _check_grads(self) -> None:
        """Refuse sparse gradients before anything is modified."""
        for group in self.param_groups:
            for i, p in enumerate(group["params"]):
                if p.grad is not None and p.grad.is_sparse:
                    raise RuntimeError(
                        f"{type(self).__name__} does not support sparse gradients, but "
                        f"{self._describe(group, i, p)} has one; use dense gradients "
                        "(e.g. nn.Embedding(sparse=False))"
                    )

    @staticmethod
    def _new_step(p: Tensor, group: dict[str, Any]) -> Tensor:
        if group["capturable"]:
            return torch.zeros((), dtype=torch.float32, device=p.device)
        return torch.tensor(0.0, dtype=torch.float32)

    @staticmethod
    def _zeros_state(p: Tensor) -> Tensor:
        """Moments are float32 for half-precision parameters."""
        dtype = torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype
        return torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # groups saved by the reference package (or an older version) lack our options
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    # -- state dict: reference-package migration ---------------------------------------
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict saved by this class or by the reference ``adamp`` package.

        Integer ``step`` counters (reference format) become tensors; moments of
        half-precision parameters stay float32 (torch would cast them down).
        """
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        id_map = {}
        for g_saved, g in zip(state_dict["param_groups"], self.param_groups, strict=True):
            id_map.update(zip(g_saved["params"], g["params"], strict=True))
        for key, value in saved.items():
            p = id_map.get(key)
            if p is None:
                continue
            st = self.state[p]
            group = next(g for g in self.param_groups if any(q is p for q in g["params"]))
            for name, v in value.items():
                if name == "step" and not isinstance(v, Tensor):
                    st[name] = self._new_step(p, group).fill_(float(v))
                elif name == "step" and group.get("capturable"):
                    st[name] = v.to(device=p.device, dtype=torch.float32)
                elif isinstance(v, Tensor) and v.is_floating_point() and p.dtype in (torch.float16, torch.bfloat16):
                    st[name] = v.to(device=p.device, dtype=torch.float32)

    # -- statistics ------------------------------------------------------------------
    def _stats_before(self) -> list[tuple[Tensor, Tensor]] | None:
        if not any(g.get("track_stats") for g in self.param_groups):
            return None
        return [
            (p, p.detach().clone())
            for g in self.param_groups
            if g.get("track_stats")
            for p in g["params"]
            if p.grad is not None
        ]

    def _stats_after(self, before: list[tuple[Tensor, Tensor]] | None, views: dict[Tensor, Tensor]) -> None:
        if before is None:
            return
        for p, old in before:
            st = self.state[p]
            new = p.detach().float()
            old = old.float()
            n_new = torch.linalg.vector_norm(new)
            n_old = torch.linalg.vector_norm(old)
            # angle between w_t and w_{t+1}, stable for tiny angles: 2 asin(|w'/|w'| - w/|w||/2)
            chord = torch.linalg.vector_norm(new / n_new.clamp_min(1e-30) - old / n_old.clamp_min(1e-30))
            st["stat_view"] = views.get(p, torch.zeros((), dtype=torch.long, device=p.device)).clone()
            st["stat_weight_norm"] = n_new
            st["stat_angle"] = 2 * torch.asin((chord / 2).clamp(max=1.0))

    def stats(self) -> dict[str, float]:
        """Statistics of the last step, as a flat ``{name: float}`` dict (host sync here only).

        Needs ``track_stats=True`` on the groups of interest. Keys, per
        parameter ``<name>`` (the name given with ``named_parameters()``, else
        ``group<g>.param<i>``): ``<name>/view`` (0 none, 1 channel, 2 layer),
        ``<name>/weight_norm``, ``<name>/angular_update`` (radians between the
        weight before and after the step), ``<name>/lr_over_norm_sq``
        (``lr / ||w||^2``, the effective step size of a scale-invariant weight);
        and ``projected_fraction``: the fraction of tracked parameters projected.
        """
        keys: list[str] = []
        values: list[Tensor] = []
        lrs: list[float] = []
        for gi, group in enumerate(self.param_groups):
            if not group.get("track_stats"):
                continue
            names = group.get("param_names")
            for i, p in enumerate(group["params"]):
                st = self.state.get(p, {})
                if "stat_weight_norm" not in st:
                    continue
                name = names[i] if names is not None else f"group{gi}.param{i}"
                keys.append(name)
                values.append(
                    torch.stack(
                        [
                            st["stat_view"].float().cpu(),
                            st["stat_weight_norm"].float().cpu(),
                            st["stat_angle"].float().cpu(),
                        ]
                    )
                )
                lr = group["lr"]
                lrs.append(float(lr.item()) if isinstance(lr, Tensor) else float(lr))
        out: dict[str, float] = {}
        if not keys:
            return out
        table = torch.stack(values).tolist()
        projected = 0
        for name, (view, norm, angle), lr in zip(keys, table, lrs, strict=True):
            out[f"{name}/view"] = view
            out[f"{name}/weight_norm"] = norm
            out[f"{name}/angular_update"] = angle
            out[f"{name}/lr_over_norm_sq"] = lr / norm**2 if norm > 0 else math.inf
            projected += view > 0
        out["projected_fraction"] = projected / len(keys)
        return out
