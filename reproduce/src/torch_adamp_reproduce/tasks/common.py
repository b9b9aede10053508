"""The training loop, summary, verdict and plots shared by the ``reproduce`` tasks.

A task describes itself as an :class:`Experiment` (model factory, one epoch of
batches, the loss, the evaluation, the tracked scale-invariant weights and the
hyperparameters of its optimizer family); :func:`run` trains the baseline and
its projected twin with every seed on identical initial weights and batch
order, and records per run the final metrics, the curves, the norm of the
tracked weights and the mean effective step size ``lr / ||w||^2`` (averaged
over the tracked weights and the logged steps).
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..progress import progress_bar
from ..training import LABELS, PROJECTED, build_optimizer, implementation, mean_std, weight_stats


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch, numpy and random; return a torch generator seeded alike (for batch order)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    return torch.Generator().manual_seed(seed)


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    higher_is_better: bool = True
    fmt: str = ".2f"


@dataclass
class Experiment:
    """What :func:`run` needs from a task. ``batches(gen)`` yields one epoch of batches in an order drawn
    from ``gen``; ``loss(model, batch)`` is the training loss (it may itself run an attack);
    ``evaluate(model)`` returns every metric (in eval mode, set by the caller; gradients are on, for attacks);
    ``tracked(model)`` names the scale-invariant weights whose norms are followed; ``final(model)``, if given,
    keeps more from each trained model in its run's ``extras`` (e.g. sample outputs), and ``extra_plots``
    draws more PNGs from the results."""

    name: str
    title: str
    optimizers: tuple[str, ...]
    metrics: tuple[Metric, ...]
    make_model: Callable[[], nn.Module]
    batches: Callable[[torch.Generator], Iterable[Any]]
    steps_per_epoch: int
    loss: Callable[[nn.Module, Any], Tensor]
    evaluate: Callable[[nn.Module], dict[str, float]]
    tracked: Callable[[nn.Module], list[str]]
    lr: float
    weight_decay: float
    epochs: int
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9
    evals_per_epoch: int = 2
    data_note: str = ""
    param_groups: Callable[[nn.Module], Iterable[tuple[str, nn.Parameter]]] | None = None
    #: further weights whose projection share (SGDP/AdamP) is recorded, without joining the norms
    watched: Callable[[nn.Module], list[str]] | None = None
    #: anything else to keep from the trained model (eval mode), stored in the run's ``extras``
    final: Callable[[nn.Module], dict[str, Any]] | None = None
    #: further PNGs from results.json's content, written into the task's folder by ``run_task``
    extra_plots: Callable[[dict[str, Any], Path], list[Path]] | None = None


@dataclass
class RunResult:
    optimizer: str
    seed: int
    metrics: dict[str, float]
    final_weight_norm: float  # norm of all tracked weights together
    mean_effective_step: float  # lr / ||w||^2 over tracked weights and logged steps
    projected_fraction: float | None  # SGDP/AdamP: share of (logged step, tracked weight) pairs projected
    projected_by_weight: dict[str, float] | None
    seconds: float
    curves: dict[str, list[float]] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)  # Experiment.final's result


def _evaluate(exp: Experiment, model: nn.Module) -> dict[str, float]:
    was = model.training
    model.eval()
    out = exp.evaluate(model)
    model.train(was)
    return out


def train_one(exp: Experiment, name: str, seed: int, on_step: Callable[[float], None] | None = None) -> RunResult:
    """Train one model with optimizer ``name`` and ``seed`` under a cosine schedule (no warm-up)."""
    start = time.perf_counter()
    gen = seed_everything(seed)
    model = exp.make_model()
    names = exp.tracked(model)
    watched = exp.watched(model) if exp.watched is not None else []
    named = exp.param_groups(model) if exp.param_groups is not None else model.named_parameters()
    opt = build_optimizer(name, named, lr=exp.lr, weight_decay=exp.weight_decay, momentum=exp.momentum, betas=exp.betas)
    total = exp.epochs * exp.steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / total)))
    log_every = max(1, total // 100)
    eval_at = {
        round(exp.steps_per_epoch * k / exp.evals_per_epoch) for k in range(1, exp.evals_per_epoch * exp.epochs + 1)
    }
    first = _evaluate(exp, model)
    curves: dict[str, list[float]] = {"eval_epoch": [0.0], **{k: [v] for k, v in first.items()}}
    curves.update(log_epoch=[], loss=[], weight_norm=[], effective_step=[])
    projected: list[list[bool]] = []
    step = 0
    running = 0.0
    model.train()
    for _ in range(exp.epochs):
        for batch in exp.batches(gen):
            loss = exp.loss(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            value = loss.item()
            running += value
            if step % log_every == 0 or step == total:
                norms, eff, proj = weight_stats(opt, model, names)
                if proj is not None:
                    projected.append(proj + (weight_stats(opt, model, watched)[2] or []))
                curves["log_epoch"].append(step / exp.steps_per_epoch)
                curves["loss"].append(running / (log_every if step % log_every == 0 else step % log_every))
                running = 0.0
                curves["weight_norm"].append(math.sqrt(sum(v * v for v in norms)))
                curves["effective_step"].append(statistics.fmean(eff))
            sched.step()
            if step in eval_at:
                curves["eval_epoch"].append(step / exp.steps_per_epoch)
                for k, v in _evaluate(exp, model).items():
                    curves[k].append(v)
            if on_step is not None:
                on_step(value)
    extras: dict[str, Any] = {}
    if exp.final is not None:
        model.eval()
        extras = exp.final(model)
    by_weight = (
        {n: statistics.fmean(p[i] for p in projected) for i, n in enumerate([*names, *watched])} if projected else None
    )
    return RunResult(
        optimizer=name,
        seed=seed,
        metrics={k: curves[k][-1] for k in first},
        final_weight_norm=curves["weight_norm"][-1],
        mean_effective_step=statistics.fmean(curves["effective_step"]),
        projected_fraction=statistics.fmean(x for p in projected for x in p[: len(names)]) if projected else None,
        projected_by_weight=by_weight,
        seconds=time.perf_counter() - start,
        curves=curves,
        extras=extras,
    )


#: two-sided 95% critical values of Student's t by degrees of freedom (1.96 beyond the table)
T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23, 15: 2.13, 20: 2.09}


def t95(df: int) -> float:
    """Two-sided 95% critical value of Student's t with ``df`` degrees of freedom (conservative between
    tabulated values)."""
    if df < 1:
        raise ValueError(f"t95: need at least 1 degree of freedom, got {df}")
    return next((T95[k] for k in sorted(T95) if k >= df), 1.96) if df not in T95 else T95[df]


def paired_gain(base: Sequence[float], proj: Sequence[float], higher_is_better: bool) -> dict[str, Any]:
    """Projected minus baseline per seed (sign flipped when lower is better, so > 0 is a gain): mean, std,
    standard error and the verdict of a two-sided paired t-test at 5%: "gain" or "loss" when
    ``|mean| > t95(n - 1) * stderr``, else "within noise" (a single seed: "one seed")."""
    d = [(p - b) * (1 if higher_is_better else -1) for b, p in zip(base, proj, strict=True)]
    m, sd = mean_std(d)
    se = sd / math.sqrt(len(d)) if len(d) > 1 else math.nan
    if len(d) < 2:
        verdict = "one seed"
    elif abs(m) > t95(len(d) - 1) * se:
        verdict = "gain" if m > 0 else "loss"
    else:
        verdict = "within noise"
    return {"mean": m, "std": sd, "stderr": se, "verdict": verdict, "per_seed": d}


def se_text(se: float, fmt: str) -> str:
    """A standard error as printed: ``n/a`` for a single seed (``paired_gain`` stores NaN: no spread to estimate)."""
    return "n/a" if math.isnan(se) else f"{se:{fmt}}"


def summarize(exp: Experiment, runs: Sequence[RunResult]) -> dict[str, Any]:
    """Per optimizer: mean and std (over seeds) of every metric, the weight norm and the effective step;
    per projected optimizer: the paired gain over its baseline on every metric."""
    per: dict[str, Any] = {}
    for name in exp.optimizers:
        mine = sorted((r for r in runs if r.optimizer == name), key=lambda r: r.seed)
        row: dict[str, Any] = {"label": LABELS[name], "implementation": implementation(name)}
        row["seeds"] = [r.seed for r in mine]
        for m in exp.metrics:
            row[m.key] = mean_std([r.metrics[m.key] for r in mine])
        row["weight_norm"] = mean_std([r.final_weight_norm for r in mine])
        row["effective_step"] = mean_std([r.mean_effective_step for r in mine])
        fracs = [r.projected_fraction for r in mine if r.projected_fraction is not None]
        row["projected_fraction"] = statistics.fmean(fracs) if fracs else None
        per[name] = row
    gains: dict[str, Any] = {}
    for proj, base in PROJECTED.items():
        if proj in per and base in per:
            b = sorted((r for r in runs if r.optimizer == base), key=lambda r: r.seed)
            p = sorted((r for r in runs if r.optimizer == proj), key=lambda r: r.seed)
            gains[proj] = {
                m.key: paired_gain([r.metrics[m.key] for r in b], [r.metrics[m.key] for r in p], m.higher_is_better)
                for m in exp.metrics
            }
    return {"optimizers": per, "gains": gains}


def format_table(exp: Experiment, summary: dict[str, Any]) -> str:
    """One line per optimizer: every metric (mean +- std), tracked-weight norm, mean lr/|w|^2."""
    cols = [m.label for m in exp.metrics] + ["weight norm", "mean lr/|w|^2"]
    head = f"{'optimizer':<10}" + "".join(f" {c:>17}" for c in cols)
    lines = [head, "-" * len(head)]
    for row in summary["optimizers"].values():
        cells = [f"{row[m.key][0]:{m.fmt}} +- {row[m.key][1]:{m.fmt}}" for m in exp.metrics]
        cells.append(f"{row['weight_norm'][0]:.2f} +- {row['weight_norm'][1]:.2f}")
        cells.append(f"{row['effective_step'][0]:.3e}")
        lines.append(f"{row['label']:<10}" + "".join(f" {c:>17}" for c in cells))
    for proj, g in summary["gains"].items():
        parts = [
            f"{m.label} {g[m.key]['mean']:+{m.fmt}} (se {se_text(g[m.key]['stderr'], m.fmt)}, {g[m.key]['verdict']})"
            for m in exp.metrics
        ]
        lines.append(f"{LABELS[proj]} - {LABELS[PROJECTED[proj]]} (> 0 is a gain): " + "; ".join(parts))
    return "\n".join(lines)


def run(
    exp: Experiment, seeds: Sequence[int], *, quiet: bool = False, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Train every optimizer of ``exp`` with every seed; return results.json's content."""
    jobs = [(s, name) for s in seeds for name in exp.optimizers]
    log(
        f"{exp.title}: {exp.data_note}; {exp.epochs} epoch(s), seeds {seeds[0]}..{seeds[-1]}, "
        f"{torch.get_num_threads()} thread(s)"
    )
    runs: list[RunResult] = []
    start = time.perf_counter()
    with progress_bar(total=len(jobs) * exp.epochs * exp.steps_per_epoch, unit="step", quiet=quiet) as bar:
        for seed, name in jobs:
            bar.set_description(f"{exp.name} {LABELS[name]} seed {seed}")

            def on_step(loss: float) -> None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

            runs.append(train_one(exp, name, seed, on_step))
    return {
        "task": exp.name,
        "title": exp.title,
        "data": exp.data_note,
        "hyperparameters": {
            "optimizers": list(exp.optimizers),
            "lr": exp.lr,
            "weight_decay": exp.weight_decay,
            "betas": list(exp.betas),
            "momentum": exp.momentum,
            "epochs": exp.epochs,
            "steps_per_epoch": exp.steps_per_epoch,
            "schedule": "cosine, no warm-up",
        },
        "metrics": [asdict(m) for m in exp.metrics],
        "threads": torch.get_num_threads(),
        "seconds": time.perf_counter() - start,
        "summary": summarize(exp, runs),
        "runs": [asdict(r) for r in runs],
    }


