"""Audio: keyword spotting (ten words) with a BatchNorm CNN on log-mel features of synthesised speech.

The features ship with the package (``torch_adamp_reproduce/data/espeak_kws_logmel.npz``,
made once by ``scripts/make_kws_features.py`` with Debian's espeak-ng; see
:mod:`.audio_data`): 1,500 training clips and 500 test clips of
yes/no/up/down/left/right/on/off/stop/go in seven English dialects, with
random speed, pitch, position and white noise (5-25 dB SNR); the test clips
use voice variants never heard in training. The CNN is ``compare``'s
(conv-BN-ReLU, no conv bias) on the ``32 x 49`` log-mel image.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import compare
from . import audio_data
from .common import Experiment, Metric, conv_weight_names, index_batches

PAPER = {
    "pair": "adamw",
    "text": "Audio, Adam -> AdamP: keyword spotting accuracy 96.47 -> 96.89 (+0.42), music tagging ROC-AUC "
    "91.12 -> 91.35, sound event tagging F1 55.24 -> 56.04",
    "gain": "+0.42 (keyword spotting)",
}


@dataclass
class Config:
    epochs: int = 8
    batch_size: int = 64
    width: int = 16
    lr: float = 1e-2  # from scripts/reproduce_lr_search.py (docs/reproduction.md)
    weight_decay: float = 0.1
    train_size: int | None = None  # None: all 1,500 clips; else the first n (for tests)
    test_size: int | None = None


def load() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Training and test features as float32 ``(n, 1, 32, 49)``, standardised with the training set's
    mean and std; labels int64 (clips ordered by word)."""
    ref = resources.files("torch_adamp_reproduce") / "data" / audio_data.FILE
    with ref.open("rb") as f, np.load(f) as z:
        tr, ytr = z["train_features"], z["train_labels"]
        te, yte = z["test_features"], z["test_labels"]
    mean, std = float(tr.mean()), float(tr.std())

    def t(a: np.ndarray) -> Tensor:
        return ((torch.from_numpy(a).float() - mean) / std).unsqueeze(1)

    return t(tr), torch.from_numpy(ytr.astype(np.int64)), t(te), torch.from_numpy(yte.astype(np.int64))


def experiment(cfg: Config) -> Experiment:
    xtr, ytr, xte, yte = load()
    if cfg.train_size is not None:  # a spread over the words: every k-th clip
        keep = torch.linspace(0, len(ytr) - 1, cfg.train_size).long()
        xtr, ytr = xtr[keep], ytr[keep]
    if cfg.test_size is not None:
        keep = torch.linspace(0, len(yte) - 1, cfg.test_size).long()
        xte, yte = xte[keep], yte[keep]

    def loss(model: nn.Module, idx: Any) -> Tensor:
        return F.cross_entropy(model(xtr[idx]), ytr[idx])

    def evaluate(model: nn.Module) -> dict[str, float]:
        with torch.no_grad():
            return {"accuracy": 100.0 * float((model(xte).argmax(1) == yte).float().mean())}

    return Experiment(
        name="audio",
        title="Audio: keyword spotting on espeak-ng speech, log-mel BN-CNN",
        optimizers=("adamw", "adamp"),
        metrics=(Metric("accuracy", "test acc (%)"),),
        make_model=lambda: compare.make_model(cfg.width, len(audio_data.WORDS)),
        batches=lambda gen: index_batches(len(ytr), cfg.batch_size, gen),
        steps_per_epoch=len(ytr) // cfg.batch_size,
        loss=loss,
        evaluate=evaluate,
        tracked=conv_weight_names,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        epochs=cfg.epochs,
        data_note=f"{len(ytr)} training / {len(yte)} test clips of 10 words synthesised by espeak-ng (test: unseen "
        f"voice variants), white noise 5-25 dB SNR, {xtr.shape[2]}x{xtr.shape[3]} log-mel",
    )
