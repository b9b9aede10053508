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


class Rule:
    """One optimizer's direction. Subclasses are stateless singletons; see the module docstring."""

    #: the rule's name; also the name of its native kernel (``torch_adamp_<name>_f32``) and custom op
    name: ClassVar[str]
    #: per-parameter state tensors, zeros shaped like the parameter, in kernel order
    state_names: ClassVar[tuple[str, ...]]
    #: whether the rule keeps a float32 ``step`` counter per parameter (passed after the state tensors)
    counts_steps: ClassVar[bool]
    #: the native kernel's rule-specific arguments, in the order of its C struct
    kernel_fields: ClassVar[tuple[str, ...]]
    #: the rule's options: a frozen dataclass extending :class:`Options`
    options_type: ClassVar[type[Options]]

    def wd_divisor(self, o: Any) -> float:
        """``D`` of the decoupled weight decay ``w (1 - lr wd r / D)``."""
        return 1.0

    def update_is_state(self, o: Any) -> bool:
        """Whether the directions returned are state tensors that must keep the unprojected values."""
        return False

    def direction(self, p: Tensor, g: Tensor, state: State, step: Step, o: Any, as_tensor: bool) -> Direction:
        """One tensor: update ``state`` in place; return the direction ``u`` and the step size ``s``.

        ``as_tensor``: bias corrections and other step-dependent scalars must stay
        tensors (under ``torch.compile`` or with ``capturable``), never ``.item()``.
        ``u`` may be projected in place by the engine (it may alias state on purpose).
        """
        raise NotImplementedError

    def directions(self, p: Tensors, g: Tensors, state: States, steps: Steps, o: Any, as_tensor: bool) -> Directions:
        """A list of same-device, same-dtype tensors: the multi-tensor form of :meth:`direction`.

        Returns the directions and one step size for all of them (per-tensor step
        sizes are folded into the directions, since the projection is linear).
        """
        raise NotImplementedError

    def kernel_args(self, o: Any) -> tuple[float, ...]:
        """Values of :attr:`kernel_fields` for the native kernel."""
        return tuple(float(getattr(o, f)) for f in self.kernel_fields)

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
