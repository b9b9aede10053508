"""``torch-adamp toy``: the paper's toy problems on scale-invariant functions (Heo et al., ICLR 2021).

2D toy: ``L(w) = ||w/||w|| - w*/||w*|| ||^2`` on ``w`` in R^2, ``||w0|| = 1``, ``w0``
nearly opposite ``w*``, 500 steps of lr 0.01 with GD, GD + momentum
(``p = beta p + g``) and GD + momentum + projection (the radial component of
each momentum step removed). The gradient is orthogonal to ``w``, so plain GD
barely grows ``||w||``; momentum grows it a lot, which shrinks the effective
step size ``lr / ||w||^2``; the projection keeps it near 1.

3D toy: the Rosenbrock function laid on the upper hemisphere, so that the
radial axis is redundant: ``f(w) = R(s w1 / w3, s w2 / w3)`` (gnomonic map, scale
``s = 3``) with ``R(x, y) = (1 - x)^2 + b (y - x^2)^2``, ``b = 10``. Start
``(x, y) = (-2, 2)`` at radius 1, optimum ``(1, 1)``, 200 iterations of momentum
0.9: momentum GD, momentum GD + weight decay (L2, as in ``torch.optim.SGD``),
and momentum GD + projection. The paper does not give its map nor its
constants; these reproduce its story (momentum: the radius grows to ~3 and the
run stalls short of the optimum; weight decay: the radius peaks ~2.5, then
shrinks below 1; projection: the radius stays ~1.1 and the run reaches the
optimum).

The projection is :class:`torch_adamp.SGDP` with ``project_momentum=False``:
the step is projected, the stored momentum keeps the raw gradients, as in the
paper's algorithm box. (The reference package's default also projects the
stored buffer; on the 2D toy that gives larger final norms, 1.17 / 1.30 / 1.84.)
The weight ``w`` is one row of shape ``(1, d)``, a single "channel".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

import torch_adamp

METHODS_2D = ("gd", "momentum", "projection")
METHODS_3D = ("momentum", "weight_decay", "projection")
LABELS = {
    "gd": "GD",
    "momentum": "GD + momentum",
    "projection": "GD + momentum + projection",
    "weight_decay": "GD + momentum + weight decay",
}
#: final weight norms reported by the authors (June 2020 project page)
PAPER_NORMS_2D = {
    0.9: {"gd": 1.02, "momentum": 2.93, "projection": 1.12},
    0.95: {"gd": 1.02, "momentum": 5.67, "projection": 1.14},
    0.99: {"gd": 1.02, "momentum": 27.87, "projection": 1.15},
}
W_STAR = (1.0, 0.0)
OFFSET_DEG = 0.13  # w0 is this many degrees away from -w*
ROSEN_SCALE, ROSEN_B = 3.0, 10.0
ROSEN_START, ROSEN_OPTIMUM = (-2.0, 2.0), (1.0, 1.0)
LR_3D, MOMENTUM_3D, WEIGHT_DECAY_3D = 3.5e-4, 0.9, 1.8


@dataclass
class Trajectory:
    """Weights before the first and after every step, ``(steps + 1, d)``, and the final loss."""

    method: str
    momentum: float
    weights: Tensor
    loss: float

    @property
    def norms(self) -> Tensor:
        norms: Tensor = self.weights.norm(dim=1)
        return norms

    @property
    def final_norm(self) -> float:
        return float(self.norms[-1])


def _optimizer(method: str, w: Tensor, lr: float, momentum: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    if method == "gd":
        return torch.optim.SGD([w], lr=lr)
    if method == "momentum":
        return torch.optim.SGD([w], lr=lr, momentum=momentum)
    if method == "weight_decay":
        return torch.optim.SGD([w], lr=lr, momentum=momentum, weight_decay=weight_decay)
    if method == "projection":
        return torch_adamp.SGDP([w], lr=lr, momentum=momentum, project_momentum=False)
    raise ValueError(f"unknown method {method!r}")


def _descend(
    loss_fn: Callable[[Tensor], Tensor],
    w0: Sequence[float],
    method: str,
    *,
    steps: int,
    lr: float,
    momentum: float,
    weight_decay: float = 0.0,
    on_step: Callable[[], None] | None = None,
) -> Trajectory:
    w = torch.tensor([list(w0)], dtype=torch.float64, requires_grad=True)
    opt = _optimizer(method, w, lr, momentum, weight_decay)
    weights = [w.detach()[0].clone()]
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(w[0]).backward()
        opt.step()
        weights.append(w.detach()[0].clone())
        if on_step is not None:
            on_step()
    with torch.no_grad():
        final = float(loss_fn(w[0]))
    return Trajectory(method, momentum, torch.stack(weights), final)


# -- 2D ----------------------------------------------------------------------------------
def loss_2d(w: Tensor, w_star: Sequence[float] = W_STAR) -> Tensor:
    """``||w/||w|| - w*/||w*|| ||^2``: depends on the direction of ``w`` only."""
    target = torch.tensor(w_star, dtype=w.dtype)
    loss: Tensor = (w / w.norm() - target / target.norm()).square().sum()
    return loss


def start_2d(offset_deg: float = OFFSET_DEG) -> tuple[float, float]:
    """Unit vector ``offset_deg`` degrees away from the direction opposite ``w*``."""
    angle = math.atan2(W_STAR[1], W_STAR[0]) + math.pi - math.radians(offset_deg)
    return math.cos(angle), math.sin(angle)


def run_2d(
    momenta: Sequence[float] = (0.9, 0.95, 0.99),
    *,
    steps: int = 500,
    lr: float = 0.01,
    offset_deg: float = OFFSET_DEG,
    on_step: Callable[[], None] | None = None,
) -> dict[float, dict[str, Trajectory]]:
    """``{momentum: {method: trajectory}}`` (GD ignores the momentum)."""
    w0 = start_2d(offset_deg)
    out: dict[float, dict[str, Trajectory]] = {}
    gd = None
    for beta in momenta:
        out[beta] = {}
        for method in METHODS_2D:
            if method == "gd" and gd is not None:
                out[beta][method] = gd
                continue
            out[beta][method] = _descend(loss_2d, w0, method, steps=steps, lr=lr, momentum=beta, on_step=on_step)
            if method == "gd":
                gd = out[beta][method]
    return out


def format_table_2d(results: dict[float, dict[str, Trajectory]], *, steps: int, lr: float) -> str:
    head = f"{'momentum':<9}" + "".join(f"{LABELS[m]:>29}" for m in METHODS_2D)
    lines = [
        f"2D toy: ||w/|w| - w*/|w*| ||^2, {steps} steps, lr {lr:g}, |w0| = 1 at {180 - OFFSET_DEG:g} deg from w*"
        " -- final loss / final |w| (paper's |w| in brackets)",
        head,
        "-" * len(head),
    ]
    for beta, runs in results.items():
        cells = []
        for m in METHODS_2D:
            t = runs[m]
            paper = PAPER_NORMS_2D.get(beta, {}).get(m)
            ref = f" [{paper:.2f}]" if paper is not None and steps == 500 and lr == 0.01 else ""
            cells.append(f"{t.loss:.4f} / {t.final_norm:.2f}{ref}".rjust(29))
        lines.append(f"{beta:<9g}" + "".join(cells))
    return "\n".join(lines)


# -- 3D ----------------------------------------------------------------------------------
def plane_coords(w: Tensor) -> tuple[Tensor, Tensor]:
    """Gnomonic map of the upper hemisphere onto the plane: ``(s w1 / w3, s w2 / w3)``."""
    return ROSEN_SCALE * w[..., 0] / w[..., 2], ROSEN_SCALE * w[..., 1] / w[..., 2]


def rosenbrock(x: Tensor, y: Tensor) -> Tensor:
    return (1 - x) ** 2 + ROSEN_B * (y - x * x) ** 2


def loss_3d(w: Tensor) -> Tensor:
    """Rosenbrock on the hemisphere: invariant to the radius of ``w``."""
    return rosenbrock(*plane_coords(w))


def start_3d() -> tuple[float, float, float]:
    x, y = ROSEN_START
    v = torch.tensor([x / ROSEN_SCALE, y / ROSEN_SCALE, 1.0], dtype=torch.float64)
    a, b, c = (v / v.norm()).tolist()
    return (a, b, c)


def run_3d(*, steps: int = 200, on_step: Callable[[], None] | None = None) -> dict[str, Trajectory]:
    return {
        m: _descend(
            loss_3d,
            start_3d(),
            m,
            steps=steps,
            lr=LR_3D,
            momentum=MOMENTUM_3D,
            weight_decay=WEIGHT_DECAY_3D,
            on_step=on_step,
        )
        for m in METHODS_3D
    }


def format_table_3d(results: dict[str, Trajectory], *, steps: int) -> str:
    head = f"{'method':<30}{'final (x, y)':>18}{'to optimum':>12}{'loss':>10}{'max |w|':>9}{'final |w|':>11}"
    lines = [
        f"3D toy: Rosenbrock on a hemisphere, start {ROSEN_START}, optimum {ROSEN_OPTIMUM}, {steps} iterations",
        f"(momentum {MOMENTUM_3D:g}, lr {LR_3D:g}; weight decay {WEIGHT_DECAY_3D:g}, L2 as in torch.optim.SGD)",
        head,
        "-" * len(head),
    ]
    for m, t in results.items():
        x, y = (float(c) for c in plane_coords(t.weights[-1]))
        dist = math.hypot(x - ROSEN_OPTIMUM[0], y - ROSEN_OPTIMUM[1])
        xy = f"({x:.3f}, {y:.3f})"
        lines.append(
            f"{LABELS[m]:<30}{xy:>18}{dist:>12.3f}{t.loss:>10.4f}{float(t.norms.max()):>9.2f}{t.final_norm:>11.2f}"
        )
    return "\n".join(lines)


def summary(results_2d: dict[float, dict[str, Trajectory]], results_3d: dict[str, Trajectory]) -> dict[str, Any]:
    """Final numbers as plain JSON-able data."""
    return {
        "toy2d": {
            str(beta): {m: {"loss": t.loss, "norm": t.final_norm} for m, t in runs.items()}
            for beta, runs in results_2d.items()
        },
        "toy3d": {
            m: {
                "xy": [float(c) for c in plane_coords(t.weights[-1])],
                "loss": t.loss,
                "max_norm": float(t.norms.max()),
                "norm": t.final_norm,
            }
            for m, t in results_3d.items()
        },
    }
