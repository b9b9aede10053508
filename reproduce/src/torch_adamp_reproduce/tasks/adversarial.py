"""Adversarial robustness: PGD adversarial training (l-inf) of a BatchNorm CNN on Fashion-MNIST.

Madry et al.'s training: every batch is replaced by its PGD attack (random
start in the eps-ball, ``train_steps`` signed-gradient steps of size
``2.5 eps / train_steps``, projected onto the ball and onto the valid pixel
range [0, 1]) before the optimizer step. The attack runs with the model in
training mode (batch statistics), as in Madry et al.'s code. Evaluation, in
eval mode on test images: standard accuracy and accuracy under PGD with
``eval_steps`` steps and the same eps (the paper's CIFAR-10 table: PGD-10).
``eps`` is in pixel units ([0, 1]); the images are normalised after the attack
has chosen them, so the conv weights stay scale-invariant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import compare, fashion_mnist
from .common import Experiment, Metric, conv_weight_names, index_batches

PAPER = {
    "pair": "adamw",
    "text": "CIFAR-10 WRN, l-inf PGD-10, standard / attacked accuracy, Adam -> AdamP: "
    "80.12 / 56.58 -> 89.85 / 66.28 (+9.7 / +9.7 points)",
    "gain": "+9.7 (attacked)",
}


@dataclass
class Config:
    epochs: int = 3
    batch_size: int = 128
    width: int = 16
    train_size: int = 8000
    test_size: int = 1000
    eps: float = 0.1
    train_steps: int = 3
    eval_steps: int = 10
    lr: float = 3e-2  # from scripts/reproduce_lr_search.py (docs/reproduction.md)
    weight_decay: float = 0.1


class Normalised(nn.Module):
    """Takes pixels in [0, 1] and normalises them (mean and std of Fashion-MNIST) before the CNN."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.net((x - fashion_mnist.MEAN) / fashion_mnist.STD)
        return out


def pgd_linf(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    steps: int,
    step_size: float | None = None,
    gen: torch.Generator | None = None,
) -> Tensor:
    """l-inf PGD: uniform random start in the eps-ball, ``steps`` steps ``x += a sign(grad CE)``, each
    followed by projection onto ``|x' - x|_inf <= eps`` and ``[0, 1]``; ``a = 2.5 eps / steps`` by default.
    Only the input's gradient is computed (also under ``torch.no_grad()``); the parameters' ``.grad``
    are untouched."""
    if eps < 0 or steps < 0:
        raise ValueError(f"pgd_linf: eps and steps must be >= 0, got {eps} and {steps}")
    a = 2.5 * eps / max(steps, 1) if step_size is None else step_size
    noise = torch.rand(x.shape, generator=gen, dtype=x.dtype) * 2 - 1
    adv = (x + eps * noise).clamp(0, 1)
    for _ in range(steps):
        adv.requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(F.cross_entropy(model(adv), y), adv)
        adv = adv.detach() + a * grad.sign()
        adv = torch.min(torch.max(adv, x - eps), x + eps).clamp(0, 1)
    return adv.detach()


def pixels(images: Tensor) -> Tensor:
    """Undo ``fashion_mnist.to_tensor``'s normalisation: back to [0, 1]."""
    return (images * fashion_mnist.STD + fashion_mnist.MEAN).clamp(0, 1)


def experiment(cfg: Config) -> Experiment:
    data = fashion_mnist.load(train_size=cfg.train_size, test_size=cfg.test_size, image_size=14)
    xtr, ytr, xte, yte = pixels(data.train_x), data.train_y, pixels(data.test_x), data.test_y
    attack_gen = torch.Generator().manual_seed(1234)

    def make_model() -> nn.Module:
        return Normalised(compare.make_model(cfg.width))

    def loss(model: nn.Module, idx: Any) -> Tensor:
        adv = pgd_linf(model, xtr[idx], ytr[idx], cfg.eps, cfg.train_steps)
        return F.cross_entropy(model(adv), ytr[idx])

    def evaluate(model: nn.Module) -> dict[str, float]:
        attack_gen.manual_seed(1234)  # the same random starts at every evaluation
        clean = attacked = 0
        for i in range(0, len(yte), 500):
            x, y = xte[i : i + 500], yte[i : i + 500]
            with torch.no_grad():
                clean += int((model(x).argmax(1) == y).sum())
            adv = pgd_linf(model, x, y, cfg.eps, cfg.eval_steps, gen=attack_gen)
            with torch.no_grad():
                attacked += int((model(adv).argmax(1) == y).sum())
        return {"pgd_accuracy": 100.0 * attacked / len(yte), "accuracy": 100.0 * clean / len(yte)}

    return Experiment(
        name="adversarial",
        title=f"Adversarial training: PGD-{cfg.train_steps} l-inf (eps {cfg.eps:g}) on Fashion-MNIST",
        optimizers=("adamw", "adamp"),
        metrics=(Metric("pgd_accuracy", f"PGD-{cfg.eval_steps} acc (%)"), Metric("accuracy", "standard acc (%)")),
        make_model=make_model,
        batches=lambda gen: index_batches(len(ytr), cfg.batch_size, gen),
        steps_per_epoch=len(ytr) // cfg.batch_size,
        loss=loss,
        evaluate=evaluate,
        tracked=conv_weight_names,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        epochs=cfg.epochs,
        evals_per_epoch=1,
        data_note=f"Fashion-MNIST 14x14 ({data.source}): {len(ytr)} training, {len(yte)} test images; "
        f"eps {cfg.eps:g} (pixels in [0, 1]), PGD-{cfg.train_steps} in training, PGD-{cfg.eval_steps} at test",
    )
