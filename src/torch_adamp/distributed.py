"""Sharded parameters: FSDP2 / DTensor support, and the refusal of flat shards.

AdamP and SGDP need, per weight, quantities of the *whole* tensor: the cosine
test of the channel view is per row, but the layer view and "does any row
fail" are global. Under FSDP2 (``torch.distributed.fsdp.fully_shard``) the
parameters, gradients and optimizer states are DTensors placed ``Shard(d)``:

* the math runs on the local shards (``to_local()`` views, so every in-place
  update lands in the sharded storage; no DTensor op, no hidden collective);
* thresholds use the global shapes (DTensor ``.shape``);
* the global sums the decision and the layer-view projection need are packed,
  for all parameters together, into ONE tensor and summed with ONE
  ``all_reduce`` over the process group of the mesh dimension the parameters
  are sharded on (with HSDP, the shard group only, never the replicate group).
  See :class:`torch_adamp.projection.RowDecision` for the packing. A step runs
  in two phases (the stage 1 / reduce / stage 2 shape of apex's distributed
  LAMB): the row sums of every parameter group, then :func:`reduce` of all of
  them in that one collective, then the decisions and updates.

With ``Shard(0)`` rows are whole on one rank; with ``Shard(d >= 1)`` rows are
split and their partial sums are reduced as well (4 numbers per row).
Parameters that are whole on every rank (plain tensors, ``Replicate``
DTensors, a mesh dimension of size 1) keep their local numbers: they take no
part in the sum even when they share the packed tensor.

Flat 1-D shards (FSDP1 ``FlatParameter``, FSDP1 ``use_orig_params=True``
sharded views) hide the weight's shape, so the projection could never apply
and AdamP would silently become AdamW: they are refused with
:class:`FlatParameterError`, unless their group sets ``scale_invariant=False``
(no projection wanted). DeepSpeed ZeRO's flat partitions carry no marker; they
are recognised as replacing the optimizer's own parameters, and supported, in
:mod:`torch_adamp.zero`.
"""

from __future__ import annotations

import itertools
import math
import operator
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from .engine import precision
from .projection import RowDecision, projectable

__all__ = [
    "FlatParameterError",
    "ShardedStep",
    "check_flat",
    "finish",
    "is_dtensor",
    "localize",
    "norm_stats",
    "reduce",
]


class FlatParameterError(ValueError):
    """A parameter is a flat 1-D shard whose original shape the optimizer cannot see."""


# -- DTensor, looked up lazily: importing torch.distributed.tensor costs seconds, and
#    no DTensor can exist before something else imported it
def _dtensor_api() -> Any:
    return sys.modules.get("torch.distributed.tensor._api")


def is_dtensor(t: object) -> bool:
    api = _dtensor_api()
    return api is not None and isinstance(t, api.DTensor)


# -- flat shards ---------------------------------------------------------------------
def _is_flat(p: Tensor) -> bool:
    """FSDP1 marks its ``FlatParameter`` and the original parameters it flattened (instance attributes: read
    from ``__dict__``, without the exception a missing ``getattr`` costs at every step)."""
    if p.dim() >= 2:
        return False
    marks = p.__dict__
    return bool(marks) and bool(marks.get("_fsdp_flattened") or marks.get("_is_flat_param"))


_DICT = operator.attrgetter("__dict__")


def _any_marked(params: Sequence[Tensor]) -> bool:
    """Whether FSDP1 marked any of ``params`` (in C-level passes: the common answer, no, costs little)."""
    return any(map(dict.get, map(_DICT, params), itertools.repeat("_fsdp_flattened"))) or any(
        map(dict.get, map(_DICT, params), itertools.repeat("_is_flat_param"))
    )


def _is_flat_traced(p: Tensor) -> bool:
    """:func:`_is_flat` as dynamo traces it (not ``__dict__``; ``getattr`` with a default, without raising)."""
    return p.dim() < 2 and bool(getattr(p, "_fsdp_flattened", False) or getattr(p, "_is_flat_param", False))


