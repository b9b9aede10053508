"""PNG plots of ``toy`` and ``compare`` (matplotlib's object API, no pyplot, no display needed)."""

from __future__ import annotations

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
        ax.set(title=f"momentum {beta:g}", xlabel="w[0]", ylabel="w[1]")
        ax.legend(fontsize=7, loc="lower left")
    fig.suptitle("2D toy: trajectories of w (the loss depends on the direction only)")
    paths = [_save(fig, out / "toy2d_trajectories.png")]

    from matplotlib.lines import Line2D

    fig = _figure(10, 4.6)
    ax_n, ax_e = fig.subplots(1, 2)
    dashes = {b: ls for b, ls in zip(results, ["-", "--", ":", "-."] * 4, strict=False)}
    finals: dict[str, list[tuple[int, float]]] = {}
    for beta, runs in results.items():
        for m, t in runs.items():
            if m == "gd" and beta != next(iter(results)):
                continue  # plain GD has no momentum: one curve
            n = t.norms.numpy()
            style = {"color": COLORS[m], "ls": "-" if m == "gd" else dashes[beta]}
            ax_n.plot(n, **style)
            ax_e.plot(lr / n**2, **style)
            if m != "gd":
                finals.setdefault(m, []).append((len(n) - 1, float(n[-1])))
    ax_n.set(yscale="log", xlabel="step", ylabel="|w|", title="weight norm (final value at the right)")
    ax_e.set(yscale="log", xlabel="step", ylabel="lr / |w|^2", title="effective step size lr / |w|^2")
    for m, ends in finals.items():  # the final norms at the right; one label for curves that end together
        values = [v for _, v in ends]
        groups = [ends] if max(values) < 1.3 * min(values) else [[e] for e in ends]
        for g in groups:
            x, y = max(e[0] for e in g), max(e[1] for e in g)
            text = " / ".join(f"{v:.2f}" for _, v in g)
            ax_n.annotate(text, (x, y), xytext=(3, 4 if len(g) > 1 else 0), textcoords="offset points",
                          va="bottom" if len(g) > 1 else "center", ha="right" if len(g) > 1 else "left",
                          fontsize=7, color=COLORS[m])  # fmt: skip
    ax_n.margins(x=0.1)
    handles = [Line2D([], [], color=COLORS[m], label=toy.LABELS[m]) for m in next(iter(results.values()))]
    handles += [Line2D([], [], color="k", ls=dashes[b], label=f"momentum {b:g}") for b in results]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.suptitle("2D toy: with momentum the norm grows and the effective step collapses; the projection keeps both")
    paths.append(_save(fig, out / "toy2d_norms.png"))
    return paths


