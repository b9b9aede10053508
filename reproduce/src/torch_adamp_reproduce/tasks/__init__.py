"""``torch-adamp reproduce``: one small offline task per family of the paper's benchmarks.

Every task trains a baseline (``torch.optim.SGD`` / ``torch.optim.AdamW``) and
its projected twin (``SGDP`` / ``AdamP``, same hyperparameters) over several
seeds with identical initial weights and batch order per seed, and records the
task's metrics, the norm of the scale-invariant weights and the mean effective
step size ``lr / ||w||^2``. See docs/reproduction.md for the measured table.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..training import LABELS, PROJECTED
from . import adversarial, audio, bias, classification, common, detection, language, retrieval


@dataclass(frozen=True)
class Task:
    name: str
    help: str
    seeds: int
    paper: dict[str, str]
    build: Callable[[int | None], common.Experiment] | None  # None: classification (compare)


def _build(module: Any, **fixed: Any) -> Callable[[int | None], common.Experiment]:
    def build(epochs: int | None) -> common.Experiment:
        cfg = module.Config(**fixed)
        if epochs is not None:
            cfg.epochs = epochs
        exp: common.Experiment = module.experiment(cfg)
        return exp

    return build


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task(
            "classification",
            "SGD/SGDP and AdamW/AdamP, BatchNorm CNN on Fashion-MNIST (= compare)",
            3,
            classification.PAPER,
            None,
        ),
        Task(
            "retrieval",
            "ProxyAnchor metric learning, Recall@1/2/4/8 on unseen Fashion-MNIST classes",
            5,
            retrieval.PAPER,
            _build(retrieval),
        ),
        Task(
            "detection",
            "CenterNet from scratch on cluttered Fashion-MNIST canvases; COCO AP (pycocotools)",
            3,
            detection.PAPER,
            _build(detection),
        ),
        Task(
            "adversarial",
            "PGD l-inf adversarial training; standard and PGD-10 accuracy",
            3,
            adversarial.PAPER,
            _build(adversarial),
        ),
        Task(
            "bias",
            "colour-biased Fashion-MNIST (Biased MNIST recipe); unbiased test accuracy",
            5,
            bias.PAPER,
            _build(bias),
        ),
        Task(
            "language",
            "char Transformer LM on the KJV with weight norm; validation perplexity",
            3,
            language.PAPER_WN,
            _build(language, weight_norm=True),
        ),
        Task(
            "language-plain",
            "the same LM without weight norm",
            3,
            language.PAPER_PLAIN,
            _build(language, weight_norm=False),
        ),
        Task(
            "audio",
            "keyword spotting on espeak-ng speech, log-mel BN-CNN; test accuracy",
            3,
            audio.PAPER,
            _build(audio),
        ),
    )
}


def run_task(
    name: str,
    *,
    epochs: int | None,
    seeds: int | None,
    first_seed: int,
    out: Path,
    quiet: bool,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run one task, write ``out/results.json`` and its PNGs, print its table; return the results."""
    task = TASKS[name]
    seed_list = list(range(first_seed, first_seed + (seeds or task.seeds)))
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if task.build is None:
        res = classification.run(epochs, seed_list, quiet=quiet, log=log, out=out)
        table = format_summary(res, classification.METRICS)
    else:
        exp = task.build(epochs)
        res = common.run(exp, seed_list, quiet=quiet, log=log)
        common.plot(res, out)
        if exp.extra_plots is not None:
            exp.extra_plots(res, out)
        table = common.format_table(exp, res["summary"])
    res["paper"] = task.paper
    res["wall_seconds"] = time.perf_counter() - start
    (out / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    log("")
    log(table)
    log(f"paper: {task.paper['text']}")
    log(f"{res['wall_seconds']:.0f} s; wrote {out}/results.json and PNGs")
    return res


def format_summary(res: dict[str, Any], metrics: Any) -> str:
    lines = []
    for row in res["summary"]["optimizers"].values():
        cells = "  ".join(f"{m.label} {row[m.key][0]:{m.fmt}} +- {row[m.key][1]:{m.fmt}}" for m in metrics)
        lines.append(
            f"{row['label']:<6} {cells}  weight norm {row['weight_norm'][0]:.2f}  "
            f"mean lr/|w|^2 {row['effective_step'][0]:.3e}"
        )
    for proj, g in res["summary"]["gains"].items():
        for m in metrics:
            lines.append(
                f"{LABELS[proj]} - {LABELS[PROJECTED[proj]]}: {m.label} {g[m.key]['mean']:+{m.fmt}} "
                f"(se {common.se_text(g[m.key]['stderr'], m.fmt)}, {g[m.key]['verdict']})"
            )
    return "\n".join(lines)


def markdown_table(results: dict[str, dict[str, Any]]) -> str:
    """The table of docs/reproduction.md: one row per (task, pair, metric)."""
    head = (
        "| task | metric | baseline | projected | gain (paired, ± s.e.) | verdict | paper's gain | "
        "weight norm base → proj | mean lr/‖w‖² base → proj | projected share | seeds | time (s) |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, res in results.items():
        per = res["summary"]["optimizers"]
        for proj, gains in res["summary"]["gains"].items():
            base = PROJECTED[proj]
            b, p = per[base], per[proj]
            paper = res["paper"]["gain"]
            for i, m in enumerate(res["metrics"]):
                g = gains[m["key"]]
                f = m["fmt"]
                share = "" if p["projected_fraction"] is None else f"{100 * p['projected_fraction']:.0f}%"
                lines.append(
                    f"| {name} | {m['label']} | "
                    f"{LABELS[base]} {b[m['key']][0]:{f}} ± {b[m['key']][1]:{f}} | "
                    f"{LABELS[proj]} {p[m['key']][0]:{f}} ± {p[m['key']][1]:{f}} | "
                    f"{g['mean']:+{f}} ± {common.se_text(g['stderr'], f)} | {g['verdict']} | "
                    f"{paper if i == 0 else '—'} | "
                    f"{b['weight_norm'][0]:.2f} → {p['weight_norm'][0]:.2f} | "
                    f"{b['effective_step'][0]:.2e} → {p['effective_step'][0]:.2e} | "
                    f"{share} | {len(b['seeds'])} | {res['wall_seconds']:.0f} |"
                )
    return "\n".join(lines)
