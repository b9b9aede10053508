"""A projected optimizer of your own, on the extension point: RMSprop with AdamP's projection (RMSpropP).

A projected optimizer is a *rule* (its options, its state and its update direction) over the shared
projection: the engine runs the scale-invariance test, the radial removal, the decoupled weight decay and
the step on every path. This file uses only the public API (``torch_adamp.rule``, ``torch_adamp.checks``
and ``torch_adamp.ProjectedOptimizer``); run it to see RMSpropP step a small BatchNorm CNN on the default,
``foreach=True``, ``foreach=False``, ``fused=True`` and compiled paths, and through ``torch.amp.GradScaler``::

    python examples/custom_rule.py

The math, per parameter ``w`` with gradient ``g`` and running average ``v`` of ``g^2``::

    v <- alpha v + (1 - alpha) g^2
    u  = g / (sqrt(v) + eps)
    u, r = proj(w, g, u)                     (the engine: r = wd_ratio where projected, else 1)
    w <- w (1 - lr wd r) - lr u

Without a native kernel the rule runs on the per-tensor and multi-tensor paths, and ``fused=True`` is
``torch.compile`` of the multi-tensor path (a kernel would be ``csrc/rules/rmspropp.h``).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from torch_adamp import ProjectedOptimizer, checks
from torch_adamp.rule import NO_SCALING, Directions, Options, Rule, Scaling, States, Steps, option


@dataclass(frozen=True)
class RMSpropPOptions(Options):
    alpha: float = option(0.99, "coefficient of the running average of g^2", check=checks.below_one)


class RMSpropPRule(Rule[RMSpropPOptions]):
    name = "rmspropp"
    options_type = RMSpropPOptions
    state_names = ("square_avg",)

    def directions(
        self,
        p: list[Tensor],
        g: list[Tensor],
        state: States,
        steps: Steps,
        o: RMSpropPOptions,
        as_tensor: bool,
        scaling: Scaling = NO_SCALING,
    ) -> Directions:
        (V,) = state
        torch._foreach_mul_(V, scaling.factor(o.alpha, 1.0))  # 1 where GradScaler skips the step: V unchanged
        torch._foreach_addcmul_(V, g, g, value=1 - o.alpha)
        denom = torch._foreach_sqrt(V)
        torch._foreach_add_(denom, o.eps)
        return list(torch._foreach_div(g, denom)), o.lr


class RMSpropP(ProjectedOptimizer):
    """RMSprop with the radial component of the update removed for scale-invariant weights."""

    rule = RMSpropPRule()

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-3,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        delta: float = 0.1,
        wd_ratio: float = 0.1,
        *,
        scale_invariant: checks.ScaleInvariant = "auto",
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        track_stats: bool = False,
        fp32_state: bool = True,
        caution: bool = False,
    ) -> None:
        # the group defaults: every argument but the parameters (the rule's options and the optimizer's keys)
        defaults = {k: v for k, v in locals().items() if k not in ("self", "params", "__class__")}
        super().__init__(params, defaults)


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),  # followed by BatchNorm: scale-invariant
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


def train(path: str, steps: int = 8) -> tuple[list[Tensor], dict[str, float]]:
    """A few steps on fixed random data; returns the weights and the last step's statistics."""
    net = model()
    kwargs: dict[str, Any] = {
        "default": {},
        "foreach": {"foreach": True},
        "per-tensor": {"foreach": False},
        "fused": {"fused": True},
        "compiled": {},
        "grad-scaler": {},
    }[path]
    opt = RMSpropP(net.named_parameters(), lr=3e-3, weight_decay=1e-2, track_stats=True, **kwargs)
    step = torch.compile(opt.step, fullgraph=True, backend="eager") if path == "compiled" else opt.step
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if path == "grad-scaler" else None
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(16, 3, 8, 8, generator=gen), torch.randint(0, 4, (16,), generator=gen)
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            step()
    return [p.detach().clone() for p in net.parameters()], opt.stats()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="training steps per path (default 8)")
    steps = parser.parse_args(argv).steps
    ref, stats = train("per-tensor", steps)
    views = {k.removesuffix("/view"): int(v) for k, v in stats.items() if k.endswith("/view")}
    print("views of the last step (0 none, 1 channel, 2 layer):", views)
    for path in ("default", "foreach", "fused", "compiled", "grad-scaler"):
        got, _ = train(path, steps)
        diff = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item() for a, b in zip(got, ref, strict=True))
        print(f"{path:>12}: largest relative difference to the per-tensor path {diff:.1e}")
        assert diff < 1e-4, (path, diff)
    assert views["0.weight"] == 1 and views["3.weight"] == 1, views  # the convs before BatchNorm: projected
    print("RMSpropP ran on every path")


if __name__ == "__main__":
    main()
