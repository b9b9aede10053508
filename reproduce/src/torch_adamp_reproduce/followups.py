"""The late-training gradient-norm rise (Defazio et al. 2025) under AdamW, AdamC, AdamP and AdamP with the correction.

``python -m torch_adamp_reproduce.followups`` trains ``compare``'s BatchNorm CNN on Fashion-MNIST with a cosine
schedule to zero and four optimizers on the same seeds (same initial weights and batch order per seed):
AdamW, AdamW with AdamC's corrected weight decay (``adamwc``: timm's ``adamc``), AdamP, and AdamP with the
correction where it projects (``adampc``). It records, per optimizer, the gradient norm of the scale-invariant
(conv) weights over training (AdamC's symptom: it rises in the last phase, as ``lr`` decays and the decay
keeps shrinking ``||w||``), their norm, the effective step ``lr / ||w||^2``, and the final test accuracy, and
compares them pairwise with the paired t-test and verdict rule of the other experiments
(:func:`torch_adamp_reproduce.tasks.common.paired_gain`). Writes ``results.json``, ``followups.md`` (the
table) and ``followups.png`` (the figure) to ``--out``.

The *late rise* of a run is the mean gradient norm over the last 10% of training divided by its mean over
40%-60% of training (1: no rise); the *norm shrink* is the conv-weight norm at half of training over its
final value (the mechanism AdamC corrects: the decay shrinking ``||w||`` while ``lr`` decays, and the
gradient of a normalised weight scaling as ``1 / ||w||``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from . import compare, fashion_mnist
from .tasks.common import paired_gain
from .training import mean_std

OPTIMIZERS = ("adamw", "adamwc", "adamp", "adampc")
#: (baseline, candidate) pairs compared with the paired t-test
PAIRS = (("adamw", "adamwc"), ("adamw", "adamp"), ("adamp", "adampc"), ("adamwc", "adampc"))


@dataclass
class Config:
    epochs: int = 3
    seeds: int = 3
    first_seed: int = 0
    train_size: int = 20000
    test_size: int = 5000
    adam_lr: float = 3e-3
    adam_weight_decay: float = 0.1
    threads: int = 1


def late_rise(epoch: list[float], grad: list[float]) -> float:
    """Mean gradient norm over the last 10% of training over its mean over 40%-60% (1: no rise)."""
    end = epoch[-1]
    last = [g for e, g in zip(epoch, grad, strict=True) if e >= 0.9 * end]
    mid = [g for e, g in zip(epoch, grad, strict=True) if 0.4 * end <= e <= 0.6 * end]
    return statistics.fmean(last) / statistics.fmean(mid)


def norm_shrink(epoch: list[float], norm: list[float]) -> float:
    """The weight norm at half of training over its final value (> 1: it shrank in the second half)."""
    half = min(range(len(epoch)), key=lambda i: abs(epoch[i] - epoch[-1] / 2))
    return norm[half] / norm[-1]


#: logged steps (100 per run) of the gradient norm's running mean in the figure
SMOOTH = 7


def running_mean(y: list[float], k: int) -> list[float]:
    """The mean of each value and the up to ``k - 1`` values before it."""
    return [statistics.fmean(y[max(0, i - k + 1) : i + 1]) for i in range(len(y))]


def run(cfg: Config, out: Path, log: Any = print) -> dict[str, Any]:
    torch.set_num_threads(cfg.threads)
    data = fashion_mnist.load(train_size=cfg.train_size, test_size=cfg.test_size, image_size=14)
    ccfg = compare.Config(
        epochs=cfg.epochs,
        seeds=cfg.seeds,
        first_seed=cfg.first_seed,
        train_size=cfg.train_size,
        test_size=cfg.test_size,
        optimizers=OPTIMIZERS,
        adam_lr=cfg.adam_lr,
        adam_weight_decay=cfg.adam_weight_decay,
        schedule="cosine",
    )
    seeds = list(range(cfg.first_seed, cfg.first_seed + cfg.seeds))
    runs: list[dict[str, Any]] = []
    for seed in seeds:
        for name in OPTIMIZERS:
            wall, cpu = time.perf_counter(), time.process_time()
            r = compare.train_one(name, seed, data, ccfg)
            row = {
                "optimizer": name,
                "seed": seed,
                "test_accuracy": r.test_accuracy,
                "final_weight_norm": r.final_weight_norm,
                "late_rise": late_rise(r.curves["log_epoch"], r.curves["grad_norm"]),
                "norm_shrink": norm_shrink(r.curves["log_epoch"], r.curves["weight_norm"]),
                "wall_seconds": time.perf_counter() - wall,
                "cpu_seconds": time.process_time() - cpu,
                "curves": r.curves,
            }
            runs.append(row)
            log(
                f"{compare.LABELS[name]:8s} seed {seed}: acc {row['test_accuracy']:.2f}%, late rise "
                f"{row['late_rise']:.3f}, |w| {row['final_weight_norm']:.2f} ({row['wall_seconds']:.0f} s wall, "
                f"{row['cpu_seconds']:.0f} s CPU)"
            )
    results = {"config": asdict(cfg), "data_source": data.source, "runs": runs, **summarize(runs)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "followups.md").write_text(format_table(results) + "\n")
    plot(results, out / "followups.png")
    return results


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    per: dict[str, Any] = {}
    for name in OPTIMIZERS:
        mine = sorted((r for r in runs if r["optimizer"] == name), key=lambda r: r["seed"])
        per[name] = {
            key: mean_std([r[key] for r in mine])
            for key in ("test_accuracy", "late_rise", "norm_shrink", "final_weight_norm", "wall_seconds", "cpu_seconds")
        }
    gains: dict[str, Any] = {}
    for base, cand in PAIRS:
        b = sorted((r for r in runs if r["optimizer"] == base), key=lambda r: r["seed"])
        c = sorted((r for r in runs if r["optimizer"] == cand), key=lambda r: r["seed"])
        gains[f"{cand} vs {base}"] = {
            "test_accuracy": paired_gain([r["test_accuracy"] for r in b], [r["test_accuracy"] for r in c], True),
            "late_rise": paired_gain([r["late_rise"] for r in b], [r["late_rise"] for r in c], False),
            "norm_shrink": paired_gain([r["norm_shrink"] for r in b], [r["norm_shrink"] for r in c], False),
        }
    return {"summary": per, "gains": gains}


def format_table(results: dict[str, Any]) -> str:
    lines = [
        "| optimizer | test accuracy (%) | late rise of the grad norm | norm shrink (half / end) "
        "| final conv-weight norm | wall s / CPU s per run |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, s in results["summary"].items():
        acc, rise, norm = s["test_accuracy"], s["late_rise"], s["final_weight_norm"]
        shrink = s["norm_shrink"]
        lines.append(
            f"| {compare.LABELS[name]} | {acc[0]:.2f} ± {acc[1]:.2f} | {rise[0]:.3f} ± {rise[1]:.3f} | "
            f"{shrink[0]:.3f} ± {shrink[1]:.3f} | {norm[0]:.2f} ± {norm[1]:.2f} | "
            f"{s['wall_seconds'][0]:.0f} / {s['cpu_seconds'][0]:.0f} |"
        )
    lines += [
        "",
        "| pair | accuracy gain (points) | verdict | late-rise reduction | verdict | norm-shrink reduction | verdict |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for pair, g in results["gains"].items():
        a, r, n = g["test_accuracy"], g["late_rise"], g["norm_shrink"]
        cand, base = pair.split(" vs ")
        lines.append(
            f"| {compare.LABELS[cand]} vs {compare.LABELS[base]} | {a['mean']:+.2f} ± {a['stderr']:.2f} "
            f"| {a['verdict']} | {r['mean']:+.3f} ± {r['stderr']:.3f} | {r['verdict']} "
            f"| {n['mean']:+.3f} ± {n['stderr']:.3f} | {n['verdict']} |"
        )
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    colors = {"adamw": "tab:blue", "adamwc": "tab:cyan", "adamp": "tab:red", "adampc": "tab:orange"}
    panels = (
        ("grad_norm", f"gradient norm of the conv weights ({SMOOTH}-log running mean)", False),
        ("weight_norm", "conv-weight norm", False),
        ("effective_step", "lr / |w|^2 (mean over conv weights)", True),
    )
    for ax, (key, title, log_y) in zip(axes, panels, strict=False):
        for name in OPTIMIZERS:
            mine = [r for r in results["runs"] if r["optimizer"] == name]
            x = mine[0]["curves"]["log_epoch"]
            ys = [r["curves"][key] for r in mine]
            if key == "grad_norm":  # per-batch norms: a running mean shows the trend
                ys = [running_mean(y, SMOOTH) for y in ys]
            mean = [statistics.fmean(v) for v in zip(*ys, strict=True)]
            ax.plot(x, mean, color=colors[name], label=compare.LABELS[name], lw=1.3)
            if len(ys) > 1:
                lo = [min(v) for v in zip(*ys, strict=True)]
                hi = [max(v) for v in zip(*ys, strict=True)]
                ax.fill_between(x, lo, hi, color=colors[name], alpha=0.15, lw=0)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        if log_y:
            ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    ax = axes[3]
    names = list(OPTIMIZERS)
    accs: list[tuple[float, float]] = [tuple(results["summary"][n]["test_accuracy"]) for n in names]
    ax.bar(range(len(names)), [a[0] for a in accs], yerr=[a[1] for a in accs], color=[colors[n] for n in names])
    ax.set_xticks(range(len(names)), [compare.LABELS[n] for n in names], fontsize=8)
    bottom = min(a[0] - 2 * a[1] for a in accs)
    ax.set_ylim(math.floor(bottom - 1), math.ceil(max(a[0] + 2 * a[1] for a in accs) + 0.5))
    ax.set_title("final test accuracy (%), mean ± std over seeds", fontsize=10)
    fig.suptitle(
        f"Fashion-MNIST BatchNorm CNN, cosine schedule to zero, {results['config']['epochs']} epochs, seeds "
        f"{results['config']['first_seed']}..{results['config']['first_seed'] + results['config']['seeds'] - 1}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    d = Config()
    p = argparse.ArgumentParser(prog="python -m torch_adamp_reproduce.followups", description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--seeds", type=int, default=d.seeds)
    p.add_argument("--first-seed", type=int, default=d.first_seed)
    p.add_argument("--train-size", type=int, default=d.train_size)
    p.add_argument("--test-size", type=int, default=d.test_size)
    p.add_argument("--adam-lr", type=float, default=d.adam_lr)
    p.add_argument("--adam-weight-decay", type=float, default=d.adam_weight_decay)
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--out", default="results/followups")
    p.add_argument(
        "--plot-only", action="store_true", help="redraw OUT/followups.png and the table from OUT/results.json"
    )
    a = p.parse_args(argv)
    if a.plot_only:
        results = json.loads((Path(a.out) / "results.json").read_text())
        plot(results, Path(a.out) / "followups.png")
        (Path(a.out) / "followups.md").write_text(format_table(results) + "\n")
        print(format_table(results))
        return 0
    cfg = Config(a.epochs, a.seeds, a.first_seed, a.train_size, a.test_size, a.adam_lr, a.adam_weight_decay, a.threads)
    results = run(cfg, Path(a.out))
    print(format_table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
