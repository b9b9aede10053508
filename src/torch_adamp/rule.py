"""The extension point: a projected optimizer is a :class:`Rule` (its direction) over the shared projection.

A projected step, for every optimizer here, is::

    u, s  = rule.direction(w, g, state)        the optimizer's own update direction and step size
    u, r  = proj(w, g, u)                      the scale-invariance test and radial removal
                                               (r = wd_ratio if projected, else 1)
    w    <- w (1 - lr wd r k / D) - s u        decoupled weight decay, then the step
                                               (k = lr / lr_max where corrected_weight_decay says, else 1)

The engine (:mod:`torch_adamp.engine`) runs the last two lines on every path (per-tensor, multi-tensor,
fused, compiled, sharded); a rule says what differs between optimizers: its options (a frozen dataclass
extending :class:`Options`, each field declared with :func:`option`: its default, a description and its
check), its state, its direction on one tensor and on a list of tensors (either may be left to the
default, which derives it from the other), the weight-decay divisor ``D``, whether the direction *is*
stored state that must keep its unprojected values, and which back ends have a kernel for it.

Adding a projected optimizer is one module: its options, its rule and its class (``torch_adamp/optimizers/``,
or any module of your own: ``examples/custom_rule.py``), and, for the native CPU kernel, its element
functions in ``csrc/rules/<name>.h``. Without a kernel the rule runs on the per-tensor and multi-tensor
paths and, for ``fused=True``, through ``torch.compile``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

import torch
from torch import Tensor

from . import checks
from .checks import CorrectedDecay, ScaleInvariant

Scalar = float | Tensor
Tensors = list[Tensor]
State = Sequence[Tensor]  # the state tensors of one parameter, in ``state_names`` order
States = Sequence[list[Tensor]]  # one list per state name
Step = Tensor | None
Steps = list[Tensor] | None
Direction = tuple[Tensor, Scalar]  # (u, step size)
Directions = tuple[list[Tensor], Scalar]

Check = checks.Check


def option(default: Any = dataclasses.MISSING, doc: str = "", *, check: Check | None = None) -> Any:
    """A field of a rule's options: its default, a one-line description and its check (``check(name, value)``
    raises ``ValueError`` naming the option; boolean fields are checked from their type without one)."""
    return dataclasses.field(default=default, metadata={"doc": doc, "check": check})


@dataclass(frozen=True)
class Options:
    """The options every projected step has; a rule's options extend these (group keys of the same name)."""

    lr: Scalar = option(doc="learning rate (float or one-element tensor)", check=checks.lr)
    eps: float = option(doc="added to the denominator; also the norm floor of the projection", check=checks.nonneg)
    weight_decay: float = option(doc="decoupled weight decay, multiplied by lr", check=checks.nonneg)
    delta: float = option(doc="threshold of the cosine test, max cos < delta / sqrt(row length)", check=checks.nonneg)
    wd_ratio: float = option(doc="weight-decay multiplier for weights that are projected", check=checks.fraction)
    maximize: bool = option(False, "maximise the objective")
    scale_invariant: ScaleInvariant = option(
        "auto", "'auto' (the cosine test), 'channel' or 'layer' (always), False (never)", check=checks.scale_invariant
    )
    capturable: bool = option(False, "step counters on the device (CUDA graphs)")
    caution: bool = option(False, "timm's cautious update after the projection (torch_adamp.projection.cautious)")
    corrected_weight_decay: CorrectedDecay = option(
        False,
        "decay scaled by lr / lr_max (AdamC, Defazio et al. 2025): True where the projection finds scale "
        "invariance, 'all' on every weight, False never",
        check=checks.corrected_weight_decay,
    )
    lr_max: float | None = option(
        None, "the peak lr of the correction (None: the group's lr when the group is added)", check=checks.lr_max
    )
    #: GradScaler's protocol (``opt.grad_scale``, ``opt.found_inf``: 0-d tensors, or ``None``); not group keys
    grad_scale: Tensor | None = None
    found_inf: Tensor | None = None


#: fields of :class:`Options` that are not group options (set from GradScaler's attributes)
NOT_GROUP_KEYS = ("grad_scale", "found_inf")
_BASE_FIELDS = frozenset(f.name for f in dataclasses.fields(Options))

OptionsT = TypeVar("OptionsT", bound=Options)


