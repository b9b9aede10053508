"""PNG plots of ``toy`` and ``compare`` (matplotlib's object API, no pyplot, no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import compare, toy

COLORS = {"gd": "tab:gray", "momentum": "tab:red", "weight_decay": "tab:orange", "projection": "tab:blue"}
#: baseline dashed, projected solid, one hue per pair
STYLES = {
    "sgd": ("tab:blue", "--"),
    "sgdp": ("tab:blue", "-"),
    "adamw": ("tab:red", "--"),
    "adamp": ("tab:red", "-"),
}


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    return path


# -- toy ---------------------------------------------------------------------------------
def toy_2d(results: dict[float, dict[str, toy.Trajectory]], out: Path, lr: float = 0.01) -> list[Path]:
    """Trajectories in the plane; norm and effective step size ``lr / ||w||^2`` over the steps."""
    fig = _figure(4.2 * len(results), 4.2)
    axes = fig.subplots(1, len(results), squeeze=False)[0]
    circle = np.linspace(0, 2 * np.pi, 200)
    for ax, (beta, runs) in zip(axes, results.items(), strict=True):
        ax.plot(np.cos(circle), np.sin(circle), color="0.8", lw=1)
        for m, t in runs.items():
            w = t.weights.numpy()
            ax.plot(w[:, 0], w[:, 1], color=COLORS[m], label=f"{toy.LABELS[m]} (|w| {t.final_norm:.2f})")
        ax.plot(*runs["gd"].weights[0].numpy(), "ko", ms=4)
        ax.plot(*toy.W_STAR, "k*", ms=10, label="w*")
        ax.set_aspect("equal", adjustable="datalim")
        ax.set_title(f"momentum {beta:g}")
        ax.legend(fontsize=7, loc="lower left")
    fig.suptitle("2D toy: trajectories of w (the loss depends on the direction only)")
    paths = [_save(fig, out / "toy2d_trajectories.png")]

    fig = _figure(10, 4)
    ax_n, ax_e = fig.subplots(1, 2)
    dashes = {b: ls for b, ls in zip(results, ["-", "--", ":", "-."] * 4, strict=False)}
    for beta, runs in results.items():
        for m, t in runs.items():
            if m == "gd" and beta != next(iter(results)):
                continue
            label = toy.LABELS[m] + ("" if m == "gd" else f", momentum {beta:g}")
            n = t.norms.numpy()
            ax_n.plot(n, color=COLORS[m], ls=dashes[beta], label=label)
            ax_e.plot(lr / n**2, color=COLORS[m], ls=dashes[beta], label=label)
    ax_n.set(yscale="log", xlabel="step", ylabel="|w|", title="weight norm")
    ax_e.set(yscale="log", xlabel="step", ylabel="lr / |w|^2", title="effective step size")
    ax_n.legend(fontsize=7)
    paths.append(_save(fig, out / "toy2d_norms.png"))
    return paths


def toy_3d(results: dict[str, toy.Trajectory], out: Path) -> list[Path]:
    """The paths on the hemisphere and in the plane (over Rosenbrock's contours), and the radius."""
    import torch

    fig = _figure(11, 4.8)
    ax3 = fig.add_subplot(1, 2, 1, projection="3d")
    ax2 = fig.add_subplot(1, 2, 2)
    u, v = np.meshgrid(np.linspace(0, 2 * np.pi, 40), np.linspace(0, np.pi / 2, 12))
    ax3.plot_wireframe(np.cos(u) * np.sin(v), np.sin(u) * np.sin(v), np.cos(v), color="0.85", lw=0.5)
    xs, ys = np.meshgrid(np.linspace(-2.5, 2.0, 200), np.linspace(-0.5, 3.0, 200))
    z = toy.rosenbrock(torch.from_numpy(xs), torch.from_numpy(ys)).numpy()
    ax2.contour(xs, ys, np.log1p(z), levels=25, cmap="Greys", linewidths=0.6)
    for m, t in results.items():
        w = t.weights.numpy()
        ax3.plot(w[:, 0], w[:, 1], w[:, 2], color=COLORS[m], label=toy.LABELS[m])
        x, y = (c.numpy() for c in toy.plane_coords(t.weights))
        ax2.plot(x, y, ".-", ms=2, lw=1, color=COLORS[m], label=toy.LABELS[m])
    ax2.plot(*toy.ROSEN_START, "ko", ms=5)
    ax2.plot(*toy.ROSEN_OPTIMUM, "k*", ms=12, label="optimum")
    ax2.set(xlim=(-2.5, 2.0), ylim=(-0.5, 3.0), xlabel="x", ylabel="y", title="path in the plane")
    ax2.legend(fontsize=7)
    ax3.set(title="path of w in R^3 (unit hemisphere in grey)")
    paths = [_save(fig, out / "toy3d_path.png")]

    fig = _figure(6, 4)
    ax = fig.subplots()
    for m, t in results.items():
        ax.plot(t.norms.numpy(), color=COLORS[m], label=toy.LABELS[m])
    ax.axhline(1.0, color="0.7", lw=0.8)
    ax.set(xlabel="iteration", ylabel="|w|", title="3D toy: radius of w")
    ax.legend(fontsize=8)
    paths.append(_save(fig, out / "toy3d_radius.png"))
    return paths


# -- compare ------------------------------------------------------------------------------
def _mean_band(runs: Sequence[dict[str, Any]], xkey: str, ykey: str) -> tuple[np.ndarray, ...]:
    x = np.asarray(runs[0]["curves"][xkey])
    ys = np.asarray([r["curves"][ykey] for r in runs])
    return x, ys.mean(0), ys.min(0), ys.max(0)


def _compare_panel(ax: Any, results: dict[str, Any], xkey: str, ykey: str) -> None:
    for name in results["config"]["optimizers"]:
        runs = [r for r in results["runs"] if r["optimizer"] == name]
        color, ls = STYLES.get(name, ("k", "-"))
        x, mean, lo, hi = _mean_band(runs, xkey, ykey)
        ax.plot(x, mean, color=color, ls=ls, label=compare.LABELS[name])
        if len(runs) > 1:
            ax.fill_between(x, lo, hi, color=color, alpha=0.15, lw=0)
    if ykey == "effective_step":  # a cosine schedule ends at lr ~ 0: keep the scale on the rest
        top = ax.get_ylim()[1]
        ax.set_ylim(max(ax.get_ylim()[0], top * 1e-3), top)


def _accuracy_ylim(ax: Any, results: dict[str, Any]) -> None:
    """Leave out the 10% of the untrained model so that the differences show."""
    after_first = [a for r in results["runs"] for a in r["curves"]["accuracy"][1:]]
    if after_first:
        ax.set_ylim(max(0.0, min(after_first) - 2.0), min(100.0, max(after_first) + 1.0))


_PANELS = {
    "accuracy": ("eval_epoch", "accuracy", "test accuracy (%)", "linear"),
    "weight_norm": ("log_epoch", "weight_norm", "norm of the conv weights", "linear"),
    "effective_step": ("log_epoch", "effective_step", "lr / |w|^2 (mean over conv layers)", "log"),
}


def compare_plots(results: dict[str, Any], out: Path) -> list[Path]:
    """accuracy.png, weight_norm.png, effective_step.png (one line per optimizer, mean over seeds,
    band = min..max) and compare.png with the three side by side."""
    cfg = results["config"]
    what = f"{cfg['image_size']}x{cfg['image_size']}, {cfg['train_size']} images, {cfg['epochs']} epoch(s)"
    paths = []
    for key, (xkey, ykey, ylabel, scale) in _PANELS.items():
        fig = _figure(6, 4)
        ax = fig.subplots()
        _compare_panel(ax, results, xkey, ykey)
        ax.set(xlabel="epoch", ylabel=ylabel, yscale=scale, title=f"Fashion-MNIST BN-CNN ({what})")
        if key == "accuracy":
            _accuracy_ylim(ax, results)
        ax.legend()
        paths.append(_save(fig, out / f"{key}.png"))
    fig = _figure(16, 4.2)
    for ax, (key, (xkey, ykey, ylabel, scale)) in zip(fig.subplots(1, 3), _PANELS.items(), strict=True):
        _compare_panel(ax, results, xkey, ykey)
        ax.set(xlabel="epoch", ylabel=ylabel, yscale=scale)
        if key == "accuracy":
            _accuracy_ylim(ax, results)
        ax.legend(fontsize=8)
    fig.suptitle(f"SGD vs SGDP and AdamW vs AdamP on Fashion-MNIST ({what}); mean over seeds, band min..max")
    paths.append(_save(fig, out / "compare.png"))
    return paths