def toy_3d(results: dict[str, toy.Trajectory], out: Path) -> list[Path]:
    """The paths on the hemisphere and in the plane (over Rosenbrock's contours), and the radius."""
    import torch

    fig = _figure(12, 5.2)
    ax3 = fig.add_subplot(1, 2, 1, projection="3d", computed_zorder=False)
    ax2 = fig.add_subplot(1, 2, 2)
    u, v = np.meshgrid(np.linspace(0, 2 * np.pi, 40), np.linspace(0, np.pi / 2, 12))
    ax3.plot_wireframe(np.cos(u) * np.sin(v), np.sin(u) * np.sin(v), np.cos(v), color="0.85", lw=0.5, zorder=0)
    xs, ys = np.meshgrid(np.linspace(-2.5, 2.0, 200), np.linspace(-0.5, 3.0, 200))
    z = toy.rosenbrock(torch.from_numpy(xs), torch.from_numpy(ys)).numpy()
    ax2.contour(xs, ys, np.log1p(z), levels=25, cmap="Greys", linewidths=0.6)
    # the projected path last and thickest, on top of the others (computed_zorder=False: drawn in this order)
    widths = {"projection": 2.4}
    for order, (m, t) in enumerate(results.items(), start=1):
        w = t.weights.numpy()
        lw = widths.get(m, 1.3)
        ax3.plot(w[:, 0], w[:, 1], w[:, 2], color=COLORS[m], lw=lw, label=toy.LABELS[m], zorder=order)
        ax3.plot(*w[-1], "o", color=COLORS[m], ms=4, zorder=order)
        x, y = (c.numpy() for c in toy.plane_coords(t.weights))  # in the plane: thick under thin, all visible
        ax2.plot(x, y, ".-", ms=2, lw=lw * 0.9, color=COLORS[m], label=toy.LABELS[m], zorder=6 - order)
        # the end of each path, as in the left panel (white-edged, so that ends on top of a path stay visible)
        ax2.plot(x[-1], y[-1], "o", ms=6, color=COLORS[m], mec="white", mew=0.8, zorder=10)
    w0 = next(iter(results.values())).weights[0].numpy()
    ax3.plot(*w0, "ko", ms=4, zorder=10)
    side = 1.05 * max(1.1, max(float(t.weights[:, :2].abs().max()) for t in results.values()))
    ticks = [-1, 0, 1]
    ax3.set(
        xlabel="w[0]", ylabel="w[1]", zlabel="w[2]", xticks=ticks, yticks=ticks, xlim=(-side, side), ylim=(-side, side)
    )
    top = max(1.2, max(float(t.norms.max()) for t in results.values()))
    ax3.set_zlim(0, top)
    ax3.set_zticks(range(int(top) + 1))
    ax3.zaxis.labelpad = 2
    ax3.set_box_aspect(None, zoom=0.85)
    ax3.view_init(elev=22, azim=-55)
    ax3.legend(fontsize=7, loc="upper left")
    ax3.set_title("path of w in R^3 (grey: the unit hemisphere; dot: the end)")
    ax2.plot(*toy.ROSEN_START, "ko", ms=5, label="start")
    ax2.plot(*toy.ROSEN_OPTIMUM, "k*", ms=12, label="optimum")
    ax2.set(
        xlim=(-2.5, 2.0),
        ylim=(-0.5, 3.0),
        xlabel="x",
        ylabel="y",
        title="the same paths in the plane of Rosenbrock's function (dot: the end)",
    )
    ax2.legend(fontsize=7)
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
def _runs(results: dict[str, Any], name: str) -> list[dict[str, Any]]:
    return sorted((r for r in results["runs"] if r["optimizer"] == name), key=lambda r: r["seed"])


def _band(ax: Any, x: np.ndarray, ys: np.ndarray, color: str, ls: str, label: str) -> None:
    """The mean over seeds as a line, min..max as a band."""
    ax.plot(x, ys.mean(0), color=color, ls=ls, label=label)
    if len(ys) > 1:
        ax.fill_between(x, ys.min(0), ys.max(0), color=color, alpha=0.15, lw=0)


def _accuracy(ax: Any, results: dict[str, Any]) -> None:
    """From the first evaluation on: the untrained model's 10% would squeeze the differences into a sliver."""
    for name in results["config"]["optimizers"]:
        runs = _runs(results, name)
        color, ls = STYLES.get(name, ("k", "-"))
        x = np.asarray(runs[0]["curves"]["eval_epoch"][1:])
        _band(ax, x, np.asarray([r["curves"]["accuracy"][1:] for r in runs]), color, ls, compare.LABELS[name])
    ax.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy (from the first evaluation on)")
    ax.set_xlim(0, None)


def _norm(ax: Any, results: dict[str, Any]) -> None:
    for name in results["config"]["optimizers"]:
        runs = _runs(results, name)
        color, ls = STYLES.get(name, ("k", "-"))
        x = np.asarray(runs[0]["curves"]["log_epoch"])
        _band(ax, x, np.asarray([r["curves"]["weight_norm"] for r in runs]), color, ls, compare.LABELS[name])
    ax.set(xlabel="epoch", ylabel="|w| of the conv weights together", title="norm of the scale-invariant weights")
    ax.set_xlim(0, None)


def _pairs(results: dict[str, Any]) -> list[tuple[str, str]]:
    names = results["config"]["optimizers"]
    return [(b, p) for b, p in compare.PAIRS + compare.WRAPPED_PAIRS if b in names and p in names]


