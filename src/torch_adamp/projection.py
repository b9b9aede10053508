"""The projection shared by AdamP and SGDP: scale-invariance test + radial removal.

Heo et al., "AdamP: Slowing Down the Slowdown for Momentum Optimizers on
Scale-invariant Weights", ICLR 2021 (arXiv 2006.08217), Algorithms 1 and 2.

For a weight ``w`` with gradient ``g`` and update ``u``, and a *view* that
splits ``w`` into rows (``channel``: one row per output channel, ``w.reshape(
w.shape[0], -1)``; ``layer``: one row for the whole tensor)::

    cos_i  = |<g_i, w_i>| / (max(||g_i||, eps) * max(||w_i||, eps))
    w is scale-invariant in the view  iff  max_i cos_i < delta / sqrt(row length)
    proj(u)_i = u_i - <w_i / (||w_i|| + eps), u_i> * w_i / (||w_i|| + eps)

The channel view is tried first, then the layer view; the first that passes is
used and the weight decay of that weight is scaled by ``wd_ratio``. Tensors with
fewer than 2 dimensions are never projected.

Unlike every earlier implementation, the decision is taken **on the device**
(``torch.where`` on 0-d/row tensors), never with a Python ``if`` on a tensor:
no host-device synchronisation, no graph break under ``torch.compile``.

Two forms are provided:

* :func:`project_single` follows the reference package's operation order on one
  tensor, so it is bitwise identical to ``adamp==0.3.0`` for float ``lr``.
* :func:`projection_coefficients` works on a list of tensors at once: per-row
  sums are reduced per tensor, and the decision arithmetic for all rows of all
  tensors runs as a handful of batched kernels. It returns, per tensor, the
  per-row coefficient ``c`` such that ``proj(u) = u - c * w``, which lets the
  optimizers fold projection, weight decay and step into two passes. Its
  global quantities are sums, so a sharded caller can all-reduce them in one
  packed collective (see ``all_reduce``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .checks import ScaleInvariant

#: codes of the view a projection used (stored by ``track_stats``)
NONE, CHANNEL, LAYER = 0, 1, 2
VIEW_NAMES = {NONE: "none", CHANNEL: "channel", LAYER: "layer"}


def projectable(p: Tensor | Sequence[int]) -> bool:
    """Whether a tensor of this (global) shape can be projected: ndim >= 2 and no size-0 dimension."""
    shape = p.shape if isinstance(p, Tensor) else p
    return len(shape) > 1 and all(s > 0 for s in shape)


def _row_shape(p: Tensor) -> tuple[int, ...]:
    return (-1,) + (1,) * (p.dim() - 1)


def project_single(
    p: Tensor,
    grad: Tensor,
    update: Tensor,
    *,
    delta: float,
    eps: float,
    mode: ScaleInvariant = "auto",
) -> tuple[Tensor, Tensor]:
    """Project ``update`` **in place** for one tensor, in the reference's op order.

    Returns ``(update, view)`` where ``view`` is a 0-d int64 tensor holding
    :data:`NONE`, :data:`CHANNEL` or :data:`LAYER`. In-place matters: SGDP's
    reference semantics project the momentum buffer itself when the update
    aliases it.
    """
    if mode is False or not projectable(p):
        return update, torch.zeros((), dtype=torch.long, device=p.device)
    rows = p.shape[0]
    if mode == "auto":
        # channel view, then layer view (argument order as in the reference)
        cos_c = F.cosine_similarity(grad.reshape(rows, -1), p.reshape(rows, -1), dim=1, eps=eps).abs()
        channel = cos_c.max() < delta / math.sqrt(p.numel() // rows)
        cos_l = F.cosine_similarity(grad.reshape(1, -1), p.reshape(1, -1), dim=1, eps=eps).abs()
        layer = cos_l.max() < delta / math.sqrt(p.numel())
    else:
        channel = torch.tensor(mode == "channel", device=p.device)
        layer = torch.tensor(mode == "layer", device=p.device)
    expand = _row_shape(p)
    norm_c = p.reshape(rows, -1).norm(dim=1).view(expand)
    norm_l = p.reshape(1, -1).norm(dim=1).view(expand)
    # the unused branch gets norm 1 so that p_n stays finite when eps == 0
    norm = torch.where(channel, norm_c, torch.where(layer, norm_l, torch.ones_like(norm_l)))
    p_n = p / (norm + eps)
    prod = p_n * update
    coef_c = prod.reshape(rows, -1).sum(dim=1).view(expand)
    coef_l = prod.reshape(1, -1).sum(dim=1).view(expand)
    coef = torch.where(channel, coef_c, torch.where(layer, coef_l, torch.zeros_like(coef_l)))
    update.sub_(p_n * coef)  # subtracting an exact 0 leaves ``update`` bitwise unchanged
    view = torch.where(channel, CHANNEL, torch.where(layer, LAYER, NONE))
    return update, view


def cautious(p: Tensor, grad: Tensor, update: Tensor, view: Tensor, *, eps: float) -> Tensor:
    """timm's cautious update (``caution=True`` of its AdamP/SGDP), **in place** on ``update``.

    After the projection, with ``view`` the decision taken (:data:`NONE`,
    :data:`CHANNEL`, :data:`LAYER`; a 0-d tensor) and ``p_n = w / (||w|| + eps)``
    in that view: where projected, the gradient's tangent part
    ``g_t = g - p_n <p_n, g>`` is the reference, else ``g`` itself; the mask
    ``m = [u * g_ref > 0] / max(mean(m), 1e-3)`` (mean over the whole tensor)
    multiplies ``u``, and, where projected, ``u`` is projected once more
    (timm's "numerical stability" step). Decisions stay on the device.
    """
    if not projectable(p):
        mask = (update * grad > 0).to(grad.dtype)
        mask.div_(mask.mean().clamp_(min=1e-3))
        return update.mul_(mask)
    rows, expand = p.shape[0], _row_shape(p)
    channel, projected = view == CHANNEL, view > 0
    norm_c = p.reshape(rows, -1).norm(dim=1).view(expand)
    norm_l = p.reshape(1, -1).norm(dim=1).view(expand)
    p_n = p / (torch.where(channel, norm_c, torch.where(projected, norm_l, torch.ones_like(norm_l))) + eps)

    def radial(x: Tensor) -> Tensor:
        prod = p_n * x
        c = torch.where(
            channel, prod.reshape(rows, -1).sum(dim=1).view(expand), prod.reshape(1, -1).sum(dim=1).view(expand)
        )
        return p_n * torch.where(projected, c, torch.zeros_like(c))

    mask = (update * (grad - radial(grad)) > 0).to(grad.dtype)
    mask.div_(mask.mean().clamp_(min=1e-3))
    update.mul_(mask)
    return update.sub_(radial(update))


AllReduce = Callable[[Tensor], None]


def projection_coefficients(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    updates: Sequence[Tensor],
    *,
    delta: float,
    eps: float,
    mode: ScaleInvariant = "auto",
    global_shapes: Sequence[Sequence[int]] | None = None,
    rows_split: Sequence[bool] | None = None,
    all_reduce: AllReduce | None = None,
) -> tuple[list[Tensor], Tensor, Tensor]:
    """Batched scale-invariance decision for projectable tensors.

    All tensors must be projectable (see :func:`projectable`), on one device,
    with one dtype. Returns ``(coefs, view, sq_norms)``:

    * ``coefs[i]`` has shape ``(rows_i, 1, ..., 1)``; the projected update is
      ``updates[i] - coefs[i] * params[i]`` (zero rows where not projected);
    * ``view`` is an int64 tensor of shape ``(n,)`` with the view codes;
    * ``sq_norms`` is ``(total_rows, 2)``: per row ``||w_i||^2`` and
      ``<w_i, u_i>`` (used by the optional statistics).

    Sharded use (FSDP2): ``params`` etc. are local shards, ``global_shapes`` the
    full shapes (thresholds depend on them), ``rows_split[i]`` says whether the
    rows of tensor ``i`` are themselves split across ranks (``Shard(d>=1)``),
    and ``all_reduce`` sums a 1-D tensor in place over the shard group. It is
    called exactly once, on one packed tensor (:attr:`RowDecision.packed`),
    whatever the number of tensors.
    """
    decision = RowDecision(
        channel_row_sums(params, grads, updates),
        [p.shape for p in params] if global_shapes is None else global_shapes,
        delta=delta,
        eps=eps,
        mode=mode,
        local_rows=[p.shape[0] for p in params],
        rows_split=rows_split,
    )
    if all_reduce is not None:
        all_reduce(decision.packed)
    return decision.coefficients()


def channel_row_sums(params: Sequence[Tensor], grads: Sequence[Tensor], updates: Sequence[Tensor]) -> Tensor:
    """Per row (channel view) of every tensor, rows of all tensors in order: ``<w,g>, ||w||^2, ||g||^2,
    <w,u>`` as a ``(total rows, 4)`` tensor (the first step of :func:`projection_coefficients`)."""
    rows = [p.shape[0] for p in params]  # local rows
    row_len = [math.prod(p.shape[1:]) for p in params]  # local row length
    flat_p = [p.reshape(r, d) for p, r, d in zip(params, rows, row_len, strict=True)]
    flat_g = [g.reshape(r, d) for g, r, d in zip(grads, rows, row_len, strict=True)]
    flat_u = [u.reshape(r, d) for u, r, d in zip(updates, rows, row_len, strict=True)]

    # per-row sums: <p,g>, ||p||^2, ||g||^2, <p,u>   -> (total_rows, 4)
    p_norm = torch.cat([torch.linalg.vector_norm(x, dim=1) for x in flat_p])
    g_norm = torch.cat([torch.linalg.vector_norm(x, dim=1) for x in flat_g])
    pg = torch.cat([torch.linalg.vecdot(x, y, dim=1) for x, y in zip(flat_p, flat_g, strict=True)])
    pu = torch.cat([torch.linalg.vecdot(x, y, dim=1) for x, y in zip(flat_p, flat_u, strict=True)])
    return torch.stack([pg, p_norm * p_norm, g_norm * g_norm, pu], dim=1)


class RowDecision:
    """The decision of a list of projectable tensors from their row sums, in two phases around the one
    collective a sharded step makes (the stage 1 / reduce / stage 2 shape of apex's distributed LAMB).

    ``row_sums`` is ``(total rows, 4)``: per row (channel view, rows of all tensors in order) ``<w,g>``,
    ``||w||^2``, ``||g||^2``, ``<w,u>`` (:func:`channel_row_sums`, or the native kernel's); ``shapes`` are
    the whole tensors' shapes (thresholds depend on them) and ``local_rows`` the rows of each held here
    when they are shards (default: all of them).

    Phase 1 (the constructor) computes per tensor the totals the decision needs; :attr:`packed` is what a
    sharded caller must sum over its shard group, in place, before phase 2 (:meth:`coefficients`): first 5
    numbers per tensor (channel-test failures, ``<w,g>``, ``||w||^2``, ``||g||^2``, ``<w,u>``), then, only
    where ``rows_split[i]`` (rows themselves split across ranks, ``Shard(d >= 1)``), the 4 row sums of every
    row of those tensors. A caller with whole tensors skips the reduction; :attr:`layouts` is left to the
    caller (the sharded step keeps there what it needs to know which tensors take part in the sum).
    """

    def __init__(
        self,
        row_sums: Tensor,
        shapes: Sequence[Sequence[int]],
        *,
        delta: float,
        eps: float,
        mode: ScaleInvariant = "auto",
        local_rows: Sequence[int] | None = None,
        rows_split: Sequence[bool] | None = None,
    ) -> None:
        self.rows = list(local_rows) if local_rows is not None else [s[0] for s in shapes]
        self.ndims = [len(s) for s in shapes]
        self.eps, self.mode, self.n = eps, mode, len(self.rows)
        dtype, device = row_sums.dtype, row_sums.device
        self.seg, self.chan_thr, self.layer_thr = _segments(self.rows, shapes, delta, dtype, device)
        self.split = list(rows_split) if rows_split is not None and any(rows_split) else None
        self.row_sums = row_sums
        # per tensor: [#rows failing the channel test, sum <p,g>, sum ||p||^2, sum ||g||^2, sum <p,u>]
        self.totals = _totals(row_sums, self.seg, self.n, self.chan_thr, eps)
        if self.split is None:
            self.packed = self.totals.view(-1)
        else:
            self.split_rows = torch.tensor(self.split, device=device)[self.seg]
            self.packed = torch.cat([self.totals.flatten(), row_sums[self.split_rows].flatten()])
        self.layouts: Any = None

    def finish(self) -> tuple[Tensor, Tensor, Tensor]:
        """Phase 2: ``(coef per row, view per tensor, row sums)`` from the (summed) :attr:`packed`; the row
        sums returned are those completed by the sum."""
        totals, row_sums = self.totals, self.row_sums
        if self.split is not None:
            n = self.n
            totals = self.packed[: 5 * n].view(n, 5)
            row_sums = row_sums.clone()
            row_sums[self.split_rows] = self.packed[5 * n :].view(-1, 4)
            split_totals = _totals(row_sums, self.seg, n, self.chan_thr, self.eps)
            split = torch.tensor(self.split, device=totals.device).unsqueeze(1)
            totals = torch.where(split, split_totals, totals)
        coef, view = _decide(row_sums, totals, self.seg, self.layer_thr, self.eps, self.mode)
        return coef, view, row_sums

    def coefficients(self) -> tuple[list[Tensor], Tensor, Tensor]:
        """Phase 2 as :func:`projection_coefficients` returns it: ``(coefs shaped (rows, 1, ...) per tensor,
        view, (total rows, 2) of ||w||^2 and <w,u>)``."""
        coef, view, row_sums = self.finish()
        coefs = [c.view((-1,) + (1,) * (d - 1)) for c, d in zip(coef.split(self.rows), self.ndims, strict=True)]
        return coefs, view, row_sums[:, [1, 3]]


def _segments(
    rows: Sequence[int], shapes: Sequence[Sequence[int]], delta: float, dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, Tensor, Tensor]:
    """Per row the index of its tensor; per tensor the channel and layer thresholds."""
    n = len(rows)
    counts = torch.tensor(rows, device=device)
    seg = torch.repeat_interleave(torch.arange(n, device=device), counts, output_size=sum(rows))
    chan_thr = torch.tensor([delta / math.sqrt(math.prod(s[1:])) for s in shapes], dtype=dtype, device=device)
    layer_thr = torch.tensor([delta / math.sqrt(math.prod(s)) for s in shapes], dtype=dtype, device=device)
    return seg, chan_thr, layer_thr


def _totals(row_sums: Tensor, seg: Tensor, n: int, chan_thr: Tensor, eps: float) -> Tensor:
    """Per tensor: [#rows failing the channel test, sum <p,g>, sum ||p||^2, sum ||g||^2, sum <p,u>]."""
    rs = row_sums
    cos = rs[:, 0].abs() / (rs[:, 2].sqrt().clamp_min(eps) * rs[:, 1].sqrt().clamp_min(eps))
    # NaN counts as a failure, and so does a squared norm that overflowed (its cosine would read 0,
    # and the projection would spread one huge element over the whole row)
    ok = (cos < chan_thr[seg]) & rs[:, 1].isfinite() & rs[:, 2].isfinite()
    per_row = torch.cat([(~ok).to(rs.dtype).unsqueeze(1), rs], dim=1)
    return torch.zeros(n, 5, dtype=rs.dtype, device=rs.device).index_add_(0, seg, per_row)


def _decide(
    row_sums: Tensor, totals: Tensor, seg: Tensor, layer_thr: Tensor, eps: float, mode: ScaleInvariant
) -> tuple[Tensor, Tensor]:
    """Per row the coefficient, per tensor the view, from the (global) row sums and totals."""
    n, device = totals.shape[0], totals.device
    if mode == "auto":
        channel = totals[:, 0] == 0
        cos_l = totals[:, 1].abs() / (totals[:, 3].sqrt().clamp_min(eps) * totals[:, 2].sqrt().clamp_min(eps))
        layer = (cos_l < layer_thr) & totals[:, 2].isfinite() & totals[:, 3].isfinite()
    else:
        channel = torch.full((n,), mode == "channel", device=device)
        layer = torch.full((n,), mode == "layer", device=device)
    view = torch.where(channel, CHANNEL, torch.where(layer, LAYER, NONE))

    coef_c = row_sums[:, 3] / (row_sums[:, 1].sqrt() + eps).square()
    coef_l = totals[:, 4] / (totals[:, 2].sqrt() + eps).square()
    coef = torch.where(channel[seg], coef_c, torch.where(layer[seg], coef_l[seg], torch.zeros_like(coef_c)))
    return coef, view