class Scaling:
    """GradScaler's protocol on one device, as predicated scalars: the step unscales and skips on the device.

    ``inv_scale`` is ``1 / grad_scale`` rounded to float32 as ``GradScaler.unscale_`` rounds it (so a
    step with ``grad_scale`` and one after ``unscale_`` see the same gradients); ``skip`` is
    ``found_inf != 0`` (0-d bool; NaN counts as found). A skipped step must leave every parameter, state
    tensor and step counter bit for bit as it was, with no host read, so that it is predicated:

    * the gradient becomes ``-0.0`` (``torch.where``, since ``inf * 0`` is NaN): every state update
      ``s <- a s + b g`` then adds ``-0.0``, and ``x + (-0.0) == x`` for every ``x``, signed zeros included
      (Adam's ``v <- b2 v + (1 - b2) g^2`` adds ``+0.0``, which changes no value ``v`` can hold: a sum
      of squares from ``+0.0`` is never ``-0.0``);
    * the multiplicative factors of the state (``beta1``, ``beta2``, ``momentum``: :meth:`factor`) and of
      the weights (the decay factor) become 1;
    * the final update becomes ``+0.0`` (``w - (+0.0) == w`` and ``w + (-s) (+0.0) == w``);
    * the step counters get ``+ (1 - skip)`` (:meth:`increment`); bias corrections are those of the count
      the step would have had (never of ``t = 0``, where ``1 - beta^0 = 0`` would divide by zero).

    Where the direction *is* state that the projection updates in place (SGDP's buffer with
    ``project_momentum``), the engine projects a copy and writes it back unless skipped. When the step is
    taken every predicated value is the very value the unscaled step uses, so its bits are those of the
    unscaled step on the unscaled gradients. Without GradScaler it is :data:`NO_SCALING`: every method
    returns its argument, and every path runs exactly as without the protocol.
    """

    def __init__(self, inv_scale: Tensor | None, skip: Tensor | None) -> None:
        self.inv_scale = inv_scale
        self.skip = skip

    @property
    def active(self) -> bool:
        """Whether GradScaler set anything (``grad_scale`` or ``found_inf``)."""
        return self.inv_scale is not None or self.skip is not None

    @staticmethod
    def of(o: Options, device: torch.device) -> Scaling:
        """The scaling of options ``o`` on ``device`` (:data:`NO_SCALING` without GradScaler)."""
        return Scaling.from_tensors(o.grad_scale, o.found_inf, device)

    @staticmethod
    def from_tensors(gs: Tensor | None, fi: Tensor | None, device: torch.device) -> Scaling:
        """The scaling of GradScaler's ``grad_scale`` and ``found_inf`` on ``device``."""
        if gs is None and fi is None:
            return NO_SCALING
        inv = None
        if gs is not None:  # as GradScaler.unscale_: (1 / double(scale)) rounded to float
            inv = gs.to(device=device).reshape(()).double().reciprocal().float()
        skip = None if fi is None else fi.to(device=device).reshape(()) != 0
        return Scaling(inv, skip)

    def grad(self, g: Tensor, maximize: bool) -> Tensor:
        """The gradient the step uses: unscaled, negated under ``maximize``, ``-0.0`` on a skipped step."""
        if self.inv_scale is not None:
            g = g * self.inv_scale
        if maximize:
            g = -g
        return g if self.skip is None else torch.where(self.skip, -0.0, g)

    def grads(self, g: Sequence[Tensor], maximize: bool) -> list[Tensor]:
        """:meth:`grad` of a list (one foreach multiply)."""
        G = list(g) if self.inv_scale is None else list(torch._foreach_mul(list(g), self.inv_scale))
        if maximize:
            G = list(torch._foreach_neg(G))
        return G if self.skip is None else [torch.where(self.skip, -0.0, t) for t in G]

    def factor(self, value: Scalar, on_skip: float) -> Scalar:
        """``value``, or ``on_skip`` on a skipped step; a float becomes a 0-d float64 tensor, which rounds to
        the tensors' dtype exactly as the Python float does (the same bits when the step is taken)."""
        if self.skip is None:
            return value
        if isinstance(value, Tensor):
            return torch.where(self.skip, on_skip, value)
        full = torch.full((), float(value), dtype=_factor_dtype(self.skip.device), device=self.skip.device)
        return full.masked_fill_(self.skip, on_skip)

    def update(self, u: Tensor) -> Tensor:
        """The final update: ``u``, or ``+0.0`` on a skipped step."""
        return u if self.skip is None else torch.where(self.skip, 0.0, u)

    def increment(self, like: Tensor) -> Tensor:
        """What a step counter ``like`` advances by: 1, or 0 on a skipped step (a 0-d tensor on the counter's
        device; a counter on the host with ``skip`` on an accelerator would copy it back: the optimizer moves
        such counters to the device first)."""
        if self.skip is None:
            return torch.ones((), dtype=like.dtype, device=like.device)
        return (~self.skip).to(device=like.device, dtype=like.dtype)