# -- plots -------------------------------------------------------------------------------
STYLES = {"sgd": ("tab:blue", "--"), "sgdp": ("tab:blue", "-"), "adamw": ("tab:red", "--"), "adamp": ("tab:red", "-")}


def plot(results: dict[str, Any], out: Path) -> Path:
    """curves.png: every metric over training, the training loss, the tracked-weight norm and the mean
    effective step size (mean over seeds, band min..max; baseline dashed, projected solid)."""
    from matplotlib.figure import Figure

    metrics = results["metrics"]
    panels = [(m["key"], "eval_epoch", m["label"], "linear") for m in metrics]
    panels += [
        ("loss", "log_epoch", "training loss", "log"),
        ("weight_norm", "log_epoch", "norm of the tracked weights", "linear"),
        ("effective_step", "log_epoch", "lr / |w|^2 (mean over tracked weights)", "log"),
    ]
    ncol = 3 if len(panels) in (5, 6) else min(4, len(panels))
    nrow = math.ceil(len(panels) / ncol)
    fig = Figure(figsize=(4.2 * ncol, 3.4 * nrow + 0.4), layout="constrained")
    axes = fig.subplots(nrow, ncol, squeeze=False).ravel()
    for ax, (key, xkey, label, scale) in zip(axes, panels, strict=False):
        for name in results["hyperparameters"]["optimizers"]:
            runs = [r for r in results["runs"] if r["optimizer"] == name]
            color, ls = STYLES[name]
            x = np.asarray(runs[0]["curves"][xkey])
            ys = np.asarray([r["curves"][key] for r in runs])
            if xkey == "eval_epoch" and len(x) > 1:  # leave out the untrained model so that the differences show
                x, ys = x[1:], ys[:, 1:]
            ax.plot(x, ys.mean(0), color=color, ls=ls, label=LABELS[name])
            if len(runs) > 1:
                ax.fill_between(x, ys.min(0), ys.max(0), color=color, alpha=0.15, lw=0)
        if key == "effective_step":  # the cosine schedule ends at lr ~ 0: keep the scale on the rest
            top = ax.get_ylim()[1]
            ax.set_ylim(max(ax.get_ylim()[0], top * 1e-3), top)
        ax.set(xlabel="epoch", ylabel=label, yscale=scale)
        ax.legend(fontsize=8)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(f"{results['title']}: mean over seeds, band min..max")
    path = out / "curves.png"
    fig.savefig(path, dpi=100)
    return path


def index_batches(n: int, batch_size: int, gen: torch.Generator) -> list[Tensor]:
    """One epoch of ``n // batch_size`` random index batches (the last partial batch is dropped)."""
    order = torch.randperm(n, generator=gen)
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(n // batch_size)]


def conv_weight_names(model: nn.Module) -> list[str]:
    """Names of every conv weight (in these models each is followed by BatchNorm: scale-invariant)."""
    return [f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
