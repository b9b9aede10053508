"""``torch-adamp compare``: SGD vs SGDP and AdamW vs AdamP on a small BatchNorm CNN (Fashion-MNIST).

Every conv layer is followed by BatchNorm and has no bias, so its weight is
scale-invariant: only its direction matters, and its norm sets the effective
step size ``lr / ||w||^2``. The baselines are ``torch.optim.SGD`` and
``torch.optim.AdamW``; SGDP and AdamP are this package's, with the same
hyperparameters, on the same images, initial weights and batch order per seed.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import torch_adamp

from . import fashion_mnist
from .progress import progress_bar
from .training import BASELINE_CLASSES, LABELS, OPTIMIZERS, PAIRS, build_optimizer, mean_std, weight_stats

__all__ = ["BASELINE_CLASSES", "LABELS", "OPTIMIZERS", "PAIRS", "Config", "run"]

#: other optimizers ``--optimizers`` accepts, alone or wrapped: ``NAME+p`` is ``torch_adamp.Projected(NAME)``.
#: RAdam and NAdam use decoupled weight decay (AdamW's hyper-parameters); Adafactor its own default lr 1e-2
#: with the AdamW weight decay (decoupled); torchao's AdamW8bit AdamW's hyper-parameters; Lion (lion-pytorch)
#: ``LION_LR_FACTOR`` times the AdamW lr (its update has unit size per element), betas (0.9, 0.99), and the
#: AdamW weight decay applied as ``w <- (1 - lr wd) w``. torchao and lion-pytorch: the ``wrapped`` extra.
WRAPPABLE = {"adafactor": "Adafactor", "radam": "RAdam", "nadam": "NAdam", "adamw8bit": "AdamW8bit", "lion": "Lion"}
#: where the optimizers of WRAPPABLE come from
SOURCES = {"adamw8bit": "torchao.optim", "lion": "lion_pytorch"}
ADAFACTOR_LR = 1e-2
LION_LR_FACTOR = 0.1
for _name, _cls in WRAPPABLE.items():
    _where = SOURCES.get(_name, "torch.optim")
    LABELS[_name], LABELS[f"{_name}+p"] = _cls, f"{_cls}+P"
    BASELINE_CLASSES[_name] = f"{_where}.{_cls}"
    BASELINE_CLASSES[f"{_name}+p"] = f"torch_adamp.Projected({_where}.{_cls})"
#: each wrapped optimizer and its Projected version (plotted like PAIRS when both ran)
WRAPPED_PAIRS = tuple((w, f"{w}+p") for w in WRAPPABLE)
#: the follow-ups (docs/followups.md): AdamW and AdamP with AdamC's corrected weight decay (``adamwc``:
#: ``AdamP(scale_invariant=False, corrected_weight_decay="all")``, timm's ``adamc``; ``adampc``: AdamP with the
#: correction where it projects), and LionP (the Lion hyper-parameters above)
FOLLOWUPS = {"adamwc": "AdamW+C", "adampc": "AdamP+C", "lionp": "LionP"}
LABELS.update(FOLLOWUPS)
BASELINE_CLASSES["adamwc"] = 'torch_adamp.AdamP(scale_invariant=False, corrected_weight_decay="all")'
BASELINE_CLASSES["adampc"] = "torch_adamp.AdamP(corrected_weight_decay=True)"
#: every name ``--optimizers`` accepts (the default set is OPTIMIZERS)
CHOICES = OPTIMIZERS + tuple(n for w in WRAPPABLE for n in (w, f"{w}+p")) + tuple(FOLLOWUPS)
#: the distribution that provides each module of SOURCES (what to install)
DISTRIBUTIONS = {"torchao.optim": "torchao", "lion_pytorch": "lion-pytorch"}


def missing_packages(names: Sequence[str]) -> dict[str, str]:
    """For each of ``names`` whose optimizer comes from a package that does not import here: what it needs
    (``{"lion": "lion-pytorch (not installed)"}``); empty when every optimizer can be built."""
    import importlib

    missing: dict[str, str] = {}
    for name in dict.fromkeys(names):
        module = SOURCES.get(name.removesuffix("+p"))
        if module is None:
            continue
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name is not None and module.startswith(e.name):
                missing[name] = f"{DISTRIBUTIONS[module]} (not installed)"
            else:  # the package is there, one of its own imports is not
                missing[name] = f"{DISTRIBUTIONS[module]}, which does not import here ({e})"
        except Exception as e:  # e.g. a torchao built for another torch
            missing[name] = f"{DISTRIBUTIONS[module]}, which does not import here ({type(e).__name__}: {e})"
    return missing


@dataclass
class Config:
    """Everything a ``compare`` run depends on (written to results.json)."""

    epochs: int = 2
    seeds: int = 3
    first_seed: int = 0
    image_size: int = 14
    train_size: int = 20000
    test_size: int = 5000
    batch_size: int = 128
    width: int = 16
    optimizers: tuple[str, ...] = OPTIMIZERS
    sgd_lr: float = 0.1
    momentum: float = 0.9
    sgd_weight_decay: float = 1e-4
    adam_lr: float = 3e-3
    betas: tuple[float, float] = (0.9, 0.999)
    adam_weight_decay: float = 0.1
    schedule: str = "cosine"
    evals_per_epoch: int = 4
    data_dir: str | None = None
    threads: int | None = None


def make_model(width: int = 16, num_classes: int = 10, in_channels: int = 1) -> nn.Sequential:
    """Three conv-BN-ReLU blocks (no conv bias; the last two stride 2), global pooling, a linear head."""
    chans = [in_channels, width, 2 * width, 4 * width]
    layers: list[nn.Module] = []
    for i in range(3):
        layers += [
            nn.Conv2d(chans[i], chans[i + 1], 3, stride=1 if i == 0 else 2, padding=1, bias=False),
            nn.BatchNorm2d(chans[i + 1]),
            nn.ReLU(inplace=True),
        ]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(chans[-1], num_classes)]
    return nn.Sequential(*layers)


def scale_invariant_names(model: nn.Module) -> list[str]:
    """Names of the conv weights (each followed by BatchNorm, hence scale-invariant)."""
    return [f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def make_optimizer(name: str, model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """torch.optim baselines, or this package's optimizers with ``track_stats=True``."""
    if name in ("adamwc", "adampc"):
        return torch_adamp.AdamP(
            model.named_parameters(),
            lr=cfg.adam_lr,
            betas=cfg.betas,
            weight_decay=cfg.adam_weight_decay,
            scale_invariant=False if name == "adamwc" else "auto",
            corrected_weight_decay="all" if name == "adamwc" else True,
            track_stats=True,
        )
    if name == "lionp":
        return torch_adamp.LionP(
            model.named_parameters(),
            lr=cfg.adam_lr * LION_LR_FACTOR,
            weight_decay=cfg.adam_weight_decay,
            track_stats=True,
        )
    if name in ("sgd", "sgdp"):
        return build_optimizer(
            name, model.named_parameters(), lr=cfg.sgd_lr, weight_decay=cfg.sgd_weight_decay, momentum=cfg.momentum
        )
    base = name.removesuffix("+p")
    if base in WRAPPABLE:
        params = model.named_parameters() if name != base else model.parameters()
        if base == "adafactor":
            inner: torch.optim.Optimizer = torch.optim.Adafactor(
                params, lr=ADAFACTOR_LR, weight_decay=cfg.adam_weight_decay
            )
        elif base == "adamw8bit":
            from torchao.optim import AdamW8bit

            inner = AdamW8bit(params, lr=cfg.adam_lr, betas=cfg.betas, weight_decay=cfg.adam_weight_decay)
        elif base == "lion":
            from lion_pytorch import Lion

            inner = Lion(params, lr=cfg.adam_lr * LION_LR_FACTOR, weight_decay=cfg.adam_weight_decay)
        else:
            cls = getattr(torch.optim, WRAPPABLE[base])
            inner = cls(
                params, lr=cfg.adam_lr, betas=cfg.betas, weight_decay=cfg.adam_weight_decay, decoupled_weight_decay=True
            )
        return torch_adamp.Projected(inner, track_stats=True) if name != base else inner
    return build_optimizer(
        name, model.named_parameters(), lr=cfg.adam_lr, weight_decay=cfg.adam_weight_decay, betas=cfg.betas
    )


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch: int = 1000) -> float:
    """Test accuracy in percent (eval mode, BatchNorm running statistics)."""
    was_training = model.training
    model.eval()
    correct = sum(int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum()) for i in range(0, len(y), batch))
    model.train(was_training)
    return 100.0 * correct / len(y)