#: the scaling of a step without GradScaler
NO_SCALING = Scaling(None, None)


def _factor_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


class Rule(Generic[OptionsT]):
    """One optimizer's direction. Subclasses are stateless singletons; see the module docstring.

    A subclass sets the class attributes below and overrides :meth:`direction` or :meth:`directions` (or
    both, when the per-tensor form must follow a reference's operation order); the other is derived.
    """

    #: the rule's name: also the name of its kernels (``csrc/rules/<name>.h``) and custom ops
    name: ClassVar[str]
    #: the rule's options: a frozen dataclass extending :class:`Options`, its fields declared with :func:`option`
    options_type: ClassVar[type[Options]]
    #: per-parameter state tensors, zeros shaped like the parameter, in kernel order
    state_names: ClassVar[tuple[str, ...]]
    #: whether the rule keeps a float32 ``step`` counter per parameter (passed after the state tensors)
    counts_steps: ClassVar[bool] = False
    #: the back ends that have a kernel for this rule: ``"native"`` (the CPU kernel, ``csrc/rules/<name>.h``),
    #: ``"triton"`` (the element functions of ``torch_adamp/triton/<name>.py`` over the Triton driver)
    kernels: ClassVar[frozenset[str]] = frozenset()
    #: the native kernel's arguments: (option name, C type ``"double"`` or ``"int32"``) in the order of its struct
    kernel_fields: ClassVar[tuple[tuple[str, str], ...]] = ()
    #: group keys that hold several options, as torch.optim spells them: AdamP's ``{"betas": ("beta1", "beta2")}``
    renames: ClassVar[dict[str, tuple[str, ...]]] = {}

    #: every rule by name (filled when a subclass with a ``name`` is defined)
    _registry: ClassVar[dict[str, Rule[Any]]] = {}
    #: the fields of ``options_type`` that are group options, and their checks (read once: ``dataclasses.fields``
    #: does not trace under dynamo)
    option_fields: ClassVar[tuple[str, ...]] = ()
    option_checks: ClassVar[tuple[tuple[str, Check], ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "options_type" in cls.__dict__:
            fields = [f for f in dataclasses.fields(cls.options_type) if f.name not in NOT_GROUP_KEYS]
            cls.option_fields = tuple(f.name for f in fields)
            cls.option_checks = tuple((f.name, _field_check(f)) for f in fields)
        if cls.direction is Rule.direction and cls.directions is Rule.directions:
            raise TypeError(f"{cls.__name__} must override direction() or directions()")

    def __init__(self) -> None:
        Rule._registry[self.name] = self

    @staticmethod
    def named(name: str) -> Rule[Any]:
        """The rule of that name (its module defines and instantiates it)."""
        return Rule._registry[name]

    # -- options --------------------------------------------------------------------------
    def options(self, group: dict[str, Any]) -> OptionsT:
        """The rule's options from a parameter group: its fields of the same name, and :meth:`renamed`."""
        values = {name: group[name] for name in self.option_fields if name in group}
        lr = values.get("lr")
        if isinstance(lr, Tensor) and lr.dim() > 0:  # any one-element tensor, as torch.optim accepts
            values["lr"] = lr.reshape(())
        return self.options_type(**{**values, **self.renamed(group)})  # type: ignore[return-value]

    def renamed(self, group: dict[str, Any]) -> dict[str, Any]:
        """The options held by the group keys of :attr:`renames` (AdamP: ``betas`` -> ``beta1``, ``beta2``); a
        one-element CPU tensor among them (as torch.optim takes betas) is read as its number (no device read)."""
        return {
            name: float(value) if isinstance(value, Tensor) else value
            for key, names in self.renames.items()
            for name, value in zip(names, group[key], strict=True)
        }

    @classmethod
    def own_group_keys(cls) -> frozenset[str]:
        """The group keys of this rule's own options (not those every rule has): what tells its checkpoints apart."""
        renamed = {n for names in cls.renames.values() for n in names}
        own = {f for f in cls.option_fields if f not in _BASE_FIELDS and f not in renamed}
        return frozenset(own | set(cls.renames))

    def check(self, group: dict[str, Any]) -> None:
        """Raise ``ValueError`` naming the option for a group value this rule cannot take: every option
        field present in the group by its check, then :meth:`check_group` (what spans several options)."""
        for name, check in self.option_checks:
            if name in group:
                check(name, group[name])
        checks.correction(group)
        self.check_group(group)

    def check_group(self, group: dict[str, Any]) -> None:
        """Checks that involve several options or a renamed group key (override; the default has none)."""

    def check_options(self, o: OptionsT) -> None:
        """Check options built without a group (the functional API) as :meth:`check` checks a group: each
        field by its check, a tensor ``lr`` by its shape only (its value is on the device: not read)."""
        values: dict[str, Any] = {}
        for name, check in self.option_checks:
            value = getattr(o, name)
            if isinstance(value, Tensor):
                if value.numel() != 1:
                    raise ValueError(f"Invalid {name} value: a tensor {name} must have one element")
                value = 0.0  # stands in for the value on the device in the checks across options
            else:
                check(name, value)
            values[name] = value
        for key, names in self.renames.items():
            values[key] = tuple(values[n] for n in names)
        checks.correction(values)
        self.check_group(values)

    # -- the math -------------------------------------------------------------------------
    def wd_divisor(self, o: OptionsT) -> float:
        """``D`` of the decoupled weight decay ``w (1 - lr wd r / D)``."""
        return 1.0

    def direction_is_state(self, o: OptionsT) -> bool:
        """Whether the directions of :meth:`directions` are state tensors that must keep their unprojected
        values (the engine then projects copies)."""
        return False

    def direction(
        self,
        p: Tensor,
        g: Tensor,
        state: State,
        step: Step,
        o: OptionsT,
        as_tensor: bool,
        scaling: Scaling = NO_SCALING,
    ) -> Direction:
        """One tensor: update ``state`` in place; return the direction ``u`` and the step size ``s``.

        ``g`` is the gradient the step uses (unscaled, negated under ``maximize``, ``-0.0`` where GradScaler
        skips the step). ``as_tensor``: bias corrections and other step-dependent scalars must stay
        tensors (under ``torch.compile`` or with ``capturable``), never ``.item()``. ``u`` may be projected
        in place by the engine (it may alias state on purpose). ``scaling``: state factors and step counters
        predicated (:meth:`Scaling.factor`, :meth:`Scaling.increment`) so that a skipped step leaves the
        state as it was. Default: :meth:`directions` of a one-tensor list.
        """
        steps = [step] if step is not None else None
        U, s = self.directions([p], [g], [[t] for t in state], steps, o, as_tensor, scaling)
        return U[0], s

    def directions(
        self,
        p: Tensors,
        g: Tensors,
        state: States,
        steps: Steps,
        o: OptionsT,
        as_tensor: bool,
        scaling: Scaling = NO_SCALING,
    ) -> Directions:
        """A list of same-device, same-dtype tensors: the multi-tensor form of :meth:`direction`.

        Returns the directions and one step size for all of them (per-tensor step sizes are folded into the
        directions, since the projection is linear). Default: :meth:`direction` tensor by tensor.
        """
        out, sizes = [], []
        for i in range(len(p)):
            step = steps[i] if steps is not None else None
            u, s = self.direction(p[i], g[i], [lst[i] for lst in state], step, o, as_tensor, scaling)
            out.append(u)
            sizes.append(s)
        if all(not isinstance(s, Tensor) for s in sizes) and len(set(sizes)) <= 1:
            return out, sizes[0] if sizes else 1.0
        return [u * s for u, s in zip(out, sizes, strict=True)], 1.0

    def kernel_args(self, o: OptionsT) -> tuple[float, ...]:
        """Values of :attr:`kernel_fields` for the native kernel, from the options."""
        return tuple(float(getattr(o, name)) for name, _ in self.kernel_fields)


def _field_check(f: dataclasses.Field[Any]) -> Check:
    check: Check | None = f.metadata.get("check")
    if check is not None:
        return check
    if f.type in ("bool", bool):
        return checks.boolean
    return _no_check


def _no_check(name: str, value: Any) -> None:
    return None
