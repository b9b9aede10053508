"""Classification: the existing ``compare`` (SGD vs SGDP, AdamW vs AdamP on a BatchNorm CNN, Fashion-MNIST)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import compare
from ..training import LABELS, PROJECTED, implementation
from .common import Metric, paired_gain

PAPER = {
    "pair": "both",
    "text": "ImageNet top-1, ResNet18: SGD 70.28 -> SGDP 70.73 (+0.45), AdamW 70.41 -> AdamP 70.81 (+0.40); "
    "MobileNetV2 +0.57 / +0.45, ResNet50 +0.07 / +0.29",
    "gain": "+0.07 .. +0.57",
}
METRICS = (Metric("test_accuracy", "test acc (%)"),)


def run(epochs: int | None, seeds: list[int], *, quiet: bool, log: Any, out: Path, **overrides: Any) -> dict[str, Any]:
    """``compare`` with its defaults (``epochs``, ``seeds`` and any ``compare.Config`` field in
    ``overrides`` aside); results in the ``reproduce`` layout, PNGs from ``plots.compare_plots``."""
    from .. import plots

    cfg = compare.Config(seeds=len(seeds), first_seed=seeds[0], **overrides)
    if epochs is not None:
        cfg.epochs = epochs
    res = compare.run(cfg, quiet=quiet, log=log)
    plots.compare_plots(res, out)
    per: dict[str, Any] = {}
    runs = res["runs"]
    for name in cfg.optimizers:
        s = res["summary"][name]
        mine = [r for r in runs if r["optimizer"] == name]
        fr = [r["projected_fraction"] for r in mine if r["projected_fraction"] is not None]
        per[name] = {
            "label": LABELS[name],
            "implementation": implementation(name),
            "seeds": s["seeds"],
            "test_accuracy": (s["test_accuracy_mean"], s["test_accuracy_std"]),
            "weight_norm": (s["weight_norm_mean"], s["weight_norm_std"]),
            "effective_step": (s["effective_step_mean"], s["effective_step_std"]),
            "projected_fraction": sum(fr) / len(fr) if fr else None,
        }
    gains = {}
    for proj, base in PROJECTED.items():
        b = sorted((r for r in runs if r["optimizer"] == base), key=lambda r: r["seed"])
        p = sorted((r for r in runs if r["optimizer"] == proj), key=lambda r: r["seed"])
        gains[proj] = {
            "test_accuracy": paired_gain([r["test_accuracy"] for r in b], [r["test_accuracy"] for r in p], True)
        }
    return {
        "task": "classification",
        "title": "Classification: BatchNorm CNN on Fashion-MNIST (torch-adamp compare)",
        "data": f"Fashion-MNIST ({res['data_source']}), {cfg.train_size} training / {cfg.test_size} test images",
        "hyperparameters": {
            k: res["config"][k]
            for k in ("optimizers", "sgd_lr", "momentum", "sgd_weight_decay", "adam_lr", "adam_weight_decay", "epochs")
        }
        | {"schedule": res["config"]["schedule"]},
        "metrics": [{"key": m.key, "label": m.label, "higher_is_better": True, "fmt": m.fmt} for m in METRICS],
        "threads": res["threads"],
        "seconds": res["seconds"],
        "summary": {"optimizers": per, "gains": gains},
        "runs": runs,
    }
