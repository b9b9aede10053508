"""The tensors of one step, as one bundle: parameters, gradients, state lists and step counters."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class Bundle:
    """``params[i]``, ``grads[i]``, ``states[k][i]`` (one list per name of the rule's ``state_names``) and
    ``steps[i]`` (the float32 counters when the rule counts steps, else ``None``) belong to parameter ``i``."""

    params: Sequence[Tensor]
    grads: Sequence[Tensor]
    states: Sequence[Sequence[Tensor]]
    steps: Sequence[Tensor] | None = None

    def __len__(self) -> int:
        return len(self.params)

    def take(self, idx: Sequence[int] | None) -> Bundle:
        """The bundle of the parameters at ``idx`` (``None``: all of them, as lists)."""
        if idx is None:
            steps = list(self.steps) if self.steps is not None else None
            return Bundle(list(self.params), list(self.grads), [list(s) for s in self.states], steps)
        return Bundle(
            [self.params[i] for i in idx],
            [self.grads[i] for i in idx],
            [[s[i] for i in idx] for s in self.states],
            [self.steps[i] for i in idx] if self.steps is not None else None,
        )

    def lists(self) -> list[Sequence[Tensor]]:
        """``[params, grads, *states]`` and, when counted, ``steps``: in the order of the native kernel's table."""
        out = [self.params, self.grads, *self.states]
        return [*out, self.steps] if self.steps is not None else out

    def stored(self) -> list[Tensor]:
        """Every tensor a step writes: the parameters, then the state tensors in order."""
        return [*self.params, *(t for s in self.states for t in s)]

    def holds(
        self,
        params: Sequence[Tensor],
        states: Sequence[Sequence[Tensor]],
        steps: Sequence[Tensor] | None,
        param_ptrs: list[int],
    ) -> bool:
        """Whether this bundle holds exactly these tensors (identity, in C-level passes) with the parameters'
        storage still at ``param_ptrs``: what a plan built for them checks before it is reused."""
        if not (len(self.params) == len(params) and all(map(operator.is_, self.params, params))):
            return False
        if not all(all(map(operator.is_, a, b)) for a, b in zip(self.states, states, strict=True)):
            return False
        if (self.steps is None) != (steps is None) or (
            self.steps is not None and steps is not None and not all(map(operator.is_, self.steps, steps))
        ):
            return False
        return list(map(Tensor.data_ptr, self.params)) == param_ptrs
