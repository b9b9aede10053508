"""The base of the optimizers that wrap another (:class:`~torch_adamp.Projected`,
:class:`~torch_adamp.OrthoGrad`): they share ``inner``'s containers instead of holding their own."""

from __future__ import annotations

from typing import Any

from torch.optim import Optimizer


class Wrapper(Optimizer):
    """An optimizer around ``inner`` whose ``param_groups`` and ``state`` are ``inner``'s (the same objects),
    so schedulers, hooks and ``zero_grad`` see one set of groups. A subclass sets ``inner`` before calling
    ``Optimizer.__init__`` with a placeholder group, then ``_ready = True``: until then the assignments of
    ``Optimizer.__init__`` leave ``inner``'s containers alone (and ``add_param_group`` ignores the placeholder)."""

    inner: Optimizer
    _ready: bool = False

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.inner.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        if self._ready:
            self.inner.param_groups = value

    @property
    def state(self) -> Any:
        return self.inner.state

    @state.setter
    def state(self, value: Any) -> None:
        if self._ready:
            self.inner.state = value

    @property
    def _step_supports_amp_scaling(self) -> bool:
        """GradScaler's protocol exactly where ``inner`` has it: the wrapper's rewrite is linear in the scale of
        the gradients, so ``inner`` unscales and skips as it would alone (see each wrapper's docstring)."""
        return bool(getattr(self.inner, "_step_supports_amp_scaling", False))