_weight_stats = weight_stats


@dataclass
class RunResult:
    optimizer: str
    seed: int
    test_accuracy: float
    final_weight_norm: float  # norm of all scale-invariant weights together
    mean_effective_step: float  # lr / ||w||^2, averaged over the conv weights and the logged steps
    projected_fraction: float | None  # SGDP/AdamP: share of (logged step, conv weight) pairs projected
    seconds: float
    curves: dict[str, list[float]] = field(default_factory=dict)


def train_one(
    name: str,
    seed: int,
    data: fashion_mnist.Dataset,
    cfg: Config,
    on_step: Callable[[float], None] | None = None,
) -> RunResult:
    """Train one model with one optimizer and seed; record accuracy, weight norms and effective step sizes."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    model = make_model(cfg.width)
    names = scale_invariant_names(model)
    opt = make_optimizer(name, model, cfg)
    n = len(data.train_y)
    bs = min(cfg.batch_size, n)
    steps_per_epoch = n // bs
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "cosine":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / total)))
    else:
        sched = None
    log_every = max(1, total // 100)
    eval_at = {round(steps_per_epoch * k / cfg.evals_per_epoch) for k in range(1, cfg.evals_per_epoch * cfg.epochs + 1)}
    eval_at = {s for s in eval_at if s > 0}
    curves: dict[str, list[float]] = {
        "eval_epoch": [0.0],
        "accuracy": [accuracy(model, data.test_x, data.test_y)],
        "log_epoch": [],
        "weight_norm": [],
        "effective_step": [],
        "grad_norm": [],  # of the scale-invariant weights together, at the logged steps (before their update)
    }
    tracked = [p for n, p in model.named_parameters() if n in set(names)]
    gen = torch.Generator().manual_seed(seed)
    step = 0
    projected: list[bool] = []
    model.train()
    for _ in range(cfg.epochs):
        order = torch.randperm(n, generator=gen)
        for b in range(steps_per_epoch):
            idx = order[b * bs : (b + 1) * bs]
            loss = F.cross_entropy(model(data.train_x[idx]), data.train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            logged = (step + 1) % log_every == 0 or step + 1 == total
            if logged:
                grad_sq = sum(float(p.grad.detach().square().sum()) for p in tracked if p.grad is not None)
            opt.step()
            step += 1
            if logged:
                curves["grad_norm"].append(math.sqrt(grad_sq))
                norms, eff, proj = _weight_stats(opt, model, names)
                projected += proj or []
                curves["log_epoch"].append(step / steps_per_epoch)
                curves["weight_norm"].append(math.sqrt(sum(v * v for v in norms)))
                curves["effective_step"].append(statistics.fmean(eff))
            if sched is not None:
                sched.step()
            if step in eval_at:
                curves["eval_epoch"].append(step / steps_per_epoch)
                curves["accuracy"].append(accuracy(model, data.test_x, data.test_y))
            if on_step is not None:
                on_step(loss.item())
    return RunResult(
        optimizer=name,
        seed=seed,
        test_accuracy=curves["accuracy"][-1],
        final_weight_norm=curves["weight_norm"][-1],
        mean_effective_step=statistics.fmean(curves["effective_step"]),
        projected_fraction=statistics.fmean(projected) if projected else None,
        seconds=time.perf_counter() - start,
        curves=curves,
    )


def steps_per_run(cfg: Config, train_size: int) -> int:
    return cfg.epochs * (train_size // min(cfg.batch_size, train_size))


_mean_std = mean_std


def summarize(runs: Sequence[RunResult], optimizers: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per optimizer: mean and standard deviation (over seeds, n-1) of the final numbers."""
    out: dict[str, dict[str, Any]] = {}
    for name in optimizers:
        mine = [r for r in runs if r.optimizer == name]
        acc, acc_sd = _mean_std([r.test_accuracy for r in mine])
        norm, norm_sd = _mean_std([r.final_weight_norm for r in mine])
        eff, eff_sd = _mean_std([r.mean_effective_step for r in mine])
        out[name] = {
            "label": LABELS[name],
            "implementation": BASELINE_CLASSES.get(name, f"torch_adamp.{LABELS[name]}"),
            "seeds": [r.seed for r in mine],
            "test_accuracy_mean": acc,
            "test_accuracy_std": acc_sd,
            "weight_norm_mean": norm,
            "weight_norm_std": norm_sd,
            "effective_step_mean": eff,
            "effective_step_std": eff_sd,
        }
    return out


