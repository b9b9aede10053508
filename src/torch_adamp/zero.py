"""DeepSpeed ZeRO (stages 1, 2 and 3): exact AdamP/SGDP on flat fp32 partitions.

``deepspeed.initialize(model=..., optimizer=AdamP(model.parameters()), ...)``
replaces the parameters of each of the optimizer's groups by one flat 1-D
fp32 partition (stages 1 and 2, and the bf16 optimizer of stage 1) or by one
flat piece per sub-group (stage 3), and calls ``step()`` on those. The weight
shapes are gone from what the optimizer sees, but the model's parameters say
where their elements went:

* stages 1/2: ``p._hp_mapping`` (``None`` when this rank holds nothing of
  ``p``) with ``lp_fragment_address`` (start and length of the piece in the
  flattened ``p``) and ``hp_fragment_address`` (its start in this rank's
  partition); ``hp_fragment`` is a view of the partition; ``p._dp_group`` is
  the data-parallel group;
* stage 3: ``p._z3_optimizer.grad_position[id]`` gives ``(sub-group, offset,
  length)`` of ``p``'s piece in ``fp32_partitioned_groups_flat[sub-group]``;
  the piece is the ``rank``-th ``ceil(numel / world)`` slice of the flattened
  ``p`` (zero padding at the end).

The optimizer keeps the parameters it was built with (:class:`Groups`), and
at every step recognises a group whose parameters were substituted, finds
the layout from those attributes (:meth:`Groups.resolve`, cached) and steps the flat
partition in place (:func:`step`):

1. the rule's direction, elementwise, on the whole partition;
2. per weight that may be projected (ndim >= 2), its piece on this rank cut
   into at most three pieces: a partial first row, whole rows ``(k, L)`` and a
   partial last row; per row ``<w,g>``, ``||w||^2``, ``||g||^2``, ``<w,u>``
   of the piece, put at the row's place in a ``(rows of all weights of the
   group, 4)`` tensor, zeros elsewhere;
3. **one** ``all_reduce(SUM)`` of that tensor over the data-parallel group:
   every rank then holds the sums of every whole row (rows cut by a
   partition boundary are summed across the ranks holding their parts);
4. the decision and the per-row coefficients from those sums
   (:class:`torch_adamp.projection.RowDecision`, the arithmetic of the
   unsharded multi-tensor path), identical on every rank;
5. ``u <- u - c w`` on the pieces, decay by the view taken, step: the engine's tail
   (:func:`torch_adamp.engine.tail.apply`) with the pieces as its projected tensors.

Nothing is gathered and the partition is never copied; the added memory is
the ``4 x rows`` sums (and the layout: a few integers per piece). DeepSpeed
steps its parameter groups (and stage 3 its sub-groups) one at a time, so a
step issues one collective per group that holds a projectable weight (one
for the usual weights / no-decay split), and none for a group without one.

A substituted flat tensor whose layout cannot be recovered is refused with
:class:`torch_adamp.distributed.FlatParameterError`, unless the group sets
``scale_invariant=False``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from . import distributed, projection
from .distributed import FlatParameterError
from .engine import tail
from .engine.precision import upcast, write_back
from .rule import Options, Rule

__all__ = ["Groups", "Layout", "last_views", "step"]


@dataclass
class Layout:
    """Where the rows of a group's weights lie in one rank's flat partition."""

    shapes: list[tuple[int, ...]]  # projectable weights of the group, in group order (the same on every rank)
    pieces: list[tuple[int, int, int, int]]  # (start in the partition, rows, row length, weight index)
    rest: list[tuple[int, int]]  # (start, length) of the other elements (1-D params, padding)
    row_index: Tensor  # per row of the pieces, its row in the packed (total rows, 4) sums
    group: Any  # the data-parallel process group
    numel: int
    key: tuple[int, int]  # (data_ptr, numel) of the partition the layout was made for
    signature: tuple[int, ...]  # ids of the mapping objects it was made from
    names: list[str] = field(default_factory=list)  # of the weights, for last_views()
    views: Tensor | None = None  # the view codes the last step took, per weight (on the device)
    #: track_stats: per weight, its view, norms before and after the last step and the angle between them
    stats: Tensor | None = None
    stats_lr: float | Tensor = 0.0
    total_rows: int = field(init=False)

    def __post_init__(self) -> None:
        self.total_rows = sum(s[0] for s in self.shapes)


def _all_reduce(t: Tensor, group: Any) -> None:
    import torch.distributed as c10d

    c10d.all_reduce(t, group=group)


class Groups:
    """The parameters each group was built with, kept so that a ZeRO substitution can be recognised."""

    def __init__(self) -> None:
        self._groups: dict[int, tuple[dict[str, Any], list[Tensor], set[int]]] = {}
        self._layouts: dict[int, Layout] = {}

    def register(self, group: dict[str, Any]) -> None:
        params = [p for p in group["params"] if isinstance(p, Tensor)]
        self._groups[id(group)] = (group, params, {id(p) for p in params})

    def moved(self, old: Sequence[dict[str, Any]], new: Sequence[dict[str, Any]]) -> None:
        """``load_state_dict`` replaced the group dicts: carry the registrations over by position."""
        for o, n in zip(old, new, strict=True):
            entry = self._groups.pop(id(o), None)
            if entry is not None and entry[0] is o:
                self._groups[id(n)] = (n, entry[1], entry[2])
        self._layouts.clear()

    def substituted(self, group: dict[str, Any]) -> bool:
        """Whether a wrapper replaced the parameters ``group`` was built with (a ZeRO partition, say)."""
        entry = self._groups.get(id(group))
        return entry is not None and entry[0] is group and any(id(p) not in entry[2] for p in group["params"])

    def layouts(self) -> list[Layout]:
        """The layouts of the partitions stepped so far."""
        return list(self._layouts.values())

    def originals(self, group: dict[str, Any]) -> list[Tensor] | None:
        entry = self._groups.get(id(group))
        return entry[1] if entry is not None and entry[0] is group else None

    def resolve(
        self, group: dict[str, Any], params: Sequence[Tensor], describe: Callable[[int], str], optimizer: str
    ) -> Layout | None:
        """The ZeRO layout of a group step, or ``None`` when the group holds its own parameters.

        Also ``None`` when a substituted flat partition needs no projection
        (``scale_invariant=False``, or no weight of the group has 2 or more
        dimensions): it is then stepped elementwise, exactly. Raises
        :class:`FlatParameterError` for a substituted tensor whose layout
        cannot be recovered.
        """
        entry = self._groups.get(id(group))
        if entry is None or entry[0] is not group:
            return None
        _, originals, ids = entry
        if all(map(ids.__contains__, map(id, params))):  # the group's own parameters (one pass in C)
            return None
        foreign = [i for i, p in enumerate(params) if id(p) not in ids]
        if group.get("scale_invariant") is False:
            return None
        chosen = [i for i, p in enumerate(originals) if projection.projectable(_shape(p)) and p.requires_grad]
        weights = [originals[i] for i in chosen]
        if not weights:
            return None
        flat = params[foreign[0]]
        layout = None
        if len(params) == 1 and flat.dim() == 1:
            cached = self._layouts.get(id(flat))
            sig = _signature(weights)
            if cached is not None and cached.key == (flat.data_ptr(), flat.numel()) and cached.signature == sig:
                return cached
            layout = _layout(flat, weights, sig)
        if layout is None:
            raise FlatParameterError(_message(describe(foreign[0]), flat, optimizer))
        names = group.get("param_names")
        layout.names = [names[i] if names is not None else f"param{i}" for i in chosen]
        self._layouts[id(flat)] = layout
        return layout


def _shape(p: Tensor) -> tuple[int, ...]:
    ds_shape = getattr(p, "ds_shape", None)  # ZeRO-3 keeps an empty tensor in the module
    return tuple(ds_shape) if ds_shape is not None else tuple(p.shape)


def _signature(weights: Sequence[Tensor]) -> tuple[int, ...]:
    return tuple(id(getattr(p, "_hp_mapping", None) or getattr(p, "_z3_optimizer", None)) for p in weights)


def _message(what: str, flat: Tensor, optimizer: str) -> str:
    return (
        f"{what} is a flat {flat.dim()}-D tensor of {flat.numel()} elements that replaced the parameters this "
        f"{optimizer} was built with (a ZeRO partition, or another wrapper's flat buffer), and no layout of those "
        "parameters points into it (no DeepSpeed ZeRO-1/2 _hp_mapping or ZeRO-3 ds_tensor position): "
        f"{optimizer} cannot see the weights' rows, so the scale-invariance test and the projection could never "
        "apply and it would silently behave like AdamW/SGD. Supported: DeepSpeed ZeRO stages 1, 2 and 3 "
        f"(deepspeed.initialize with {'torch_adamp.AdamP or SGDP' if optimizer == 'Projected' else 'this optimizer'}"
        "), FSDP2 (torch.distributed.fsdp.fully_shard), DDP / "
        "ZeroRedundancyOptimizer. If you do not want the projection for these parameters, put them in a "
        "parameter group with scale_invariant=False."
    )


def _layout(flat: Tensor, weights: Sequence[Tensor], signature: tuple[int, ...]) -> Layout | None:
    """The layout from the weights' DeepSpeed attributes, or ``None`` when they do not describe ``flat``."""
    fragments: list[tuple[int, int, int, int]] = []  # (weight index, start in flattened weight, start in flat, numel)
    group = None
    if all(hasattr(p, "_hp_mapping") for p in weights):  # stages 1 and 2, bf16 optimizer
        size = flat.element_size()
        for i, p in enumerate(weights):
            m = getattr(p, "_hp_mapping", None)
            group = getattr(p, "_dp_group", group)
            if m is None:
                continue
            lp, hp = m.lp_fragment_address, m.hp_fragment_address
            if m.hp_fragment.data_ptr() != flat.data_ptr() + hp.start * size:
                continue  # a piece of another group's partition
            fragments.append((i, lp.start, hp.start, hp.numel))
        if group is None:
            return None
    elif all(hasattr(p, "ds_tensor") and hasattr(p, "_z3_optimizer") for p in weights):  # stage 3
        import torch.distributed as c10d

        for i, p in enumerate(weights):
            pa: Any = p
            z3 = pa._z3_optimizer
            group = z3.dp_process_group
            position = z3.grad_position.get(z3.get_param_id(p))
            if position is None:
                return None
            sub, offset, length = position
            if z3.fp32_partitioned_groups_flat[sub] is not flat:
                continue
            rank = c10d.get_rank(group=pa.ds_process_group)
            start = rank * length
            numel = max(0, min(length, pa.ds_numel - start))
            if numel:
                fragments.append((i, start, offset, numel))
    else:
        return None
    shapes = [_shape(p) for p in weights]
    pieces: list[tuple[int, int, int, int]] = []
    rows: list[Tensor] = []
    row_offset = [0, *torch.tensor([s[0] for s in shapes]).cumsum(0).tolist()]
    covered = []
    for i, a, f, n in fragments:
        shape = shapes[i]
        L = math.prod(shape[1:])
        if a < 0 or n < 0 or a + n > math.prod(shape) or f < 0 or f + n > flat.numel():
            return None
        covered.append((f, n))
        if a % L:  # a partial first row
            m = min(n, L - a % L)
            pieces.append((f, 1, m, i))
            rows.append(torch.tensor([row_offset[i] + a // L]))
            a, f, n = a + m, f + m, n - m
        if n >= L:  # whole rows
            k = n // L
            pieces.append((f, k, L, i))
            rows.append(torch.arange(row_offset[i] + a // L, row_offset[i] + a // L + k))
            a, f, n = a + k * L, f + k * L, n - k * L
        if n:  # a partial last row
            pieces.append((f, 1, n, i))
            rows.append(torch.tensor([row_offset[i] + a // L]))
    rest = []
    pos = 0
    for f, n in sorted(covered):
        if f < pos:
            return None  # overlapping pieces: not a layout we know
        if f > pos:
            rest.append((pos, f - pos))
        pos = f + n
    if pos < flat.numel():
        rest.append((pos, flat.numel() - pos))
    row_index = torch.cat(rows).to(flat.device) if rows else torch.zeros(0, dtype=torch.long, device=flat.device)
    return Layout(shapes, pieces, rest, row_index, group, flat.numel(), (flat.data_ptr(), flat.numel()), signature)


def _pieces(flat: Tensor, layout: Layout) -> list[Tensor]:
    """The pieces of the weights' rows in ``flat`` (or a tensor laid out like it), as ``(rows, row length)``."""
    return [flat.narrow(0, f, k * L).view(k, L) for f, k, L, _ in layout.pieces]


def _rest(flat: Tensor, layout: Layout) -> list[Tensor]:
    return [flat.narrow(0, f, n) for f, n in layout.rest]


def step(
    rule: Rule[Any],
    layout: Layout,
    param: Tensor,
    grad: Tensor,
    states: Sequence[Tensor],
    step_count: Tensor | None,
    o: Options,
    track_stats: bool = False,
) -> None:
    """One step of ``rule`` on a flat ZeRO partition ``param`` (updated in place, as are ``states``).

    ``track_stats``: per weight, the statistics of :class:`torch_adamp.stats.TrackStats` in ``layout.stats``,
    from one more column of row sums (``||u||^2``) in the same collective: the weight after the step is, per
    row, ``(f + s c) w - s u``, so its norm and its angle to ``w`` follow from ``||w||^2``, ``<w,u>`` and
    ``||u||^2`` (:func:`_stats`)."""
    if param.shape != grad.shape or param.dim() != 1:
        raise ValueError(f"a ZeRO partition of shape {tuple(param.shape)} has a gradient of shape {tuple(grad.shape)}")
    as_tensor = bool(o.capturable) or torch.compiler.is_compiling()
    w = upcast(param)
    g = upcast(grad)
    if o.maximize:
        g = -g
    S = [[upcast(s)] for s in states]
    U, step_size = rule.directions([w], [g], S, [step_count] if step_count is not None else None, o, as_tensor)
    u = U[0]
    W, G, Uw = _pieces(w, layout), _pieces(g, layout), _pieces(u, layout)
    # per-row partial sums of the pieces, at their rows of the packed (total rows, 4 or 5) tensor
    sums = torch.zeros(layout.total_rows, 5 if track_stats else 4, dtype=w.dtype, device=w.device)
    if W:
        part = projection.channel_row_sums(W, G, Uw)
        if track_stats:  # ||u||^2 per row: the statistics' one more column
            uu = torch.cat([torch.linalg.vector_norm(x, dim=1) ** 2 for x in Uw])
            part = torch.cat([part, uu.unsqueeze(1)], 1)
        sums.index_add_(0, layout.row_index, part)
    _all_reduce(sums.view(-1), layout.group)  # the step's one collective: every row's sums complete
    decision = projection.RowDecision(sums[:, :4], layout.shapes, delta=o.delta, eps=o.eps, mode=o.scale_invariant)
    coef, view, _ = decision.finish()
    layout.views = view
    layout.stats = _stats(sums, coef, view, layout, o, rule.wd_divisor(o), step_size) if track_stats else None
    layout.stats_lr = o.lr.detach().clone() if isinstance(o.lr, Tensor) else float(o.lr)
    weight_of_piece = [i for _, _, _, i in layout.pieces]
    C = [c.view(-1, 1) for c in coef[layout.row_index].split([k for _, k, _, _ in layout.pieces])]
    # the pieces are the projectable tensors (their weight's view and coefficients), the rest is not
    tail.apply(
        W + _rest(w, layout),
        G + _rest(g, layout),
        Uw + _rest(u, layout),
        step_size,
        o,
        proj_idx=range(len(W)),
        coefs=C,
        view=view[weight_of_piece] if W else None,
        wd_divisor=rule.wd_divisor(o),
        direction_is_state=rule.direction_is_state(o),
    )
    write_back([param, *states], [w, *(s[0] for s in S)])


def _stats(
    sums: Tensor, coef: Tensor, view: Tensor, layout: Layout, o: Options, divisor: float, step_size: Any
) -> Tensor:
    """Per weight ``[view, ||w||, ||w'||, angle(w, w')]`` from the complete row sums (``||w||^2``, ``<w,u>``,
    ``||u||^2`` in columns 1, 3, 4) of the step ``w' = f w - s (u - c w)``: per row ``d = w' - w = k w - s u``
    with ``k = f + s c - 1``, so ``<d,w> = k ||w||^2 - s <w,u>`` and ``||d||^2 = k^2 ||w||^2 - 2 k s <w,u> +
    s^2 ||u||^2``, summed per weight in float64 (:func:`torch_adamp.distributed.angle_from_sums`)."""
    rows = torch.tensor([s[0] for s in layout.shapes], device=sums.device)
    seg = torch.repeat_interleave(torch.arange(len(layout.shapes), device=sums.device), rows)
    f = tail.decay_factor(view, sums, o.lr, *tail.decay_terms(o), divisor).double()
    s = step_size.double() if isinstance(step_size, Tensor) else float(step_size)
    ww, wu, uu = sums[:, 1].double(), sums[:, 3].double(), sums[:, 4].double()
    k = f[seg] + s * coef.double() - 1
    per_row = torch.stack([ww, k * ww - s * wu, k * k * ww - 2 * k * s * wu + s * s * uu], 1)
    per_weight = torch.zeros(len(layout.shapes), 3, dtype=torch.float64, device=sums.device).index_add_(0, seg, per_row)
    n_old, n_new, angle = distributed.angle_from_sums(*per_weight.unbind(1))
    return torch.stack([view.double(), n_old, n_new, angle], 1).to(sums.dtype)


def last_views(optimizer: Any) -> dict[str, str]:
    """The view (``"none"``, ``"channel"``, ``"layer"``) each weight took at the last ZeRO step of ``optimizer``.

    Keys are the parameter names when the optimizer was given
    ``named_parameters()``, else ``param<i>`` (index in its group). Covers the
    weights (ndim >= 2) of the groups DeepSpeed substituted, the same on every
    rank. One host sync; meant for logging, not for the training loop.
    """
    out: dict[str, str] = {}
    for layout in getattr(optimizer, "_zero", Groups())._layouts.values():
        if layout.views is not None:
            out.update(zip(layout.names, (projection.VIEW_NAMES[v] for v in layout.views.tolist()), strict=True))
    return out