def _flat_message(what: str, p: Tensor, optimizer: str) -> str:
    fqns = getattr(p, "_fqns", None)
    if fqns:
        shown = ", ".join(repr(f) for f in fqns[:6]) + (", ..." if len(fqns) > 6 else "")
        what = f"{what} (an FSDP1 FlatParameter holding {shown})"
    return (
        f"{what} is a flat 1-D shard (FSDP1, or another wrapper that flattens parameters): {optimizer} cannot see "
        "the weight's shape, so the scale-invariance test and the projection could never apply and it would "
        "silently behave like AdamW/SGD. Use FSDP2 (torch.distributed.fsdp.fully_shard), whose DTensor "
        f"parameters {optimizer} supports exactly, or DDP / ZeroRedundancyOptimizer. If you do not want the "
        "projection for these parameters, put them in a parameter group with scale_invariant=False."
    )


def check_flat(
    group: dict[str, Any], params: Sequence[Any], describe: Callable[[int, Tensor], str], optimizer: str
) -> None:
    """Raise :class:`FlatParameterError` for a flat shard in a group that wants the projection.

    ``params`` may hold ``(name, tensor)`` pairs; ``describe(i, p)`` names
    parameter ``i`` of the group in the message.
    """
    if group.get("scale_invariant") is False:
        return
    flat = _is_flat_traced if torch.compiler.is_compiling() else _is_flat
    for i, p in enumerate(params):
        name, p = p if isinstance(p, tuple) else (None, p)
        if isinstance(p, Tensor) and flat(p):
            what = f"parameter {name!r}" if name is not None else describe(i, p)
            raise FlatParameterError(_flat_message(what, p, optimizer))


# -- layouts ---------------------------------------------------------------------------
@dataclass(frozen=True)
class _Layout:
    shape: tuple[int, ...]  # global shape
    rows_split: bool  # rows of the channel view split across ranks (Shard(d >= 1))
    group: Any  # process group to sum over; None when the tensor is whole on this rank


def _layout(p: Tensor, project: bool, what: Callable[[], str]) -> _Layout:
    shape = tuple(p.shape)
    if not is_dtensor(p):
        return _Layout(shape, False, None)
    mesh = p.device_mesh  # type: ignore[attr-defined]
    sharded = [(d, pl) for d, pl in enumerate(p.placements) if not pl.is_replicate() and mesh.size(d) > 1]  # type: ignore[attr-defined]
    if not sharded or not project:
        return _Layout(shape, False, None)
    from torch.distributed.tensor import Shard

    d, pl = sharded[0]
    if len(sharded) > 1 or type(pl) is not Shard:
        raise NotImplementedError(
            f"{what()} is a DTensor with placements {tuple(p.placements)} on mesh {mesh}: torch_adamp supports "  # type: ignore[attr-defined]
            "DTensor parameters sharded with Shard(d) on one mesh dimension (FSDP2, HSDP) and replicated on the "
            "others; for a projected weight, sharding over several mesh dimensions (e.g. FSDP2 + tensor "
            "parallelism) or Partial placements are not supported yet. Use scale_invariant=False for it."
        )
    return _Layout(shape, pl.dim % len(shape) >= 1, mesh.get_group(d))


def sum_layout(p: Tensor, what: Callable[[], str]) -> _Layout:
    """The layout of a tensor whose sums over *all* its elements are wanted (OrthoGrad's per-tensor sums): one
    row of its whole number of elements, summed over its shard group where it is sharded (any dimension, 1-D
    tensors included: a sum over every element is complete once the ranks' sums are added)."""
    lay = _layout(p, True, what)
    return _Layout((1, max(1, p.numel())), False, lay.group)


def _projects(p: Tensor, mode: Any) -> bool:
    return mode is not False and projectable(p.shape)


