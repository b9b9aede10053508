"""What an optimizer rule is: the part of a projected optimizer that is not the projection.

A projected step, for every optimizer here, is::

    u, s  = rule.direction(w, g, state)        the optimizer's own update direction and step size
    u, r  = proj(w, g, u)                      the scale-invariance test and radial removal
                                               (r = wd_ratio if projected, else 1)
    w    <- w (1 - lr wd r / D) - s u          decoupled weight decay, then the step

The engine (:mod:`torch_adamp.engine`) runs the last two lines, on every path;
a rule says what differs between optimizers: its state, its direction on one
tensor and on a list of tensors, the weight-decay divisor ``D``, whether the
direction *is* stored state that must stay unprojected, and the arguments of
its native kernel. Adding a projected optimizer is one rule module (and its
direction in the native kernel, for the fused CPU path).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..projection import ScaleInvariant

Scalar = float | Tensor
Tensors = list[Tensor]
State = Sequence[Tensor]  # the state tensors of one parameter, in ``state_names`` order
States = Sequence[list[Tensor]]  # one list per state name
Step = Tensor | None
Steps = list[Tensor] | None
Direction = tuple[Tensor, Scalar]  # (u, step size)
Directions = tuple[list[Tensor], Scalar]


@dataclass(frozen=True)
class Options:
    """Hyper-parameters every projected step has (a rule's options extend these)."""

    lr: Scalar
    eps: float
    weight_decay: float
    delta: float
    wd_ratio: float
    maximize: bool = False
    scale_invariant: ScaleInvariant = "auto"
    capturable: bool = False
    #: GradScaler's protocol (``opt.grad_scale``, ``opt.found_inf``: 0-d tensors, or ``None``); see :class:`Scaling`
    grad_scale: Tensor | None = None
    found_inf: Tensor | None = None


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
    * the multiplicative factors of the state (``beta1``, ``beta2``, ``momentum``) and of the weights
      (the decay factor) become 1;
    * the final update becomes ``+0.0`` (``w - (+0.0) == w`` and ``w + (-s) (+0.0) == w``);
    * the step counters get ``+ (1 - skip)``; bias corrections are those of the count the step would
      have had (never of ``t = 0``, where ``1 - beta^0 = 0`` would divide by zero).

    Where the direction *is* state that the projection updates in place (SGDP's buffer with
    ``project_momentum``), the engine projects a copy and writes it back under ``skip``. When the
    step is taken every predicated value is the very value the unscaled step uses, so its bits are those
    of the unscaled step on the unscaled gradients.
    """

    def __init__(self, inv_scale: Tensor | None, skip: Tensor | None) -> None:
        self.inv_scale = inv_scale
        self.skip = skip

    @staticmethod
    def of(o: Any, device: torch.device) -> Scaling | None:
        """The scaling of options ``o`` on ``device``, or ``None`` without GradScaler (every path unchanged)."""
        return Scaling.from_tensors(getattr(o, "grad_scale", None), getattr(o, "found_inf", None), device)

    @staticmethod
    def from_tensors(gs: Tensor | None, fi: Tensor | None, device: torch.device) -> Scaling | None:
        """The scaling of GradScaler's ``grad_scale`` and ``found_inf`` on ``device`` (``None`` without both)."""
        if gs is None and fi is None:
            return None
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


def _factor_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


class Rule:
    """One optimizer's direction. Subclasses are stateless singletons; see the module docstring."""

    #: the rule's name; also the name of its native kernel (``torch_adamp_<name>_f32``) and custom op
    name: ClassVar[str]
    #: per-parameter state tensors, zeros shaped like the parameter, in kernel order
    state_names: ClassVar[tuple[str, ...]]
    #: whether the rule keeps a float32 ``step`` counter per parameter (passed after the state tensors)
    counts_steps: ClassVar[bool]
    #: the native kernel's rule-specific arguments: ``(option name, C type)`` in the order of its C struct
    #: ``ta_<name>_args`` (csrc/rules/<name>.h); C types: "double", "float", "int32", "int64"
    kernel_fields: ClassVar[tuple[tuple[str, str], ...]]
    #: the rule's options: a frozen dataclass extending :class:`Options`
    options_type: ClassVar[type[Options]]

    def wd_divisor(self, o: Any) -> float:
        """``D`` of the decoupled weight decay ``w (1 - lr wd r / D)``."""
        return 1.0

    def update_is_state(self, o: Any) -> bool:
        """Whether the directions returned are state tensors that must keep the unprojected values."""
        return False

    def direction(
        self, p: Tensor, g: Tensor, state: State, step: Step, o: Any, as_tensor: bool, amp: Scaling | None = None
    ) -> Direction:
        """One tensor: update ``state`` in place; return the direction ``u`` and the step size ``s``.

        ``as_tensor``: bias corrections and other step-dependent scalars must stay
        tensors (under ``torch.compile`` or with ``capturable``), never ``.item()``.
        ``u`` may be projected in place by the engine (it may alias state on purpose).
        ``amp``: GradScaler's skip (:class:`Scaling`; ``g`` is already unscaled and predicated): state
        factors and step counters predicated so that a skipped step leaves the state as it was.
        """
        raise NotImplementedError

    def directions(
        self, p: Tensors, g: Tensors, state: States, steps: Steps, o: Any, as_tensor: bool, amp: Scaling | None = None
    ) -> Directions:
        """A list of same-device, same-dtype tensors: the multi-tensor form of :meth:`direction`.

        Returns the directions and one step size for all of them (per-tensor step
        sizes are folded into the directions, since the projection is linear).
        """
        raise NotImplementedError

    def kernel_args(self, o: Any) -> tuple[float, ...]:
        """Values of :attr:`kernel_fields` for the native kernel."""
        return tuple(float(getattr(o, f)) for f, _ in self.kernel_fields)

    def check(self, group: dict[str, Any]) -> None:
        """Raise ``ValueError`` naming the option for a group value this rule cannot take."""

    #: the field names of ``options_type`` (read once: ``dataclasses.fields`` does not trace under dynamo)
    option_fields: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "options_type" in cls.__dict__:
            cls.option_fields = tuple(f.name for f in dataclasses.fields(cls.options_type))

    def options(self, group: dict[str, Any]) -> Any:
        """The rule's options from a parameter group: its fields of the same name, and :meth:`renamed`."""
        values = {name: group[name] for name in self.option_fields if name in group}
        lr = values.get("lr")
        if isinstance(lr, Tensor) and lr.dim() > 0:  # any one-element tensor, as torch.optim accepts
            values["lr"] = lr.reshape(())
        return self.options_type(**{**values, **self.renamed(group)})

    def renamed(self, group: dict[str, Any]) -> dict[str, Any]:
        """Options whose group key differs from the option name (AdamP: ``betas`` -> ``beta1``, ``beta2``)."""
        return {}
