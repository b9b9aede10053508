"""Bias robustness: colour-biased Fashion-MNIST, built the way Biased MNIST is (Bahng et al., ICML 2020).

Each grey image ``i`` (intensities in [0, 1]) is put on a coloured background:
``pixel = i * white + (1 - i) * colour``. In the training set the colour is
the label's own colour (one of ten fixed colours, one per class) with
probability ``rho`` and otherwise one of the other nine, uniformly; in the
unbiased test set it is uniform over the ten, independent of the label. A
network that learns the colour instead of the shape scores ~``100 / 10`` %
there; the paper's figure is ReBias on Biased MNIST, averaged over
``rho`` in {0.99, 0.995, 0.997, 0.999}; here it is plain training (no ReBias)
at one ``rho``. The colours are drawn from a fixed ``numpy`` generator, so the
data is the same for every run and seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import compare, fashion_mnist
from .common import Experiment, Metric, conv_weight_names, index_batches

#: Biased MNIST's ten background colours (RGB in [0, 1]), one per class
COLOURS = np.array(
    [
        [1.0, 0.0, 0.0],
        [0.0, 1.0, 0.0],
        [0.0, 0.0, 1.0],
        [1.0, 1.0, 0.0],
        [1.0, 0.0, 1.0],
        [0.0, 1.0, 1.0],
        [1.0, 0.5, 0.0],
        [0.5, 0.0, 1.0],
        [0.0, 0.5, 0.25],
        [0.5, 0.5, 0.5],
    ],
    dtype=np.float32,
)
PAPER = {
    "pair": "adamw",
    "text": "Biased MNIST (ReBias), unbiased accuracy averaged over rho, Adam -> AdamP: 61.9 -> 68.0 (+6.1 points)",
    "gain": "+6.1",
}


@dataclass
class Config:
    epochs: int = 3
    batch_size: int = 128
    width: int = 16
    rho: float = 0.8
    train_size: int = 10000
    test_size: int = 5000
    data_seed: int = 0
    lr: float = 1e-2  # from scripts/reproduce_lr_search.py (docs/reproduction.md)
    weight_decay: float = 0.1


def colour_indices(labels: np.ndarray, rho: float, rng: np.random.Generator) -> np.ndarray:
    """Background colour per image: the label's with probability ``rho``, else one of the other nine
    uniformly (``rho = 0.1`` gives colours independent of the labels)."""
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho must be in [0, 1], got {rho}")
    k = len(COLOURS)
    keep = rng.random(len(labels)) < rho
    other = (labels + rng.integers(1, k, size=len(labels))) % k
    out: np.ndarray = np.where(keep, labels, other).astype(np.int64)
    return out


def colourise(images: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """uint8 grey ``(n, h, w)`` + colour index per image -> float32 RGB ``(n, 3, h, w)`` in [0, 1]."""
    i = images.astype(np.float32)[:, None] / 255.0
    bg = COLOURS[colours][:, :, None, None]
    out: np.ndarray = i + (1.0 - i) * bg
    return out


@dataclass
class Sets:
    """Normalised (``(x - 0.5) / 0.5``) RGB images: the biased training set, the unbiased test set and
    the same test images coloured by their labels (biased); the colour index of every image."""

    train_x: Tensor
    train_y: Tensor
    train_colour: Tensor
    test_x: Tensor
    test_y: Tensor
    test_colour: Tensor
    test_biased_x: Tensor
    source: str


def _small(images: np.ndarray) -> np.ndarray:
    return fashion_mnist.halve(images) if images.shape[1] == 28 else images


def make_sets(cfg: Config) -> Sets:
    """The three sets, from the first ``n / 10`` images per class (see :mod:`..fashion_mnist`)."""
    raw = fashion_mnist.locate()
    tr = fashion_mnist.first_per_class(raw.train.labels, cfg.train_size)
    te = fashion_mnist.first_per_class(raw.test.labels, cfg.test_size)
    tr_img, tr_y = _small(raw.train.images[tr]), raw.train.labels[tr]
    te_img, te_y = _small(raw.test.images[te]), raw.test.labels[te]
    rng = np.random.default_rng(cfg.data_seed)
    tr_c = colour_indices(tr_y, cfg.rho, rng)
    te_c = rng.integers(0, len(COLOURS), size=len(te_y))

    def t(a: np.ndarray) -> Tensor:
        return (torch.from_numpy(a) - 0.5) / 0.5

    return Sets(
        train_x=t(colourise(tr_img, tr_c)),
        train_y=torch.from_numpy(tr_y),
        train_colour=torch.from_numpy(tr_c),
        test_x=t(colourise(te_img, te_c)),
        test_y=torch.from_numpy(te_y),
        test_colour=torch.from_numpy(te_c),
        test_biased_x=t(colourise(te_img, te_y)),
        source=raw.source,
    )


def experiment(cfg: Config) -> Experiment:
    sets = make_sets(cfg)
    xtr, ytr, xte, yte, xte_biased = sets.train_x, sets.train_y, sets.test_x, sets.test_y, sets.test_biased_x

    def make_model() -> nn.Module:
        return compare.make_model(cfg.width, in_channels=3)

    def loss(model: nn.Module, idx: Any) -> Tensor:
        return F.cross_entropy(model(xtr[idx]), ytr[idx])

    def acc(model: nn.Module, x: Tensor) -> float:
        with torch.no_grad():
            right = sum(
                int((model(x[i : i + 1000]).argmax(1) == yte[i : i + 1000]).sum()) for i in range(0, len(yte), 1000)
            )
        return 100.0 * right / len(yte)

    def evaluate(model: nn.Module) -> dict[str, float]:
        return {"unbiased_accuracy": acc(model, xte), "biased_accuracy": acc(model, xte_biased)}

    return Experiment(
        name="bias",
        title=f"Bias robustness: colour-biased Fashion-MNIST (rho {cfg.rho:g})",
        optimizers=("adamw", "adamp"),
        metrics=(Metric("unbiased_accuracy", "unbiased acc (%)"), Metric("biased_accuracy", "biased acc (%)")),
        make_model=make_model,
        batches=lambda gen: index_batches(len(ytr), cfg.batch_size, gen),
        steps_per_epoch=len(ytr) // cfg.batch_size,
        loss=loss,
        evaluate=evaluate,
        tracked=conv_weight_names,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        epochs=cfg.epochs,
        data_note=f"Fashion-MNIST 14x14 ({sets.source}) on coloured backgrounds: {len(ytr)} training images with "
        f"colour = label's colour w.p. {cfg.rho:g}, {len(yte)} test images with uniform colours",
    )
