"""The ``torch.optim.Optimizer`` class of every projected optimizer.

A subclass names its rule (:mod:`torch_adamp.rules`) and its defaults; this
class does the rest: argument checks, the parameters that have gradients, the
sparse and complex refusals, state initialisation from the rule's state names,
sharded parameters (:mod:`torch_adamp.distributed`), loading state dicts of
this class or of the reference package, and the optional statistics. The math
runs in the engine (:func:`torch_adamp.engine.step`); the class only holds state.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.optimizer import required

from . import distributed, engine, projection, zero
from .engine import precision
from .rules import Rule

ParamsT = Iterable[Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, Tensor]]


def _check_nonneg(name: str, value: Any) -> None:
    v = value.item() if isinstance(value, Tensor) else value
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not v >= 0.0 or not math.isfinite(v):
        raise ValueError(f"Invalid {name} value: {value!r}; expected a finite number >= 0")


#: parameter dtypes the optimizers step (half precision in float32); anything else is refused by name
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
#: group options that must be booleans (a string such as "no" would be truthy)
BOOL_OPTIONS = ("nesterov", "maximize", "capturable", "track_stats", "fp32_state", "project_momentum", "caution")


def amp_attributes(opt: Any) -> tuple[Tensor | None, Tensor | None]:
    """``(opt.grad_scale, opt.found_inf)`` as GradScaler sets them for ``step()`` (``None`` when absent),
    checked: ``ValueError`` naming the attribute for anything but a one-element real tensor."""
    out = []
    for name in ("grad_scale", "found_inf"):
        t = getattr(opt, name, None)
        real = isinstance(t, Tensor) and (t.is_floating_point() or t.dtype == torch.bool)
        if t is not None and not (real and t.numel() == 1):
            raise ValueError(
                f"Invalid {name} value: {t!r}; GradScaler's protocol sets a one-element float tensor (or None)"
            )
        out.append(t)
    return out[0], out[1]


def check_lr(lr: Any) -> None:
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError(f"Invalid lr value: a tensor lr must have one element, got shape {tuple(lr.shape)}")
    _check_nonneg("lr", lr)


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


def defaults_of(arguments: dict[str, Any]) -> dict[str, Any]:
    """The group defaults of a subclass ``__init__`` called as ``defaults_of(locals())``: its arguments
    but ``self`` and ``params``."""
    return {k: v for k, v in arguments.items() if k not in ("self", "params", "__class__")}


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
            if group.get("track_stats"):
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
        if not rows:
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
        out["projected_fraction"] = counts[0] / counts[1] if counts[1] else 0.0
        out["projected_numel_fraction"] = counts[2] / counts[3] if counts[3] else 0.0
        return out


class ProjectedOptimizer(TrackStats, Optimizer):
    """Base of :class:`~torch_adamp.AdamP` and :class:`~torch_adamp.SGDP`: an optimizer over one rule.

    **GradScaler.** ``_step_supports_amp_scaling = True``: ``torch.amp.GradScaler.step`` sets
    ``grad_scale`` (``None`` after ``scaler.unscale_``) and ``found_inf`` on the optimizer and calls
    :meth:`step` unconditionally; the step divides the gradients by ``grad_scale`` and, where
    ``found_inf != 0``, changes nothing (parameters, state, step counters), every decision taken on the
    device (:class:`torch_adamp.rules.Scaling`), so the scaler never reads ``found_inf`` to the host.
    """

    #: the optimizer's rule: its options, state, direction and kernel
    rule: ClassVar[Rule]
    #: GradScaler's protocol (see the class docstring), as torch's fused optimizers implement it
    _step_supports_amp_scaling: ClassVar[bool] = True

    def __init__(self, params: ParamsT, defaults: dict[str, Any]) -> None:
        checked = {**defaults, "lr": 0.0} if defaults["lr"] is required else defaults  # then checked per group
        self._check_common(checked)
        self.rule.check(checked)
        # created here and mutated in place by step(): torch.compile replays in-place
        # container mutations, and they survive pickling/deepcopy as plain attributes
        self._last_stats = []
        self._stats_copies = {}
        #: what the native kernels keep between steps (guesses, spare block); never in state_dict()
        self._workspace = engine.Workspace()
        #: the parameters each group was built with: recognises DeepSpeed ZeRO's flat partitions
        self._zero = zero.Groups()
        super().__init__(params, defaults)

    # -- argument checks -------------------------------------------------------------
    @staticmethod
    def _check_common(group: dict[str, Any]) -> None:
        for name in BOOL_OPTIONS:
            if name in group and not isinstance(group[name], bool):
                raise ValueError(f"Invalid {name} value: {group[name]!r}; expected True or False")
        for name in ("foreach", "fused"):
            if group.get(name) is not None and not isinstance(group[name], bool):
                raise ValueError(f"Invalid {name} value: {group[name]!r}; expected True, False or None")
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
        if merged.get("lr") is required:
            raise ValueError(
                f"{type(self).__name__}: a parameter group has no lr, and no default was given; "
                "pass lr= to the optimizer or set it in every group"
            )
        self._check_common(merged)
        self.rule.check(merged)
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        param_group["params"] = params
        for i, p in enumerate(params):
            name, p = p if isinstance(p, tuple) else (None, p)
            if isinstance(p, Tensor) and p.is_complex():
                what = f"parameter {name!r}" if name is not None else self._describe(param_group, i, p)
                raise ValueError(
                    f"{what} is complex; {type(self).__name__} does not support complex parameters "
                    "(pass torch.view_as_real(p) as a real parameter instead)"
                )
            if isinstance(p, Tensor) and p.dtype not in FLOAT_DTYPES:
                what = f"parameter {name!r}" if name is not None else self._describe(param_group, i, p)
                raise ValueError(
                    f"{what} has dtype {p.dtype}; {type(self).__name__} steps float32, float64, float16 and "
                    "bfloat16 parameters only"
                )
        distributed.check_flat(merged, params, lambda i, p: self._describe(param_group, i, p), type(self).__name__)
        super().add_param_group(param_group)
        self._zero.register(param_group)

    # -- the step ----------------------------------------------------------------------
    def _step_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        views: list[Tensor | None] | None,
        scaling: tuple[Tensor | None, Tensor | None] = (None, None),
    ) -> None:
        """Initialise state and run the engine's step of one group (``scaling``: GradScaler's tensors)."""
        rule = self.rule
        # DeepSpeed ZeRO substituted flat partitions (torch_adamp.zero): recognised or refused before any change
        layout = self._zero.resolve(group, params, lambda i: self._describe(group, i, params[i]), type(self).__name__)
        if layout is not None:
            self._check_zero(group, scaling)
        names = rule.state_names
        states = [self.state[p] for p in params]  # one lookup per parameter (Tensor.__hash__ is Python)
        for p, state in zip(params, states, strict=True):
            if names[0] not in state:
                if rule.counts_steps:
                    state["step"] = self._new_step(p, group)
                for name in names:
                    state[name] = self._zeros_state(p, group)
        if rule.counts_steps:
            self._normalise_steps(group, states, params, amp=scaling[1] is not None)
        lists = [[s[name] for s in states] for name in names]
        if rule.counts_steps:
            lists.append([s["step"] for s in states])
        if layout is not None:  # a DeepSpeed ZeRO partition: see torch_adamp.zero
            self._zero_step(group, layout, params[0], lists)
            return
        dist, local = self._dist(group, params, [p.grad for p in params], *lists)  # DTensors (FSDP2) -> shards
        if dist is not None and group.get("caution"):
            raise NotImplementedError(
                "caution=True is not supported for sharded (DTensor) parameters yet: its mask is normalised by a "
                "mean over the whole tensor, which would need a second collective"
            )
        k = len(names)
        o = rule.options(group)
        if scaling[0] is not None or scaling[1] is not None:
            o = dataclasses.replace(o, grad_scale=scaling[0], found_inf=scaling[1])
        engine.step(
            rule,
            local[0],
            local[1],
            local[2 : 2 + k],
            local[2 + k] if rule.counts_steps else None,
            o,
            foreach=group["foreach"],
            fused=group["fused"],
            views=views,
            dist=dist,
            workspace=self._workspace,
        )

    @staticmethod
    def _check_zero(group: dict[str, Any], scaling: tuple[Tensor | None, Tensor | None]) -> None:
        """What a DeepSpeed ZeRO partition cannot take yet: refused before any state is created."""
        for option in ("caution", "track_stats"):
            if group.get(option):
                raise NotImplementedError(
                    f"{option}=True is not supported on DeepSpeed ZeRO partitions yet; set {option}=False"
                )
        if scaling[0] is not None or scaling[1] is not None:
            raise NotImplementedError(
                "torch.amp.GradScaler's grad_scale/found_inf on a DeepSpeed ZeRO partition: DeepSpeed scales the "
                "loss itself (its fp16 config); do not wrap the DeepSpeed engine's optimizer in a GradScaler"
            )

    def _zero_step(self, group: dict[str, Any], layout: zero.Layout, flat: Tensor, lists: list[list[Any]]) -> None:
        k = len(self.rule.state_names)
        steps = lists[k][0] if self.rule.counts_steps else None
        assert flat.grad is not None
        zero.step(self.rule, layout, flat, flat.grad, [lst[0] for lst in lists[:k]], steps, self.rule.options(group))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimisation step; ``closure`` re-evaluates the loss (run with grad enabled)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_grads()
        scaling = amp_attributes(self)  # GradScaler's grad_scale / found_inf, if it set them
        before = self._stats_before()
        all_views: dict[Tensor, Tensor] = {}
        jobs = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                jobs.append((group, params, [None] * len(params) if group["track_stats"] else None, scaling))
        # one after the other; as coroutines when several groups hold sharded weights (one collective)
        distributed.run_group_steps(self._step_group, jobs)
        for _, params, views, _ in jobs:
            if views is not None:
                for p, v in zip(params, views, strict=True):
                    if v is not None:
                        all_views[p] = v
        self._stats_after(before, all_views)
        return loss

    def _dist(self, group: dict[str, Any], params: list[Tensor], *lists: list[Any]) -> tuple[Any, list[list[Any]]]:
        """Sharded parameters (see :mod:`torch_adamp.distributed`): ``(dist, [params, *lists])``.

        ``dist`` is the sharding helper of the multi-tensor path, ``None`` when
        no parameter is a DTensor; DTensors in the lists become their local
        shards. Flat 1-D shards (FSDP1) are refused here.
        """
        return distributed.localize(
            group, params, *lists, describe=lambda i, p: self._describe(group, i, p), optimizer=type(self).__name__
        )

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
                g = p.grad
                if g is not None and g.is_sparse:
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
    def _zeros_state(p: Tensor, group: dict[str, Any]) -> Tensor:
        """Moments of half-precision parameters are float32 unless ``fp32_state=False``."""
        low = p.dtype in (torch.float16, torch.bfloat16)
        dtype = torch.float32 if low and group.get("fp32_state", True) else p.dtype
        return torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_last_stats", [])  # not pickled (torch's __getstate__)
        self.__dict__.setdefault("_stats_copies", {})
        self.__dict__.setdefault("_workspace", engine.Workspace())
        if "_zero" not in self.__dict__:
            self._zero = zero.Groups()
            for group in self.param_groups:
                self._zero.register(group)
        # groups saved by the reference package (or an older version) lack our options; torch's own
        # additions to ``defaults`` (e.g. "differentiable") are not ours to put into the groups
        ours = self._option_names()
        for group in self.param_groups:
            for key, value in self.defaults.items():
                if key in ours:
                    group.setdefault(key, value)

    @classmethod
    def _option_names(cls) -> set[str]:
        """The group options of this class: its constructor's arguments (and capturable)."""
        import inspect

        names = set(inspect.signature(cls.__init__).parameters) - {"self", "params"}
        return names | {"capturable"}

    # -- state dict: reference-package migration ---------------------------------------
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict saved by this class or by the reference ``adamp`` package.

        Integer ``step`` counters (reference format) become tensors; moments of
        half-precision parameters stay float32 (torch would cast them down).
        """
        # torch runs the load hooks inside its load_state_dict; here they run around all of it, so that a
        # pre hook's state dict is the one checked and migrated, and post hooks see the state as loaded
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        saved = state_dict["state"]
        self._check_loadable(state_dict)  # before anything is replaced
        hooks = (self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks)
        self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks = {}, {}  # type: ignore[assignment]
        groups = list(self.param_groups)
        try:
            super().load_state_dict(state_dict)
        finally:
            self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks = hooks
        self._zero.moved(groups, self.param_groups)
        id_map: dict[int, Tensor] = {}
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
                elif name == "step" and (group.get("capturable") or v.dtype != torch.float32):
                    device = p.device if group.get("capturable") else torch.device("cpu")
                    st[name] = v.to(device=device, dtype=torch.float32)
                elif (
                    isinstance(v, Tensor)
                    and v.is_floating_point()
                    and p.dtype in (torch.float16, torch.bfloat16)
                    and group.get("fp32_state", True)
                ):
                    st[name] = v.to(device=p.device, dtype=torch.float32)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _check_loadable(self, state_dict: dict[str, Any]) -> None:
        """Group values as at construction, and numeric step counters: raise ``ValueError`` naming the value."""
        ours = self._option_names()
        for i, group in enumerate(state_dict["param_groups"]):
            merged = {**{k: v for k, v in self.defaults.items() if k in ours}, **group}
            try:
                self._check_common(merged)
                self.rule.check(merged)
            except ValueError as e:
                raise ValueError(f"state dict param group {i}: {e}") from None
        for key, st in state_dict["state"].items():
            step = st.get("step")
            if step is None:
                continue
            ok = (isinstance(step, (int, float)) and not isinstance(step, bool)) or (
                isinstance(step, Tensor) and step.numel() == 1 and not step.is_complex() and step.dtype != torch.bool
            )
            if not ok:
                raise ValueError(f"state dict: parameter {key!r} has step {step!r}; expected a number")

    @staticmethod
    def _normalise_steps(
        group: dict[str, Any], states: list[dict[str, Any]], params: list[Tensor], amp: bool = False
    ) -> None:
        """Integer step counters (set by hand, or loaded by another class) become float32 tensors, as
        torch.optim accepts them; done for the whole group before any tensor of it is stepped.

        ``amp`` (GradScaler's ``found_inf`` given): counters of parameters on an accelerator move to the
        parameter's device, as with ``capturable=True`` (and torch's fused optimizers): whether a step
        counts is decided there, and a counter on the host would have to read it back."""
        for p, st in zip(params, states, strict=True):
            step = st.get("step")
            if amp and isinstance(step, Tensor) and not p.is_cpu and step.device != p.device:
                st["step"] = step.detach().reshape(()).to(device=p.device, dtype=torch.float32)
                continue
            if isinstance(step, Tensor) and step.dtype == torch.float32 and step.dim() == 0:
                continue
            if step is not None:
                device = p.device if group.get("capturable") else torch.device("cpu")
                value = step if isinstance(step, Tensor) else torch.tensor(float(step))
                st["step"] = value.detach().reshape(()).to(device=device, dtype=torch.float32)
