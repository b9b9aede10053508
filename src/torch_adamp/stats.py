"""``track_stats``: per-parameter statistics of the last step, kept on the device until read.

Shared by the optimizers over a rule (:class:`torch_adamp.optimizer.ProjectedOptimizer`) and by
:class:`torch_adamp.Projected`: a copy of each tracked parameter before the step (a buffer reused every
step), then, after it, per parameter the view the projection took, the norms before and after and the
angle between them, as one small tensor per bucket; :meth:`TrackStats.stats` reads them to the host.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from . import distributed, projection
from .engine import precision


def reused_copies(tensors: list[Any], store: dict[Tensor, Tensor], params: list[Tensor]) -> list[Tensor]:
    """Copies of ``tensors`` in buffers of ``store`` (keyed by their parameters), allocated once and reused."""
    bufs = []
    for t, p in zip(tensors, params, strict=True):
        buf = store.get(p)
        if buf is None or (buf.shape, buf.dtype, buf.device) != (t.shape, t.dtype, t.device):
            buf = store[p] = torch.empty_like(t, memory_format=torch.preserve_format)
        bufs.append(buf)
    if any(distributed.is_dtensor(p) for p in params):  # no foreach copy for DTensors
        for buf, t in zip(bufs, tensors, strict=True):
            buf.copy_(t.detach())
    else:
        torch._foreach_copy_(bufs, [t.detach() for t in tensors])  # reused buffers: no allocation
    return bufs


class TrackStats:
    """The ``track_stats`` machinery shared by :class:`ProjectedOptimizer` and :class:`~torch_adamp.Projected`.

    Needs ``param_groups`` (groups with a ``track_stats`` key, optionally ``param_names`` and ``lr``);
    the subclass creates ``_last_stats = []`` and ``_stats_copies = {}`` in ``__init__``.
    """

    param_groups: list[dict[str, Any]]

    # Kept in ``self._last_stats``, not in ``self.state``: they never enter
    # ``state_dict()`` (checkpoints are the same with and without track_stats and
    # stay loadable by the reference package) and only the last step is kept.
    # With track_stats off on every group, the step does no tensor work for them.
    _last_stats: list[tuple[list[Tensor], float | Tensor, Tensor]]  # (params, lr, rows) per chunk
    _stats_copies: dict[Tensor, Tensor]  # param -> buffer for its value before the step, reused every step

    def _stats_before(self) -> list[tuple[dict[str, Any], list[Tensor], list[Tensor]]] | None:
        """Copies of the tracked parameters that have a gradient, taken before the step."""
        tracked = []
        for group in self.param_groups:
            if group.get("track_stats") and not self._stats_elsewhere(group):
                params = [p for p in group["params"] if p.grad is not None]
                if params:
                    tracked.append((group, params, reused_copies(params, self._stats_copies, params)))
        return tracked or None

    def _stats_after(
        self,
        before: list[tuple[dict[str, Any], list[Tensor], list[Tensor]]] | None,
        views: dict[Tensor, Tensor],
    ) -> None:
        """Per tracked parameter, on its device (no host sync): view, norms before/after, angle."""
        if before is None:
            if self._last_stats or self._stats_copies:
                self._last_stats.clear()  # tracking off: free the copies
                self._stats_copies.clear()
            return
        chunks = []
        for group, params, olds in before:
            lr = group["lr"]
            lr = lr.detach().clone() if isinstance(lr, Tensor) else float(lr)
            for idx in precision.group_by_device_and_dtype(range(len(params)), params).values():
                ps = [params[i] for i in idx]
                new = [precision.upcast(p.detach()) for p in ps]
                old = [precision.upcast(olds[i]) for i in idx]
                if any(distributed.is_dtensor(p) for p in ps):  # FSDP2: from local shards, one all_reduce
                    n_old, n_new, angle = distributed.norm_stats(new, old)
                else:
                    n_new = torch.stack(torch._foreach_norm(new))
                    n_old = torch.stack(torch._foreach_norm(old))
                    # angle between w_t and w_{t+1}, accurate for tiny angles: 2 asin(chord / 2) with the
                    # chord |w/|w| - w'/|w'||, computed in one pass on the copy as |w - w' (|w|/|w'|)| / |w|
                    tiny = torch.finfo(n_new.dtype).tiny
                    torch._foreach_addcmul_(old, new, list((-n_old / n_new.clamp_min(tiny)).unbind()))
                    chord = torch.stack(torch._foreach_norm(old)) / n_old.clamp_min(tiny)
                    angle = 2 * torch.asin((chord / 2).clamp(max=1.0))
                    angle = torch.where((n_new > 0) & (n_old > 0), angle, math.nan)  # undefined at w = 0
                none = torch.zeros((), dtype=torch.long, device=n_new.device)
                view = torch.stack([views.get(p, none) for p in ps]).to(n_new.dtype)
                chunks.append((ps, lr, torch.stack([view, n_old, n_new, angle], dim=1)))
        self._last_stats[:] = chunks

    def _stats_elsewhere(self, group: dict[str, Any]) -> bool:
        """Whether the step of ``group`` records its statistics itself (DeepSpeed ZeRO partitions)."""
        return False

    def _other_stats(self) -> list[tuple[list[str], list[int], float | Tensor, Tensor]]:
        """Statistics recorded by the steps themselves: ``(names, numels, lr, (n, 4) table)`` per group."""
        return []

    def stats(self) -> dict[str, float]:
        """Statistics of the last step, as a flat ``{key: float}`` dict; the only host sync of ``track_stats``.

        Covers the parameters of groups with ``track_stats=True`` that had a
        gradient at the last step. Keys, per parameter ``<name>`` (its name when
        the optimizer was given ``named_parameters()``, else ``group<g>.param<i>``),
        in parameter order:

        * ``<name>/view``: the view the projection used: 0 none, 1 channel, 2 layer;
        * ``<name>/weight_norm``: ``||w||`` after the step;
        * ``<name>/angular_update``: angle in radians between ``w`` before and
          after the step (the effective step size; NaN when either is zero);
        * ``<name>/lr_over_norm_sq``: ``lr / ||w||^2`` with ``w`` before the step
          (the effective step size of SGD on a scale-invariant weight);

        and ``projected_fraction`` / ``projected_numel_fraction``: the fraction
        of the tracked parameters with at least 2 dimensions (by count / by
        number of elements) that were projected. Empty when nothing is tracked.
        """
        rows: dict[Tensor, tuple[list[float], float]] = {}
        for params, lr, table in self._last_stats:
            lr_f = float(lr.item()) if isinstance(lr, Tensor) else lr
            rows.update((p, (r, lr_f)) for p, r in zip(params, table.tolist(), strict=True))
        out: dict[str, float] = {}
        other = self._other_stats()
        if not rows and not other:
            return out
        counts = [0, 0, 0, 0]  # projected, eligible, projected numel, eligible numel
        for gi, group in enumerate(self.param_groups):
            names = group.get("param_names")
            for i, p in enumerate(group["params"]):
                if p not in rows:
                    continue
                (view, n_old, n_new, angle), lr = rows[p]
                name = names[i] if names is not None else f"group{gi}.param{i}"
                out[f"{name}/view"] = view
                out[f"{name}/weight_norm"] = n_new
                out[f"{name}/angular_update"] = angle
                out[f"{name}/lr_over_norm_sq"] = lr / n_old**2 if n_old != 0 else math.inf
                if projection.projectable(p):
                    projected = view > 0
                    counts[0] += projected
                    counts[1] += 1
                    counts[2] += projected * p.numel()
                    counts[3] += p.numel()
        for names, numels, lr, table in other:  # DeepSpeed ZeRO partitions: the weights, by name
            lr_f = float(lr.item()) if isinstance(lr, Tensor) else lr
            for name, numel, (view, n_old, n_new, angle) in zip(names, numels, table.tolist(), strict=True):
                out[f"{name}/view"] = view
                out[f"{name}/weight_norm"] = n_new
                out[f"{name}/angular_update"] = angle
                out[f"{name}/lr_over_norm_sq"] = lr_f / n_old**2 if n_old != 0 else math.inf
                projected = view > 0
                counts[0] += projected
                counts[1] += 1
                counts[2] += projected * numel
                counts[3] += numel
        out["projected_fraction"] = counts[0] / counts[1] if counts[1] else 0.0
        out["projected_numel_fraction"] = counts[2] / counts[3] if counts[3] else 0.0
        return out