def format_table(summary: dict[str, dict[str, Any]]) -> str:
    """The table ``compare`` prints."""
    head = f"{'optimizer':<10} {'test acc (%)':>15} {'conv-weight norm':>18} {'mean lr/|w|^2':>15}  implementation"
    lines = [head, "-" * len(head)]
    for s in summary.values():
        lines.append(
            f"{s['label']:<10} {s['test_accuracy_mean']:>7.2f} +- {s['test_accuracy_std']:<4.2f}"
            f" {s['weight_norm_mean']:>9.2f} +- {s['weight_norm_std']:<5.2f}"
            f" {s['effective_step_mean']:>15.3e}  {s['implementation']}"
        )
    return "\n".join(lines)


def run(
    cfg: Config,
    *,
    quiet: bool = False,
    log: Callable[[str], None] = print,
    on_run: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Load the data, train every optimizer with every seed, return the results (see results.json).

    ``on_run``, when given, is called after every finished run with the results so far (the same
    layout, ``"complete"`` false until the last run, ``"summary"`` over the finished runs), so that a
    caller can write them as they come: an interrupted comparison keeps its finished runs.
    """
    data = fashion_mnist.load(
        train_size=cfg.train_size, test_size=cfg.test_size, image_size=cfg.image_size, data_dir=cfg.data_dir
    )
    seeds = list(range(cfg.first_seed, cfg.first_seed + cfg.seeds))
    jobs = [(seed, name) for seed in seeds for name in cfg.optimizers]
    epochs = f"{cfg.epochs} epoch{'s' if cfg.epochs != 1 else ''}"
    seed_text = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {seeds[0]}..{seeds[-1]}"
    threads = torch.get_num_threads()
    log(
        f"Fashion-MNIST ({data.source}): {len(data.train_y)} training / {len(data.test_y)} test images at "
        f"{cfg.image_size}x{cfg.image_size}; {epochs}, {seed_text}, {threads} thread{'s' if threads != 1 else ''}"
    )
    runs: list[RunResult] = []
    start = time.perf_counter()

    def results() -> dict[str, Any]:
        done = [n for n in cfg.optimizers if any(r.optimizer == n for r in runs)]
        return {
            "config": asdict(cfg),
            "data_source": data.source,
            "threads": torch.get_num_threads(),
            "seconds": time.perf_counter() - start,
            "complete": len(runs) == len(jobs),
            "runs_planned": len(jobs),
            "summary": summarize(runs, done),
            "runs": [asdict(r) for r in runs],
        }

    with progress_bar(total=len(jobs) * steps_per_run(cfg, len(data.train_y)), unit="step", quiet=quiet) as bar:
        for seed, name in jobs:
            bar.set_description(f"{LABELS[name]} seed {seed}")

            def on_step(loss: float) -> None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

            runs.append(train_one(name, seed, data, cfg, on_step))
            if on_run is not None:
                on_run(results())
    return results()
