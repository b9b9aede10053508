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
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

#: codes of the view a projection used (stored by ``track_stats``)
NONE, CHANNEL, LAYER = 0, 1, 2
VIEW_NAMES = {NONE: "none", CHANNEL: "channel", LAYER: "layer"}

ScaleInvariant = Literal["auto", "channel", "layer"] | bool
SCALE_INVARIANT_CHOICES = ("auto", "channel", "layer", False)


def check_scale_invariant(value: object) -> None:
    """Raise ``ValueError`` unless ``value`` is a valid ``scale_invariant`` option."""
    if value is True:  # spelled out: True == "auto" would be ambiguous
        raise ValueError(
            "Invalid scale_invariant value: True; use 'auto' (cosine test), "
            "'channel' or 'layer' (always project), or False (never project)"
        )
    if not any(value is c or (isinstance(value, str) and value == c) for c in SCALE_INVARIANT_CHOICES):
        raise ValueError(f"Invalid scale_invariant value: {value!r}; expected one of 'auto', 'channel', 'layer', False")


def projectable(p: Tensor, shape: Sequence[int] | None = None) -> bool:
    """Whether a tensor of this (global) shape can be projected: ndim >= 2 and non-empty."""
    shape = p.shape if shape is None else shape
    return len(shape) > 1 and math.prod(shape) > 0


def projectable_shape(shape: Sequence[int]) -> bool:
    """Whether a tensor of this shape can be projected: ndim >= 2 and no size-0 dimension."""
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
    called exactly once, on one packed tensor, whatever the number of tensors.
    The packed layout is part of the protocol (:mod:`torch_adamp.distributed`
    relies on it to keep whole, unsharded tensors out of the sum): first 5
    numbers per tensor, in order (channel-test failures, ``<p,g>``, ``||p||^2``,
    ``||g||^2``, ``<p,u>``), then, only if some ``rows_split[i]``, the 4 row
    sums of every row of those tensors, in order.
    """
    return coefficients_from_row_sums(
        params,
        channel_row_sums(params, grads, updates),
        delta=delta,
        eps=eps,
        mode=mode,
        global_shapes=global_shapes,
        rows_split=rows_split,
        all_reduce=all_reduce,
    )


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


def coefficients_from_row_sums(
    params: Sequence[Tensor],
    row_sums: Tensor,
    *,
    delta: float,
    eps: float,
    mode: ScaleInvariant = "auto",
    global_shapes: Sequence[Sequence[int]] | None = None,
    rows_split: Sequence[bool] | None = None,
    all_reduce: AllReduce | None = None,
) -> tuple[list[Tensor], Tensor, Tensor]:
    """:func:`projection_coefficients` from the row sums of :func:`channel_row_sums` (in the dtype and on the
    device of ``params``, of which only the shapes, device and dtype are read): the decisions, the one
    packed ``all_reduce`` and the coefficients, with the same protocol and results."""
    shapes = [tuple(p.shape) for p in params] if global_shapes is None else [tuple(s) for s in global_shapes]
    rows = [p.shape[0] for p in params]  # local rows
    coef, view, row_sums = _row_decision(
        row_sums, rows, shapes, delta, eps, mode, params[0].dtype, params[0].device, rows_split, all_reduce
    )
    coefs = [c.view(_row_shape(p)) for c, p in zip(coef.split(rows), params, strict=True)]
    return coefs, view, row_sums[:, [1, 3]]


def row_coefficients(
    row_sums: Tensor,
    shapes: Sequence[Sequence[int]],
    *,
    delta: float,
    eps: float,
    mode: ScaleInvariant = "auto",
) -> tuple[Tensor, Tensor]:
    """The decision and the per-row coefficients of :func:`projection_coefficients`, from complete row sums.

    ``row_sums`` is ``(total_rows, 4)``: per row of every tensor of ``shapes``
    (all projectable, rows in order), ``<p,g>``, ``||p||^2``, ``||g||^2`` and
    ``<p,u>`` of the **whole** row, e.g. partial sums of pieces already summed
    over the ranks that hold them (DeepSpeed ZeRO partitions). Returns
    ``(coef, view)``: ``coef`` of shape ``(total_rows,)``, with the projected
    update of row ``i`` being ``u_i - coef_i * w_i``, and ``view`` (``(n,)``,
    int64) the view code per tensor; the same arithmetic as
    :func:`projection_coefficients`.
    """
    rows = [s[0] for s in shapes]
    coef, view, _ = _row_decision(row_sums, rows, shapes, delta, eps, mode, row_sums.dtype, row_sums.device)
    return coef, view


def _row_decision(
    row_sums: Tensor,
    rows: Sequence[int],
    shapes: Sequence[Sequence[int]],
    delta: float,
    eps: float,
    mode: ScaleInvariant,
    dtype: torch.dtype,
    device: torch.device,
    rows_split: Sequence[bool] | None = None,
    all_reduce: AllReduce | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(coef per row, view per tensor, row sums)`` from local row sums: the totals, the one packed
    ``all_reduce`` of :func:`projection_coefficients` when given (the row sums returned are then those
    completed by it), and the decision."""
    n = len(rows)
    seg, chan_thr, layer_thr = _segments(rows, shapes, delta, dtype, device)
    split = list(rows_split) if rows_split is not None else [False] * n
    any_split = all_reduce is not None and any(split)
    if any_split:
        split_rows = torch.tensor(split, device=device)[seg]
    # per tensor: [#rows failing the channel test, sum <p,g>, sum ||p||^2, sum ||g||^2, sum <p,u>]
    totals = _totals(row_sums, seg, n, chan_thr, eps)
    if all_reduce is not None:
        if any_split:
            # one collective: whole-row tensors send their 5 totals, split-row
            # tensors their per-row partial sums
            packed = torch.cat([totals.flatten(), row_sums[split_rows].flatten()])
            all_reduce(packed)
            totals = packed[: 5 * n].view(n, 5)
            row_sums = row_sums.clone()
            row_sums[split_rows] = packed[5 * n :].view(-1, 4)
            split_totals = _totals(row_sums, seg, n, chan_thr, eps)
            totals = torch.where(torch.tensor(split, device=device).unsqueeze(1), split_totals, totals)
        else:
            all_reduce(totals.view(-1))
    coef, view = _decide(row_sums, totals, seg, layer_thr, eps, mode)
    return coef, view, row_sums


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
