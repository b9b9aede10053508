"""The ``torch.optim.Optimizer`` class of every projected optimizer.

A subclass names its rule (:mod:`torch_adamp.rule`) and its defaults; this
class does the rest: argument checks (the rule's, :mod:`torch_adamp.checks`),
the parameters that have gradients, the sparse and complex refusals, state
initialisation from the rule's state names, sharded parameters
(:mod:`torch_adamp.distributed`, :mod:`torch_adamp.zero`), loading state dicts
of this class or of the reference package, and the optional statistics
(:mod:`torch_adamp.stats`). The math runs in the engine
(:func:`torch_adamp.engine.step`); the class only holds state.
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

from . import checks, distributed, engine, zero
from .engine import Bundle, MultiTensorStep, precision
from .rule import NOT_GROUP_KEYS, Options, Rule, Scaling
from .stats import TrackStats

ParamsT = Iterable[Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, Tensor]]

#: group keys of every optimizer over a rule that are not options of its math, with their checks
GROUP_KEYS: tuple[tuple[str, checks.Check], ...] = (
    ("foreach", checks.optional_boolean),
    ("fused", checks.optional_boolean),
    ("track_stats", checks.boolean),
    ("fp32_state", checks.boolean),
)


#: the base options that have a default (:class:`torch_adamp.rule.Options`): present in every group
BASE_DEFAULTS = {
    f.name: f.default
    for f in dataclasses.fields(Options)
    if f.default is not dataclasses.MISSING and f.name not in NOT_GROUP_KEYS
}


def defaults_of(arguments: dict[str, Any]) -> dict[str, Any]:
    """The group defaults of a subclass ``__init__`` called as ``defaults_of(locals())``: its arguments
    but ``self`` and ``params``."""
    return {k: v for k, v in arguments.items() if k not in ("self", "params", "__class__")}


def functional_step(
    rule: Rule[Any],
    t: Bundle,
    o: Options,
    *,
    foreach: bool | None,
    fused: bool | None,
    views: list[Tensor | None] | None,
    dist: Any,
) -> None:
    """The step of a rule's functional API (``torch_adamp.adamp`` and its siblings): ``o`` checked as a group
    is (a few microseconds: Python numbers; not while ``torch.compile`` traces), then the engine's step, or,
    with ``dist`` (local shards: :mod:`torch_adamp.distributed`), its two phases around the one collective."""
    if not torch.compiler.is_compiling():
        rule.check_options(o)
    if dist is not None:
        distributed.finish(engine.begin(rule, t, o, views, dist))
    else:
        engine.step(rule, t, o, foreach=foreach, fused=fused, views=views)


class ProjectedOptimizer(TrackStats, Optimizer):
    """An optimizer over one rule: the base of :class:`~torch_adamp.AdamP`, :class:`~torch_adamp.SGDP`
    and of any projected optimizer built on the extension point (``examples/custom_rule.py``).

    A subclass sets :attr:`rule` and passes its defaults (``defaults_of(locals())``); the group keys are the
    rule's options (:class:`torch_adamp.rule.Options`) and :data:`GROUP_KEYS`.

    **GradScaler.** ``_step_supports_amp_scaling = True``: ``torch.amp.GradScaler.step`` sets
    ``grad_scale`` (``None`` after ``scaler.unscale_``) and ``found_inf`` on the optimizer and calls
    :meth:`step` unconditionally; the step divides the gradients by ``grad_scale`` and, where
    ``found_inf != 0``, changes nothing (parameters, state, step counters), every decision taken on the
    device (:class:`torch_adamp.rule.Scaling`), so the scaler never reads ``found_inf`` to the host.
    """

    #: the optimizer's rule: its options, state, direction and kernels
    rule: ClassVar[Rule[Any]]
    #: GradScaler's protocol (see the class docstring), as torch's fused optimizers implement it
    _step_supports_amp_scaling: ClassVar[bool] = True

    def __init__(self, params: ParamsT, defaults: dict[str, Any]) -> None:
        # every group carries every base option (a subclass may leave out those it does not take: capturable)
        defaults = {**defaults, **{k: v for k, v in BASE_DEFAULTS.items() if k not in defaults}}
        checked = {**defaults, "lr": 0.0} if defaults["lr"] is required else dict(defaults)  # then checked per group
        if checked["lr_max"] is None:
            checked["lr_max"] = 1.0  # each group gets its own when it is added (its lr), checked then
        self._check_group(checked)
        # created here and mutated in place by step(): torch.compile replays in-place
        # container mutations, and they survive pickling/deepcopy as plain attributes
        self._last_stats = []
        self._stats_copies = {}
        #: the back end of fused=True and what the back ends keep between steps; never in state_dict()
        self._workspace = engine.Workspace()
        #: the parameters each group was built with: recognises DeepSpeed ZeRO's flat partitions
        self._zero = zero.Groups()
        #: per group, the values last checked (see _check_changed)
        self._checked: dict[int, tuple[Any, ...]] = {}
        super().__init__(params, defaults)

    # -- argument checks -------------------------------------------------------------
    def _check_group(self, group: dict[str, Any]) -> None:
        """Raise ``ValueError`` naming the option for a group value this optimizer cannot take."""
        for name, check in GROUP_KEYS:
            if name in group:
                check(name, group[name])
        self.rule.check(group)
        if group.get("foreach") and group.get("fused"):
            raise ValueError("foreach and fused cannot both be True")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        merged = {**self.defaults, **param_group}
        if merged.get("lr") is required:
            raise ValueError(
                f"{type(self).__name__}: a parameter group has no lr, and no default was given; "
                "pass lr= to the optimizer or set it in every group"
            )
        lr_max = None
        if merged.get("lr_max") is None and merged.get("corrected_weight_decay", False) is not False:
            # the correction's peak lr: the group's lr when it is added (left None where the correction is off)
            lr_max = checks.lr_value(merged["lr"])
            if lr_max is not None and lr_max > 0:
                merged["lr_max"] = lr_max
        self._check_group(merged)
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        param_group["params"] = params
        checks.parameters(param_group, params, type(self).__name__)
        distributed.check_flat(merged, params, lambda i, p: checks.describe(param_group, i, p), type(self).__name__)
        super().add_param_group(param_group)
        if lr_max is not None and param_group.get("lr_max") is None:
            param_group["lr_max"] = lr_max  # after torch put the defaults' keys in (their order kept)
        self._zero.register(param_group)

    # -- the step ----------------------------------------------------------------------
    def _step_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        views: list[Tensor | None] | None,
        scaling: tuple[Tensor | None, Tensor | None] = (None, None),
    ) -> list[MultiTensorStep]:
        """Initialise state and run the engine's step of one group (``scaling``: GradScaler's tensors).

        Returns the steps waiting for their sums when the group holds sharded weights (phase 1 done:
        :meth:`step` reduces the sums of every group at once, then finishes them), else ``[]`` (done)."""
        rule = self.rule
        # DeepSpeed ZeRO substituted flat partitions (torch_adamp.zero): recognised or refused before any change
        layout = self._zero.resolve(group, params, lambda i: checks.describe(group, i, params[i]), type(self).__name__)
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
            self._normalise_steps(group, states, params, on_device=scaling[1] is not None)
        lists = [[s[name] for s in states] for name in names]
        steps = [s["step"] for s in states] if rule.counts_steps else None
        o = rule.options(group)
        if scaling[0] is not None or scaling[1] is not None:
            o = dataclasses.replace(o, grad_scale=scaling[0], found_inf=scaling[1])
        if layout is not None:  # a DeepSpeed ZeRO partition: see torch_adamp.zero
            flat = params[0]
            assert flat.grad is not None
            state = [lst[0] for lst in lists]
            zero.step(rule, layout, flat, flat.grad, state, steps[0] if steps else None, o, group["track_stats"])
            return []
        # DTensors (FSDP2) -> local shards; flat 1-D shards (FSDP1) refused here
        dist, local = distributed.localize(
            group,
            params,
            [p.grad for p in params],
            *lists,
            *([steps] if steps is not None else []),
            describe=lambda i, p: checks.describe(group, i, p),
            optimizer=type(self).__name__,
        )
        k = len(names)
        t = Bundle(local[0], local[1], local[2 : 2 + k], local[2 + k] if steps is not None else None)
        if dist is not None:
            if o.caution:
                raise NotImplementedError(
                    "caution=True is not supported for sharded (DTensor) parameters yet: its mask is normalised by "
                    "a mean over the whole tensor, which would need a second collective"
                )
            return engine.begin(rule, t, o, views, dist)
        engine.step(rule, t, o, foreach=group["foreach"], fused=group["fused"], views=views, workspace=self._workspace)
        return []

    @staticmethod
    def _check_zero(group: dict[str, Any], scaling: tuple[Tensor | None, Tensor | None]) -> None:
        """What a DeepSpeed ZeRO partition cannot take yet: refused before any state is created."""
        if group.get("caution"):
            raise NotImplementedError(
                "caution=True is not supported on DeepSpeed ZeRO partitions: its mask is normalised by a mean over "
                "each whole weight of the projected update, known only after the step's one collective, so it would "
                "need a second one; set caution=False"
            )
        if scaling[0] is not None or scaling[1] is not None:
            raise NotImplementedError(
                "torch.amp.GradScaler's grad_scale/found_inf on a DeepSpeed ZeRO partition: DeepSpeed scales the "
                "loss itself (its fp16 config); do not wrap the DeepSpeed engine's optimizer in a GradScaler"
            )

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimisation step; ``closure`` re-evaluates the loss (run with grad enabled)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        scaling = checks.scaling_tensors(self)  # GradScaler's grad_scale / found_inf, if it set them
        jobs: list[tuple[dict[str, Any], list[Tensor], list[Tensor | None] | None]] = []
        for group in self.param_groups:  # what is refused, refused before anything is modified
            params = []
            for p in group["params"]:
                g = p.grad
                if g is not None:
                    if g.is_sparse:
                        self._refuse_sparse(group, p)
                    params.append(p)
            if params:
                self._check_changed(group)
                jobs.append((group, params, [None] * len(params) if group["track_stats"] else None))
        before = self._stats_before()
        # sharded groups in two phases: every group's row sums, one collective for all, then their updates
        waiting = [s for group, params, views in jobs for s in self._step_group(group, params, views, scaling)]
        if waiting:
            distributed.finish(waiting)
        if scaling[0] is not None:
            self._unscale_grads([p for _, params, _ in jobs for p in params], scaling)
        all_views: dict[Tensor, Tensor] = {}
        for _, params, views in jobs:
            if views is not None:
                for p, v in zip(params, views, strict=True):
                    if v is not None:
                        all_views[p] = v
        self._stats_after(before, all_views)
        return loss

    def _check_changed(self, group: dict[str, Any]) -> None:
        """The group's values checked again at ``step()`` where they changed since they were last checked (a
        scheduler, a user writing ``group["betas"]``): what construction refuses is refused then too, before
        anything is modified. Cheap: the values are compared as Python objects, tensors by identity and shape
        (a tensor ``lr``'s value is on the device: never read); nothing is checked under ``torch.compile``."""
        if torch.compiler.is_compiling():
            return
        signature = tuple(
            (k, (id(v), tuple(v.shape)) if isinstance(v, Tensor) else v)
            for k, v in group.items()
            if k not in ("params", "param_names")
        )
        if self._checked.get(id(group)) == signature:
            return
        values = dict(group)
        lr = values.get("lr")
        if isinstance(lr, Tensor):
            if lr.numel() != 1:
                raise ValueError(f"Invalid lr value: a tensor lr must have one element, got shape {tuple(lr.shape)}")
            values["lr"] = 0.0
        self._check_group(values)
        self._checked[id(group)] = signature

    def _stats_elsewhere(self, group: dict[str, Any]) -> bool:
        return self._zero.substituted(group)

    def _other_stats(self) -> list[tuple[list[str], list[int], float | Tensor, Tensor]]:
        return [
            (layout.names, [math.prod(s) for s in layout.shapes], layout.stats_lr, layout.stats)
            for layout in self._zero.layouts()
            if layout.stats is not None
        ]

    @staticmethod
    def _unscale_grads(params: list[Tensor], scaling: tuple[Tensor | None, Tensor | None]) -> None:
        """GradScaler's contract for an optimizer that unscales itself (torch's fused ones): after a step that
        was taken, ``p.grad`` holds the unscaled gradient, ``p.grad * inv_scale`` (the values the step used);
        after a skipped one it is left as it was. On the device: no host read."""
        grads = [p.grad for p in params if p.grad is not None]
        local = [g.to_local() if distributed.is_dtensor(g) else g for g in grads]  # type: ignore[attr-defined]
        for idx in precision.group_by_device_and_dtype(range(len(local)), local).values():
            bucket = [local[i] for i in idx]
            s = Scaling.from_tensors(*scaling, bucket[0].device)
            assert s.inv_scale is not None
            factor = s.inv_scale if s.skip is None else torch.where(s.skip, 1.0, s.inv_scale)
            torch._foreach_mul_(bucket, factor)

    # -- helpers for step() ----------------------------------------------------------
    def _refuse_sparse(self, group: dict[str, Any], p: Tensor) -> None:
        i = next(k for k, q in enumerate(group["params"]) if q is p)
        raise RuntimeError(
            f"{type(self).__name__} does not support sparse gradients, but {checks.describe(group, i, p)} has one; "
            "use dense gradients (e.g. nn.Embedding(sparse=False))"
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
        self.__dict__.setdefault("_checked", {})
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
        self._checked.clear()
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
        """What a state dict must hold to continue this optimizer's run, checked before anything is replaced:
        group values as at construction (``ValueError`` naming the value), no option of another rule
        (``ValueError``: a checkpoint of another optimizer), and every state tensor of this rule, and its step
        counter, for each parameter that has state (``KeyError`` naming the parameter and the key, as torch's
        optimizers raise at their next step; ``adamp`` 0.3.0's state dicts have them all)."""
        name = type(self).__name__
        ours = self._option_names()
        own = self.rule.own_group_keys()
        foreign: dict[str, list[str]] = {}  # a key may belong to several rules (AdamP's and LionP's betas)
        for rule in Rule._registry.values():
            for key in rule.own_group_keys() - own:
                foreign.setdefault(key, []).append(repr(rule.name))
        described: dict[Any, str] = {}
        for i, group in enumerate(state_dict["param_groups"]):
            merged = {**{k: v for k, v in self.defaults.items() if k in ours}, **group}
            try:
                self._check_group(merged)
            except ValueError as e:
                raise ValueError(f"state dict param group {i}: {e}") from None
            for key in group:
                if key in foreign and key not in ours:
                    rules = " or ".join(sorted(foreign[key]))
                    raise ValueError(
                        f"state dict param group {i} has {key!r}, an option of the rule {rules}, not of "
                        f"{name}: this is another optimizer's checkpoint (nothing was loaded)"
                    )
            mine = self.param_groups[i] if i < len(self.param_groups) else {"params": []}
            for k, pid in enumerate(group.get("params", [])):
                if k < len(mine["params"]):
                    described[pid] = checks.describe(mine, k, mine["params"][k])
        required = [*self.rule.state_names, *(["step"] if self.rule.counts_steps else [])]
        for key, st in state_dict["state"].items():
            if not st:
                continue
            missing = [n for n in required if n not in st]
            if missing:
                raise KeyError(
                    f"state dict: {described.get(key, f'parameter {key!r}')} has no {missing[0]!r} (it has "
                    f"{sorted(st)}); {name} needs {required}: this is another optimizer's checkpoint, or an "
                    "incomplete one (nothing was loaded)"
                )
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
        group: dict[str, Any], states: list[dict[str, Any]], params: list[Tensor], on_device: bool = False
    ) -> None:
        """Integer step counters (set by hand, or loaded by another class) become float32 tensors, as
        torch.optim accepts them; done for the whole group before any tensor of it is stepped.

        ``on_device`` (GradScaler's ``found_inf`` given): counters of parameters on an accelerator move to the
        parameter's device, as with ``capturable=True`` (and torch's fused optimizers): whether a step
        counts is decided there, and a counter on the host would have to read it back."""
        for p, st in zip(params, states, strict=True):
            step = st.get("step")
            if on_device and isinstance(step, Tensor) and not p.is_cpu and step.device != p.device:
                st["step"] = step.detach().reshape(()).to(device=p.device, dtype=torch.float32)
                continue
            if isinstance(step, Tensor) and step.dtype == torch.float32 and step.dim() == 0:
                continue
            if step is not None:
                device = p.device if group.get("capturable") else torch.device("cpu")
                value = step if isinstance(step, Tensor) else torch.tensor(float(step))
                st["step"] = value.detach().reshape(()).to(device=device, dtype=torch.float32)