# -- the helper the multi-tensor path talks to ------------------------------------------
class ShardedStep:
    """The ``dist`` object of the multi-tensor path (:func:`torch_adamp.engine.begin`) for one group step.

    It answers for the local tensors handed to the math: their layouts (global shapes, whether their rows
    are split, the group to reduce over), which :func:`reduce` reads from the decisions made on them.
    Lists may hold the local tensors themselves or float32 copies of a whole device/dtype bucket
    (half-precision parameters).
    """

    def __init__(self, locals_: Sequence[Tensor], layouts: Sequence[_Layout]) -> None:
        self._locals = list(locals_)
        self._layouts = list(layouts)
        self._known: dict[int, tuple[Tensor, _Layout]] = {
            id(t): (t, lay) for t, lay in zip(self._locals, self._layouts, strict=True)
        }

    def _find(self, tensors: Sequence[Tensor]) -> list[_Layout]:
        out = []
        for t in tensors:
            hit = self._known.get(id(t))
            if hit is None or hit[0] is not t:
                return self._find_bucket(tensors)
            out.append(hit[1])
        return out

    def _find_bucket(self, tensors: Sequence[Tensor]) -> list[_Layout]:
        # upcast copies: the tensors are, in order, one device/dtype bucket of the local params
        key = (tensors[0].device, precision.compute_dtype(tensors[0].dtype))
        bucket = [
            (t, lay)
            for t, lay in zip(self._locals, self._layouts, strict=True)
            if (t.device, precision.compute_dtype(t.dtype)) == key
        ]
        if len(bucket) != len(tensors) or any(b[0].shape != t.shape for b, t in zip(bucket, tensors, strict=True)):
            raise RuntimeError(
                "torch_adamp internal error: a sharded step was given tensors that are neither the local shards "
                "nor a whole device/dtype bucket of them"
            )
        for t, (_, lay) in zip(tensors, bucket, strict=True):
            self._known[id(t)] = (t, lay)
        return [lay for _, lay in bucket]

    def layouts(self, tensors: Sequence[Tensor]) -> list[_Layout]:
        """Per tensor (local shards, or float32 copies of a whole bucket of them): its global shape, whether
        its rows are split across ranks, and the process group its sums are reduced over."""
        return self._find(tensors)


class Waiting(Protocol):
    """A step between its two phases: its :attr:`decision` (``None``: nothing to sum), then :meth:`finish`."""

    @property
    def decision(self) -> RowDecision | None: ...

    def finish(self) -> None: ...


def finish(waiting: Sequence[Waiting]) -> None:
    """Phase 2 of a sharded step: the packed sums of every step waiting for them (every bucket of every
    parameter group) in one collective (:func:`reduce`), then each step's decision and update."""
    reduce([s.decision for s in waiting if s.decision is not None])
    for s in waiting:
        s.finish()


def reduce(decisions: Sequence[RowDecision]) -> None:
    """Sum the packed totals of these decisions (phase 1 of every bucket of every parameter group of one step,
    made on sharded tensors) over their shard group: one ``all_reduce`` for all of them.

    Tensors whole on this rank (plain tensors, ``Replicate``, a mesh dimension of size 1) keep their own
    numbers: they send zeros and get them back. Nothing is sent when no tensor is sharded (the same on
    every rank, so no rank calls a collective)."""
    decisions = [d for d in decisions if d.layouts is not None]  # None: whole tensors, never sharded
    groups = {id(lay.group): lay.group for d in decisions for lay in d.layouts if lay.group is not None}
    if not groups:
        return
    if len(groups) > 1:
        raise NotImplementedError(
            "the parameters of one optimizer step are sharded over different process groups; torch_adamp "
            "reduces over one shard group per step (put parameters of different meshes in different optimizers)"
        )
    (group,) = groups.values()
    parts: list[tuple[Tensor, tuple[Tensor, Tensor] | None]] = []  # (packed, (whole-tensor mask, saved head))
    for d in decisions:
        layouts: list[_Layout] = d.layouts
        whole = [lay.group is None for lay in layouts]
        if all(whole):
            continue  # nothing of it is sharded: it keeps its own numbers
        n = len(layouts)
        expected = 5 * n + 4 * sum(lay.shape[0] for lay in layouts if lay.rows_split)
        if d.packed.dim() != 1 or d.packed.numel() != expected:
            raise RuntimeError(
                f"torch_adamp internal error: packed tensor of {d.packed.numel()} numbers, expected {expected}"
            )
        if any(whole):
            head = d.packed[: 5 * n].view(n, 5)
            mask = torch.tensor(whole, device=head.device).unsqueeze(1)
            parts.append((d.packed, (mask, head.clone())))
            head.masked_fill_(mask, 0)
        else:
            parts.append((d.packed, None))
    _merged_all_reduce([p for p, _ in parts], group)
    for packed, kept in parts:
        if kept is not None:
            mask, saved = kept
            n = mask.shape[0]
            head = packed[: 5 * n].view(n, 5)
            head.copy_(torch.where(mask, saved, head))


