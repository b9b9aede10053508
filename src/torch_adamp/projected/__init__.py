"""``Projected(inner)``: the paper's projection around any ``torch.optim.Optimizer``.

Heo et al. (ICLR 2021) argue for every momentum optimizer: on a scale-invariant
weight the radial component of the update only inflates ``||w||`` and so decays
the effective step size; removing it is the remedy. :class:`Projected` applies it
to the whole update of an optimizer it wraps (AdamW, Adafactor, RAdam, NAdam,
8-bit AdamW, Lion, ...), with the same decision and projection as AdamP.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from .. import checks, distributed, projection, zero
from ..engine import precision
from ..engine import tail as engine_tail
from ..rule import Scaling
from ..stats import TrackStats, reused_copies
from . import native
from .wrapper import Wrapper

__all__ = ["Projected"]


def _describe_at(group: dict[str, Any], params: Sequence[Tensor], i: int) -> str:
    return checks.describe(group, i, params[i])


def _refuse_sparse(group: dict[str, Any], candidates: Sequence[Tensor]) -> None:
    """The error for a candidate of ``group`` with a sparse gradient (the projection needs dense rows)."""
    p = next(p for p in candidates if p.grad is not None and p.grad.is_sparse)
    i = next(k for k, q in enumerate(group["params"]) if q is p)
    what = checks.describe(group, i, p)
    raise RuntimeError(
        f"Projected does not support sparse gradients for the weights it may project, but {what} has one; "
        "use dense gradients (e.g. nn.Embedding(sparse=False)) or put it in a group with "
        "scale_invariant=False"
    )


#: optimizer classes (by name) whose ``weight_decay`` is decoupled, ``w <- (1 - lr wd) w`` before the step,
#: and that have no ``decoupled_weight_decay`` group key saying so themselves
DECOUPLED = frozenset({"AdamW", "Adafactor", "AdamW8bit", "AdamW4bit", "AdamWFp8", "Lion"})
#: optimizer classes whose ``weight_decay`` is an L2 term added to the gradient (coupled)
COUPLED = frozenset({"SGD", "Adam", "Adagrad", "Adamax", "ASGD", "RMSprop", "Rprop", "NAdam", "RAdam"})

#: optimizer classes whose step may change ``p.grad`` in place (torch's foreach SGD adds the Nesterov
#: term to it): the gradients of the projected candidates are copied before their step
MUTATES_GRADS = frozenset({"SGD"})

#: the group keys :class:`Projected` adds (``projection_eps``: ``eps`` is the inner optimizer's own key)
OPTIONS = ("delta", "wd_ratio", "projection_eps", "scale_invariant", "track_stats", "corrected_weight_decay", "lr_max")


class Projected(TrackStats, Wrapper):
    r"""The radial component of any optimizer's update removed for scale-invariant weights.

    ``Projected(inner)`` *is* the optimizer: it shares ``inner.param_groups``
    and ``inner.state`` (the same objects), so lr schedulers, ``zero_grad``,
    ``state_dict`` / ``load_state_dict`` (delegated to ``inner``), GradScaler
    and checkpointing work as with ``inner``. Its options become keys of every
    group (``delta``, ``wd_ratio``, ``projection_eps``, ``scale_invariant``,
    ``track_stats``); a group that already has one (e.g. ``scale_invariant``
    from :func:`torch_adamp.param_groups`) keeps its own.

    **Math** (docs/projected.md has the derivation, the paths and the exactness anchors). For each
    parameter ``w`` with gradient ``g`` in a group whose ``scale_invariant`` is not ``False``, with at least
    2 dimensions and non-empty::

        w_b = w;  inner.step() -> w_a;  d = (1 - lr wd) w_b - w_a   (wd: the decoupled decay, else 0)
        decision, c = AdamP's test on (w_b, g)
        w  <- (1 - lr wd r) w_b - (d - c w_b)                       (r = wd_ratio if projected, else 1)

    (``corrected_weight_decay=True``: ``r`` becomes ``wd_ratio lr / lr_max`` for projected weights; ``"all"``:
    ``wd`` becomes ``wd lr / lr_max`` for every weight, ``inner`` stepping with that ``weight_decay``.)

    computed as ``w <- w_a + k w_b``: a weight that is not projected keeps ``inner``'s result bit for bit.
    With ``torch.optim.AdamW`` this is AdamP; with ``torch.optim.SGD(momentum, nesterov=True)``,
    ``SGDP(..., project_momentum=False)``. ``weight_decay`` is decoupled (and re-applied with ``wd_ratio``)
    when the group says ``decoupled_weight_decay=True``, the class is in :data:`DECOUPLED`, or
    ``decoupled_weight_decay=True`` is passed; coupled for :data:`COUPLED`; an unknown class with a
    non-zero ``weight_decay`` is refused until the argument says which.

    **Contract.** ``inner.step()`` must leave ``p.grad`` unchanged (the classes of :data:`MUTATES_GRADS`
    get a copy) and apply a decoupled decay before its update. The step reads nothing to the host beyond
    what ``inner`` does and compiles with ``torch.compile(fullgraph=True)`` where ``inner.step`` does;
    FSDP2 DTensor parameters take one packed ``all_reduce`` per step. GradScaler's protocol is claimed
    exactly when ``inner`` claims it (the test then sees the unscaled gradients, and a skipped step leaves
    ``inner``'s result). Memory: one buffer per candidate, reused, never in ``state_dict()``. Refused at
    construction and ``add_param_group``: complex parameters and ``differentiable=True``.

    Args:
        inner: a constructed optimizer over the parameters.
        delta: threshold of the cosine test, ``max cos < delta / sqrt(row length)``.
        wd_ratio: decoupled weight-decay multiplier for projected weights, in ``[0, 1]``.
        eps: norm floor of the projection (AdamP's ``eps``).
        scale_invariant: ``"auto"`` (the cosine test), ``"channel"`` or
            ``"layer"`` (always project in that view), or ``False`` (never).
        decoupled_weight_decay: whether ``inner``'s ``weight_decay`` is decoupled;
            ``None`` (default): from the group key or the class (see above).
        track_stats: record per-parameter statistics, read with :meth:`stats`.
        corrected_weight_decay: AdamC's correction of the decoupled decay
            (``lr / lr_max``): ``True`` on the weights projected at the step,
            ``"all"`` on every weight (then ``lr`` must be a float: ``inner``
            takes the corrected ``weight_decay``), ``False`` (default) never.
        lr_max: the correction's peak lr; ``None``: each group's lr when wrapped.
    """

    def __init__(
        self,
        inner: Optimizer,
        *,
        delta: float = 0.1,
        wd_ratio: float = 0.1,
        eps: float = 1e-8,
        scale_invariant: checks.ScaleInvariant = "auto",
        decoupled_weight_decay: bool | None = None,
        track_stats: bool = False,
        corrected_weight_decay: checks.CorrectedDecay = False,
        lr_max: float | None = None,
    ) -> None:
        if not isinstance(inner, Optimizer):
            raise TypeError(f"Projected wraps a torch.optim.Optimizer, got {type(inner).__name__}")
        if isinstance(inner, Projected):
            raise ValueError("inner is already a Projected optimizer")
        if decoupled_weight_decay not in (None, True, False):
            raise ValueError(f"Invalid decoupled_weight_decay value: {decoupled_weight_decay!r}")
        options = {
            "delta": delta,
            "wd_ratio": wd_ratio,
            "projection_eps": eps,
            "scale_invariant": scale_invariant,
            "track_stats": track_stats,
            "corrected_weight_decay": corrected_weight_decay,
            "lr_max": lr_max,
        }
        self._check(options)
        self._ready = False
        self.inner = inner
        self._decoupled_arg = decoupled_weight_decay
        self._pre: dict[Tensor, Tensor] = {}  # param -> its value before the step (reused buffer)
        self._pre_grad: dict[Tensor, Tensor] = {}  # param -> its gradient, for MUTATES_GRADS optimizers
        self._last_stats = []
        self._stats_copies = {}
        self._zero = zero.Groups()  # the parameters each group was built with: a substitution is refused
        for g in inner.param_groups:
            self._check({**options, **{k: g[k] for k in OPTIONS if k in g}})
            self._decay_kind(g)
            self._check_params(g)
        # torch's hooks and step patching; our add_param_group ignores the placeholder group
        super().__init__([{"params": []}], options)
        self._ready = True
        inner.defaults.update(options)  # groups added to inner later get them too
        self.defaults = inner.defaults
        self._fill_groups()
        for g in inner.param_groups:
            self._zero.register(g)

    # -- sharing the inner optimizer's containers ----------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not self._ready:
            return  # Optimizer.__init__'s placeholder
        self._check({**self.defaults, **param_group})
        self._decay_kind(param_group)
        if not isinstance(param_group.get("params"), Tensor):
            param_group["params"] = list(param_group["params"])  # a generator is read once
        self._check_params(param_group)
        self.inner.add_param_group(param_group)
        self._fill_groups()
        self._zero.register(self.inner.param_groups[-1])

    def state_dict(self) -> dict[str, Any]:
        """``inner.state_dict()``, with the state-dict hooks registered on this optimizer run around it."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state_dict = self.inner.state_dict()
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """``inner.load_state_dict``; groups saved without the projection options get this optimizer's.
        The load hooks registered on this optimizer run around it, as torch's (a pre hook may return the
        state dict to load; post hooks see the optimizer loaded)."""
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        old = list(self.inner.param_groups)
        self.inner.load_state_dict(state_dict)
        self._fill_groups()
        self._zero.moved(old, self.inner.param_groups)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def __getstate__(self) -> dict[str, Any]:
        return {
            k: v for k, v in self.__dict__.items() if k not in ("_pre", "_pre_grad", "_last_stats", "_stats_copies")
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__dict__.update(_pre={}, _pre_grad={}, _last_stats=[], _stats_copies={})

    def __repr__(self) -> str:
        return f"Projected({self.inner!r})"

    def _fill_groups(self) -> None:
        for g in self.inner.param_groups:
            for k in OPTIONS:
                g.setdefault(k, self.defaults[k])
            if g["lr_max"] is None and g["corrected_weight_decay"] is not False and "lr" in g:
                # the correction's peak lr: the group's lr when wrapped (left None where the correction is off)
                lr_max = checks.lr_value(g["lr"])
                if lr_max is not None and lr_max > 0:
                    g["lr_max"] = lr_max
            checks.correction(g)

    @staticmethod
    def _check(o: dict[str, Any]) -> None:
        for name in ("delta", "projection_eps"):
            checks.nonneg(name, o[name])
        checks.fraction("wd_ratio", o["wd_ratio"])
        checks.scale_invariant("scale_invariant", o["scale_invariant"])
        checks.boolean("track_stats", o["track_stats"])
        checks.corrected_weight_decay("corrected_weight_decay", o["corrected_weight_decay"])
        checks.lr_max("lr_max", o["lr_max"])

    @staticmethod
    def _check_params(group: dict[str, Any]) -> None:
        """Refuse what the projection cannot take, before ``inner`` ever steps: complex parameters (the
        cosine test and norms are for real tensors) and ``differentiable=True`` (the projection runs
        under ``no_grad``, so the step would silently not be differentiable)."""
        if group.get("differentiable"):
            raise ValueError("Projected does not support differentiable=True: the projection is not differentiable")
        params = group.get("params", [])
        checks.parameters(group, [params] if isinstance(params, Tensor) else params, "Projected", float_only=False)

    def _decay_kind(self, group: dict[str, Any]) -> bool:
        """Whether the group's ``weight_decay`` is decoupled (``False`` also when there is none)."""
        wd = group.get("weight_decay", self.inner.defaults.get("weight_decay", 0))
        name = type(self.inner).__name__
        if self._decoupled_arg is not None:
            return bool(self._decoupled_arg and wd != 0)
        key = group.get("decoupled_weight_decay", self.inner.defaults.get("decoupled_weight_decay"))
        if key is not None:
            return bool(key) and wd != 0
        if name in DECOUPLED:
            return bool(wd != 0)
        if name in COUPLED or not wd:
            return False
        raise ValueError(
            f"Projected does not know whether the weight_decay of {name} is decoupled (w <- (1 - lr wd) w) or an "
            "L2 term in the gradient; pass decoupled_weight_decay=True or False"
        )

    def _decay(self, group: dict[str, Any]) -> tuple[Any, Any]:
        """``(weight_decay, wd_ratio)`` of the group's decoupled decay at this step (``weight_decay`` 0 when it is
        coupled or absent), ``corrected_weight_decay`` folded in as the engine folds it
        (:func:`torch_adamp.engine.tail.decay_terms`)."""
        decoupled = self._decay_kind(group)
        wd, ratio, mode = (
            group.get("weight_decay", 0) if decoupled else 0,
            group["wd_ratio"],
            group["corrected_weight_decay"],
        )
        if mode is False:
            return wd, ratio
        if not decoupled and group.get("weight_decay", 0):
            raise ValueError(
                f"corrected_weight_decay={mode!r} corrects a decoupled weight decay, but the weight_decay of "
                f"{type(self.inner).__name__} here is an L2 term in the gradient"
            )
        lr = group["lr"]
        if mode == "all" and wd and isinstance(lr, Tensor):
            raise ValueError(
                "Projected(corrected_weight_decay='all') needs a float lr: the inner optimizer steps with "
                "weight_decay lr / lr_max times the group's, which a tensor lr would make a tensor (use "
                "corrected_weight_decay=True, which takes a tensor lr, or a float lr)"
            )
        return engine_tail.decay_terms(_GroupDecay(wd, ratio, mode, lr, group["lr_max"]))

    # -- the step ------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """``inner.step()`` with the radial part of the update removed for scale-invariant weights."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        scaling = checks.scaling_tensors(self)  # set by GradScaler.step only when inner supports the protocol
        scaled = scaling[0] is not None or scaling[1] is not None
        if scaled and not self._step_supports_amp_scaling:
            raise ValueError(
                f"grad_scale/found_inf are set on Projected, but {type(self.inner).__name__} does not implement "
                "GradScaler's protocol (_step_supports_amp_scaling); let GradScaler unscale and skip instead"
            )
        self._check_step()
        decays = {id(group): self._decay(group) for group in self.param_groups}  # before inner sees a corrected wd
        before = self._stats_before()
        jobs, plain = [], []
        for group in self.param_groups:
            if group["scale_invariant"] is False:
                continue
            params = [p for p in group["params"] if p.grad is not None and projection.projectable(p)]
            if not params:
                continue
            grads = [p.grad for p in params]
            if any(g.is_sparse for g in grads):  # refused before inner steps (nothing of the user's changed)
                _refuse_sparse(group, params)
            if not scaled and native.takes(params, grads, group["lr"]):  # scaled: the torch route
                # plain CPU tensors: copy and decide now (w_b and g are all the test needs), project after
                befores = self._buffers(params)
                sums = native.before(params, grads, befores)
                decision = projection.RowDecision(
                    sums,
                    [p.shape for p in params],
                    delta=group["delta"],
                    eps=group["projection_eps"],
                    mode=group["scale_invariant"],
                )
                plain.append((group, params, befores, sums, decision.finish()[1]))
                continue
            if type(self.inner).__name__ in MUTATES_GRADS:
                grads = reused_copies(grads, self._pre_grad, params)
            jobs.append((group, params, grads, reused_copies(params, self._pre, params)))
        # corrected_weight_decay="all": inner steps with weight_decay lr / lr_max times the group's, restored after
        swapped = [
            (g, g["weight_decay"])
            for g in self.param_groups
            if g["corrected_weight_decay"] == "all" and decays[id(g)][0]
        ]
        try:
            for g, _ in swapped:
                g["weight_decay"] = decays[id(g)][0]
            self._inner_step(scaling)
        finally:
            for g, wd0 in swapped:
                g["weight_decay"] = wd0
        views: dict[Tensor, Tensor] = {}
        for group, params, befores, sums, view in plain:
            lr = group["lr"]
            wd, ratio = decays[id(group)]
            scale = 1 - lr * wd if wd else 1.0
            native.after(befores, params, sums, view, scale, group["projection_eps"], lr * wd * (1 - ratio))
            views.update(zip(params, view.unbind(0), strict=True))
        # the other groups in two phases: the row sums of every bucket, one collective where sharded, the updates
        distributed.finish([b for job in jobs for b in self._project_group(*job, views, decays[id(job[0])], scaling)])
        self._stats_after(before, views)
        return loss

    def _check_step(self) -> None:
        """Refused before ``inner`` steps: a group whose parameters a wrapper replaced by flat partitions
        (DeepSpeed ZeRO, FSDP1), which would silently not be projected (1-D tensors are never candidates).
        (A sparse gradient of a candidate is refused where the candidates are collected, also before.)"""
        for group in self.param_groups:
            params = [p for p in group["params"] if isinstance(p, Tensor)]
            distributed.check_flat(group, params, functools.partial(checks.describe, group), "Projected")
            what = functools.partial(_describe_at, group, params)
            if self._zero.resolve(group, params, what, "Projected") is not None:
                raise NotImplementedError(
                    "Projected does not step DeepSpeed ZeRO partitions (the inner optimizer sees flat tensors, "
                    "so the projection could not apply): pass torch_adamp.AdamP or SGDP to deepspeed.initialize, "
                    "or set scale_invariant=False on this group"
                )

    def _inner_step(self, scaling: tuple[Tensor | None, Tensor | None]) -> None:
        """``inner.step()``, with GradScaler's ``grad_scale`` and ``found_inf`` forwarded for its duration."""
        if scaling[0] is None and scaling[1] is None:
            self.inner.step()
            return
        missing = object()
        saved = [getattr(self.inner, k, missing) for k in ("grad_scale", "found_inf")]
        self.inner.grad_scale, self.inner.found_inf = scaling  # type: ignore[attr-defined]
        try:
            self.inner.step()
        finally:
            for k, v in zip(("grad_scale", "found_inf"), saved, strict=True):
                if v is missing:
                    self.inner.__dict__.pop(k, None)
                else:
                    setattr(self.inner, k, v)

    def _buffers(self, params: list[Tensor]) -> list[Tensor]:
        """The reused pre-step buffers of ``params`` (contiguous, filled by the caller)."""
        bufs = []
        for p in params:
            buf = self._pre.get(p)
            if buf is None or (buf.shape, buf.dtype, buf.device) != (p.shape, p.dtype, p.device):
                buf = self._pre[p] = torch.empty_like(p, memory_format=torch.contiguous_format)
            bufs.append(buf)
        return bufs

    def _project_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        befores: list[Tensor],
        views: dict[Tensor, Tensor],
        decay: tuple[Any, Any],
        scaling: tuple[Tensor | None, Tensor | None] = (None, None),
    ) -> list[_Bucket]:
        """Phase 1 of the projection of one group after the inner step, per device/dtype bucket."""
        dist, (P, G, B) = distributed.localize(
            group,
            params,
            grads,
            befores,
            describe=lambda i, p: checks.describe(group, i, p),
            optimizer="Projected",
        )
        wd, ratio = decay
        return [
            _Bucket(
                group,
                [params[i] for i in idx],
                [P[i] for i in idx],
                [B[i] for i in idx],
                [G[i] for i in idx],
                wd,
                ratio,
                dist,
                scaling,
                views,
            )
            for idx in precision.group_by_device_and_dtype(range(len(P)), P).values()
        ]


class _GroupDecay:
    """What :func:`torch_adamp.engine.tail.decay_terms` reads of a group's options."""

    def __init__(self, weight_decay: Any, wd_ratio: Any, mode: Any, lr: Any, lr_max: Any) -> None:
        self.weight_decay, self.wd_ratio, self.corrected_weight_decay = weight_decay, wd_ratio, mode
        self.lr, self.lr_max = lr, lr_max


class _Bucket:
    """The projection of one device/dtype bucket of a group after the inner step, between its two phases:
    ``w_a <- w_a + k w_b`` (see :class:`Projected`); where GradScaler skips the step, ``w_a`` (as ``inner``
    left it) is kept bit for bit."""

    def __init__(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        locals_: list[Tensor],
        befores: list[Tensor],
        grads: list[Tensor],
        wd: Any,
        ratio: Any,
        dist: Any,
        scaling: tuple[Tensor | None, Tensor | None],
        views: dict[Tensor, Tensor],
    ) -> None:
        self.params, self.locals, self.views = params, locals_, views
        self.w_a = w_a = [precision.upcast(p) for p in locals_]
        self.w_b = w_b = [precision.upcast(b) for b in befores]
        self.scaling = Scaling.from_tensors(*scaling, w_a[0].device)
        g = self.scaling.grads([precision.upcast(t) for t in grads], maximize=False)  # the test: unscaled
        self.lr, self.wd, self.ratio = group["lr"], wd, ratio
        # d = (1 - lr wd) w_b - w_a: the inner update without its decoupled decay; its row sums with w_b and
        # g in one sweep by the native kernel (d never materialised), else with torch operations
        scale = 1 - self.lr * wd if wd else 1.0
        sums = native.row_sums(w_b, g, w_a, scale)
        if sums is None:
            if wd:
                d = list(torch._foreach_mul(w_b, scale))
                torch._foreach_sub_(d, w_a)
            else:
                d = list(torch._foreach_sub(w_b, w_a))
            sums = projection.channel_row_sums(w_b, g, d)
            del d
        layouts = dist.layouts(w_a) if dist is not None else None
        self.decision = projection.RowDecision(
            sums,
            [lay.shape for lay in layouts] if layouts is not None else [w.shape for w in w_a],
            delta=group["delta"],
            eps=group["projection_eps"],
            mode=group["scale_invariant"],
            local_rows=[w.shape[0] for w in w_a],
            rows_split=[lay.rows_split for lay in layouts] if layouts is not None else None,
        )
        self.decision.layouts = layouts

    def finish(self) -> None:
        coefs, view, _ = self.decision.coefficients()
        if self.wd:
            # projected: the decay factor 1 - lr wd becomes 1 - lr wd wd_ratio
            extra = (view > 0).to(coefs[0].dtype) * (self.lr * self.wd * (1 - self.ratio))  # in the tensors' dtype
            coefs = [c + e for c, e in zip(coefs, extra.unbind(), strict=True)]
        if self.scaling.skip is None:
            torch._foreach_addcmul_(self.w_a, self.w_b, coefs)
        else:
            new = torch._foreach_addcmul(self.w_a, self.w_b, coefs)
            for a, n in zip(self.w_a, new, strict=True):
                a.copy_(torch.where(self.scaling.skip, a, n))
        precision.write_back(self.locals, self.w_a)
        self.views.update(zip(self.params, view.unbind(0), strict=True))