def _step_ratio(ax: Any, results: dict[str, Any]) -> None:
    """lr / |w|^2 of the projected optimizer over that of its baseline, per seed (same seed, same lr at
    every step: the schedule cancels, what is left is the projection's effect on the norm)."""
    for base, proj in _pairs(results):
        b_runs = {r["seed"]: r for r in _runs(results, base)}
        ratios = [
            np.asarray(r["curves"]["effective_step"]) / np.asarray(b_runs[r["seed"]]["curves"]["effective_step"])
            for r in _runs(results, proj)
            if r["seed"] in b_runs
        ]
        if ratios:
            x = np.asarray(_runs(results, proj)[0]["curves"]["log_epoch"])
            label = f"{compare.LABELS[proj]} / {compare.LABELS[base]}"
            _band(ax, x, np.asarray(ratios), STYLES.get(proj, ("k", "-"))[0], "-", label)
    if not _pairs(results):
        ax.text(0.5, 0.5, "needs a baseline and its projected optimizer\n(e.g. --optimizers adamw,adamp)",
                ha="center", va="center", transform=ax.transAxes, color="0.4")  # fmt: skip
    ax.axhline(1.0, color="0.6", lw=0.8)
    ax.set(xlabel="epoch", ylabel="ratio of lr / |w|^2 (same seed, same lr)")
    ax.set(title="effective step size: projected over unprojected")
    ax.set_xlim(0, None)


def _step_relative(ax: Any, results: dict[str, Any]) -> None:
    """lr / |w|^2 over its value at the first logged step of the baseline: the schedule and the norm's
    growth on one linear scale for SGD and Adam alike."""
    for base, proj in _pairs(results):
        b_runs = {r["seed"]: r for r in _runs(results, base)}
        for name in (base, proj):
            color, ls = STYLES.get(name, ("k", "-"))
            rel = [
                np.asarray(r["curves"]["effective_step"]) / b_runs[r["seed"]]["curves"]["effective_step"][0]
                for r in _runs(results, name)
                if r["seed"] in b_runs
            ]
            x = np.asarray(_runs(results, name)[0]["curves"]["log_epoch"])
            _band(ax, x, np.asarray(rel), color, ls, compare.LABELS[name])
    ax.set(xlabel="epoch", ylabel="lr / |w|^2, relative to its start")
    ax.set(title="effective step size (schedule included)")
    ax.set_xlim(0, None)
    ax.set_ylim(0, None)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


def _what(results: dict[str, Any]) -> str:
    cfg = results["config"]
    seeds = len({r["seed"] for r in results["runs"]})
    return (
        f"{cfg['image_size']}x{cfg['image_size']}, {cfg['train_size']} images, {_plural(cfg['epochs'], 'epoch')}, "
        f"{_plural(seeds, 'seed')}"
    )


_PANELS = {
    "accuracy": _accuracy,
    "weight_norm": _norm,
    "effective_step": _step_relative,
    "effective_step_ratio": _step_ratio,
}


def compare_plots(results: dict[str, Any], out: Path) -> list[Path]:
    """accuracy.png, weight_norm.png, effective_step.png (lr / |w|^2 relative to its start, schedule
    included), effective_step_ratio.png (projected over unprojected: the schedule cancels) and
    compare.png with accuracy, norm and the ratio side by side; mean over seeds, band min..max."""
    what = _what(results)
    paths = []
    for key, panel in _PANELS.items():
        fig = _figure(6, 4.2)
        ax = fig.subplots()
        panel(ax, results)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        fig.suptitle(f"Fashion-MNIST BN-CNN ({what})", fontsize=9)
        paths.append(_save(fig, out / f"{key}.png"))
    fig = _figure(16, 4.8)
    for ax, panel in zip(fig.subplots(1, 3), (_accuracy, _norm, _step_ratio), strict=True):
        panel(ax, results)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(
        f"SGD vs SGDP and AdamW vs AdamP on Fashion-MNIST ({what}); mean over seeds, band min..max\n"
        "the projection keeps the norm of the scale-invariant conv weights down, so their effective step size "
        "lr/|w|^2 stays larger"
    )
    paths.append(_save(fig, out / "compare.png"))
    return paths