def localize(
    group: dict[str, Any],
    params: Sequence[Tensor],
    *lists: Sequence[Tensor | None],
    describe: Callable[[int, Tensor], str],
    optimizer: str,
) -> tuple[ShardedStep | None, list[list[Any]]]:
    """Prepare one group step: refuse flat shards, and turn DTensors into their local shards.

    ``params`` are the group's parameters that have a gradient, ``lists``
    per-parameter lists (gradients, optimizer states). Returns ``(dist,
    [params, *lists])``: ``dist`` is ``None`` (and the lists unchanged) when no
    parameter is a DTensor. A gradient or state whose placements differ from
    its parameter's is redistributed to them first.
    """
    mode = group.get("scale_invariant")
    api = _dtensor_api()
    any_dtensor = api is not None and any(map(isinstance, params, itertools.repeat(api.DTensor)))
    compiling = torch.compiler.is_compiling()
    if mode is not False and (compiling or _any_marked(params)):  # FSDP1's flat shards: refused (see below)
        flat = _is_flat_traced if compiling else _is_flat
        for i, p in enumerate(params):
            if flat(p) and not (any_dtensor and isinstance(p, api.DTensor)):
                raise FlatParameterError(_flat_message(describe(_index_in(group, p, i), p), p, optimizer))
    if not any_dtensor:
        return None, [list(params), *(list(lst) for lst in lists)]
    dtensor = api.DTensor
    out: list[list[Any]] = [[] for _ in range(1 + len(lists))]
    layouts = []
    for i, p in enumerate(params):

        def what(i: int = i, p: Tensor = p) -> str:
            return describe(_index_in(group, p, i), p)

        if isinstance(p, dtensor):
            local = p.to_local()
            layouts.append(_layout(p, _projects(p, mode), what))
            mesh, placements = p.device_mesh, p.placements
        else:
            local = p
            layouts.append(_Layout(tuple(p.shape), False, None))
            mesh = placements = None
        out[0].append(local)
        for k, lst in enumerate(lists):
            t = lst[i]
            if isinstance(t, dtensor):
                if mesh is None:
                    raise ValueError(f"{what()} is a plain tensor, but one of its gradients/states is a DTensor")
                same_mesh = t.device_mesh is mesh or t.device_mesh == mesh
                if t.dim() > 0 and not (same_mesh and t.placements == placements):
                    t = t.redistribute(mesh, placements)
                t = t.to_local()
            elif t is not None and mesh is not None and t.dim() > 0 and t.shape != local.shape:
                raise ValueError(
                    f"{what()} is a DTensor with local shape {tuple(local.shape)}, but one of its gradients/states "
                    f"is a plain tensor of shape {tuple(t.shape)}; load optimizer states of sharded models with "
                    "torch.distributed.checkpoint.state_dict.set_optimizer_state_dict"
                )
            out[k + 1].append(t)
    return ShardedStep(out[0], layouts), out


