"""``OrthoGrad(inner)``: the gradient's radial component removed, its norm restored, before any optimizer.

Prieto et al., "Grokking at the Edge of Numerical Stability" (2025, arXiv 2501.04697), as
pytorch_optimizer's ``OrthoGrad`` wrapper applies it: per tensor, unconditionally (every tensor with a
gradient, whatever its shape), in the *layer* view of the projection::

    c = <w,g> / (||w||^2 + eps)          (the projection's layer coefficient, torch_adamp.projection,
                                          with pytorch_optimizer's eps placement: 0 at w = 0)
    g <- (g - c w) * ||g|| / (||g - c w|| + eps)        (0 where ||g - c w|| <= 8 sqrt(eps_dtype) ||g||)

then ``inner.step()``. It is AdamP's radial removal applied to the gradient instead of the update, with no
scale-invariance test (every weight is treated as if it were scale-invariant in the layer view) and the
norm restored. Its sums come from :class:`torch_adamp.projection.RowDecision` (``mode="layer"``) over one
row per tensor: the per-tensor sums ``<w,g>``, ``||w||^2``, ``||g||^2`` of every tensor are its packed
totals, so DTensor (FSDP2) parameters take the one packed ``all_reduce`` of the projection
(:func:`torch_adamp.distributed.finish`), and ``||g - c w||^2 = ||g||^2 - 2 c <w,g> + c^2 ||w||^2`` is
computed from them (no second reduction; its cancellation resolves ``||g - c w||`` down to about
``sqrt(eps_dtype) ||g||``, so a gradient closer to radial than ``8 sqrt(eps_dtype) ||g||``, 0.16 degrees in
float32, becomes 0 where pytorch_optimizer zeroes below ``4 eps_dtype ||g||``: a one-element tensor's
gradient, always radial, is 0 in both). Nothing is read to the host; the step compiles with
``torch.compile(fullgraph=True)`` where ``inner.step`` does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from .. import checks, distributed, projection
from ..engine import precision
from .wrapper import Wrapper

__all__ = ["OrthoGrad", "orthogonalize"]


class OrthoGrad(Wrapper):
    r"""Gradients orthogonal to their weights (norm restored) before ``inner`` steps (pytorch_optimizer's name).

    Shares ``inner.param_groups`` and ``inner.state`` (the same objects), as :class:`~torch_adamp.Projected`
    does: schedulers, ``zero_grad``, ``state_dict`` / ``load_state_dict`` (delegated to ``inner``) work as with
    ``inner``. ``p.grad`` is rewritten in place (as pytorch_optimizer's wrapper does). Composes with
    ``Projected``: ``Projected(OrthoGrad(inner))`` is refused (``Projected`` wraps a plain optimizer); use
    ``OrthoGrad(Projected(inner))``, whose inner step then projects the update of the orthogonalised gradient.

    Args:
        inner: a constructed optimizer over the parameters.
        eps: added to ``||w||^2`` in the coefficient and to ``||g - c w||`` in the rescaling (pytorch_optimizer's
            wrapper: ``1e-30``).
    """

    def __init__(self, inner: Optimizer, *, eps: float = 1e-30) -> None:
        if not isinstance(inner, Optimizer):
            raise TypeError(f"OrthoGrad wraps a torch.optim.Optimizer, got {type(inner).__name__}")
        checks.nonneg("eps", eps)
        self._ready = False
        self.inner = inner
        self.eps = float(eps)
        for g in inner.param_groups:
            self._check_params(g)
        super().__init__([{"params": []}], {})
        self._ready = True
        self.defaults = inner.defaults

    # -- the inner optimizer's containers ----------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not self._ready:
            return  # Optimizer.__init__'s placeholder
        if not isinstance(param_group.get("params"), Tensor):
            param_group["params"] = list(param_group["params"])
        self._check_params(param_group)
        self.inner.add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.inner.load_state_dict(state_dict)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def __repr__(self) -> str:
        return f"OrthoGrad({self.inner!r})"

    @staticmethod
    def _check_params(group: dict[str, Any]) -> None:
        params = group.get("params", [])
        checks.parameters(group, [params] if isinstance(params, Tensor) else params, "OrthoGrad", float_only=False)

    # -- the step ---------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Rewrite every gradient (see the module docstring), then ``inner.step()``."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        waiting: list[_Bucket] = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError("OrthoGrad does not support sparse gradients (it needs <w, g> of whole tensors)")
            if params:
                waiting += orthogonalize(params, [p.grad for p in params], eps=self.eps, group=group)
        distributed.finish(waiting)  # one collective for every group's sharded tensors, then the rewrite
        scaling = checks.scaling_tensors(self)
        if scaling[0] is None and scaling[1] is None:
            self.inner.step()
        else:  # GradScaler's grad_scale / found_inf forwarded to inner for its step
            self.inner.grad_scale, self.inner.found_inf = scaling  # type: ignore[attr-defined]
            try:
                self.inner.step()
            finally:
                for k in ("grad_scale", "found_inf"):
                    self.inner.__dict__.pop(k, None)
        return loss


def orthogonalize(
    params: Sequence[Tensor], grads: Sequence[Tensor], *, eps: float = 1e-30, group: dict[str, Any] | None = None
) -> list[_Bucket]:
    """Phase 1 of the rewrite of ``grads`` (in place) for ``params``, per device/dtype bucket: the per-tensor
    sums. Finish with :func:`torch_adamp.distributed.finish` (sums the sharded ones in one collective, then
    rewrites). ``group``: the parameter group, for error messages about its DTensors."""
    grp = group if group is not None else {"params": list(params)}
    dist, (P, G) = distributed.localize(
        {**grp, "scale_invariant": False},  # OrthoGrad takes flat shards too: its sums need no rows
        params,
        grads,
        describe=lambda i, p: checks.describe(grp, i, p),
        optimizer="OrthoGrad",
    )
    layouts = None
    if dist is not None:
        layouts = [
            distributed.sum_layout(p, lambda i=i, p=p: checks.describe(grp, i, p))  # type: ignore[misc]
            for i, p in enumerate(params)
        ]
    out = []
    for idx in precision.group_by_device_and_dtype(range(len(P)), P).values():
        out.append(
            _Bucket([P[i] for i in idx], [G[i] for i in idx], eps, [layouts[i] for i in idx] if layouts else None)
        )
    return out


class _Bucket:
    """The rewrite of one device/dtype bucket between its two phases (see :func:`orthogonalize`)."""

    def __init__(self, params: list[Tensor], grads: list[Tensor], eps: float, layouts: Any) -> None:
        self.grads = grads
        self.w = [precision.upcast(p).reshape(1, -1) for p in params]
        self.g = [precision.upcast(g).reshape(1, -1) for g in grads]
        self.eps = eps
        shapes = [lay.shape for lay in layouts] if layouts is not None else [w.shape for w in self.w]
        self.decision: projection.RowDecision | None = projection.RowDecision(
            projection.channel_row_sums(self.w, self.g, self.g),  # <w,g>, ||w||^2, ||g||^2, <w,g> per tensor
            shapes,
            delta=0.0,
            eps=eps,
            mode="layer",
            local_rows=[1] * len(params),
        )
        self.decision.layouts = layouts

    def finish(self) -> None:
        d = self.decision
        assert d is not None
        # per tensor, from the (summed) totals: c = <w,g> / (||w||^2 + eps), pytorch_optimizer's form of the
        # projection's layer coefficient (the same up to where eps enters; also 0, not 0/0, at w = 0)
        wg, ww, gg = d.totals[:, 1], d.totals[:, 2], d.totals[:, 3]
        c = wg / (ww + self.eps)
        perp = (gg - 2 * c * wg + c * c * ww).clamp_min(0).sqrt()  # ||g - c w||, from the sums
        norm = gg.sqrt()
        # radial within what the sums resolve: ||g - c w||^2 from them carries a few eps_dtype ||g||^2 of
        # cancellation, so below 8 sqrt(eps_dtype) ||g|| the direction left is rounding (pytorch_optimizer,
        # whose norm is of g - c w itself, zeroes below 4 eps_dtype ||g||): zero, not rounding scaled up to ||g||
        tiny = 8.0 * torch.finfo(c.dtype).eps ** 0.5
        scale = torch.where(perp <= tiny * norm, torch.zeros_like(norm), norm / (perp + self.eps))
        out = torch._foreach_addcmul(self.g, self.w, [x.reshape(1, 1) for x in c.unbind()], value=-1)  # g - c w
        torch._foreach_mul_(out, list(scale.unbind()))
        for g, o in zip(self.grads, out, strict=True):
            g.copy_(o.view_as(g))