def _index_in(group: dict[str, Any], p: Tensor, default: int) -> int:
    return next((k for k, q in enumerate(group["params"]) if q is p), default)


# -- statistics (track_stats) of sharded parameters ---------------------------------------
def norm_stats(new: Sequence[Tensor], old: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """``(||old||, ||new||, angle(old, new))`` per parameter, from local shards and one ``all_reduce``.

    With ``d = new - old`` the sums ``B = ||old||^2``, ``C = <d, old>``,
    ``D = ||d||^2`` are reduced over the shard group; then ``A = ||new||^2 = B +
    2C + D`` and the chord ``|new/a - old/b|`` (``a = sqrt A``, ``b = sqrt B``)
    is ``sqrt(D + 2C (b - a) / b + (b - a)^2) / a`` with ``b - a = -(2C + D) /
    (a + b)``. The sums are taken in float64 from float64 copies (one tensor at
    a time), so the cancellation in the chord of a nearly radial step costs
    nothing measurable.
    """
    layouts = [_layout(p, True, lambda: "a tracked parameter") for p in new]
    rows = []
    for t_new, t_old in zip(new, old, strict=True):
        o = (t_old.to_local() if is_dtensor(t_old) else t_old).double().reshape(-1)  # type: ignore[attr-defined]
        d = (t_new.to_local() if is_dtensor(t_new) else t_new).double().reshape(-1) - o  # type: ignore[attr-defined]
        rows.append(torch.stack([torch.dot(o, o), torch.dot(d, o), torch.dot(d, d)]))
    sums = torch.stack(rows)
    sharded = {id(lay.group): lay.group for lay in layouts if lay.group is not None}
    if sharded:
        if len(sharded) > 1:
            raise NotImplementedError("track_stats: tracked parameters are sharded over different process groups")
        mask = torch.tensor([lay.group is None for lay in layouts], device=sums.device).unsqueeze(1)
        saved = sums.clone()
        sums.masked_fill_(mask, 0)
        _all_reduce(sums, next(iter(sharded.values())))
        sums = torch.where(mask, saved, sums)
    b, a, angle = angle_from_sums(*sums.unbind(1))
    dtype = new[0].dtype
    return b.to(dtype), a.to(dtype), angle.to(dtype)


def angle_from_sums(b2: Tensor, c: Tensor, d2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(||old||, ||new||, angle(old, new))`` from ``B = ||old||^2``, ``C = <d, old>``, ``D = ||d||^2`` with
    ``d = new - old`` (see :func:`norm_stats`; float64 sums keep the chord of a tiny angle accurate)."""
    a2 = b2 + 2 * c + d2
    a, b = a2.sqrt(), b2.sqrt()
    b_minus_a = -(2 * c + d2) / (a + b)
    chord = (d2 + 2 * c * b_minus_a / b + b_minus_a.square()).clamp_min(0).sqrt() / a
    angle = torch.where((a > 0) & (b > 0), 2 * torch.asin((chord / 2).clamp(max=1.0)), math.nan)
    return b, a, angle


# -- the collective, and merging the requests of several parameter groups -------------------
def _all_reduce(packed: Tensor, group: Any) -> None:
    import torch.distributed as c10d

    c10d.all_reduce(packed, group=group)


def _merged_all_reduce(tensors: Sequence[Tensor], group: Any) -> None:
    """One ``all_reduce`` of these 1-D tensors over ``group`` per device and dtype: normally exactly one (a
    single tensor in place, several concatenated and copied back)."""
    buckets: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for t in tensors:
        buckets.setdefault((t.device, t.dtype), []).append(t)
    for bucket in buckets.values():
        if len(bucket) == 1:
            _all_reduce(bucket[0], group)
            continue
        flat = torch.cat(bucket)
        _all_reduce(flat, group)
        for t, part in zip(bucket, flat.split([t.numel() for t in bucket]), strict=True):
            t.copy_(part)
