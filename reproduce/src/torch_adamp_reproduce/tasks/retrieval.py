"""Retrieval: metric learning with ProxyAnchor on seen classes of Fashion-MNIST, Recall@k on unseen ones.

As in the paper's CUB/Cars/In-Shop/SOP benchmarks, the classes are split in
two: the network is trained on the first five (T-shirt/top, Trouser, Pullover,
Dress, Coat; the training images of the shipped subset) and evaluated by
retrieval among the test images of the other five (Sandal, Shirt, Sneaker,
Bag, Ankle boot), which it never saw. Recall@k is the share of queries whose
k nearest neighbours (cosine similarity, the query itself excluded) include an
image of the same class.

The embedding network is the BatchNorm CNN of ``compare`` with a bias-free
linear embedding head; the ProxyAnchor loss (Kim et al., CVPR 2020; alpha 32,
margin 0.1) compares the L2-normalised embeddings with one L2-normalised proxy
per training class. Hence the conv weights (BatchNorm), the embedding weight
(normalised output, as a whole layer) and the proxies (each row) are all
scale-invariant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import compare, fashion_mnist
from .common import Experiment, Metric, conv_weight_names, index_batches

KS = (1, 2, 4, 8)
PAPER = {
    "pair": "adamw",
    "text": "ProxyAnchor Recall@1, AdamW -> AdamP: CUB 69.28 -> 69.5, Cars 86.7 -> 86.9, "
    "In-Shop 85.2 -> 87.4, SOP 76.5 -> 78.0 (gain +0.2 .. +2.2 points)",
    "gain": "+0.2 .. +2.2",
}


@dataclass
class Config:
    epochs: int = 4
    batch_size: int = 128
    width: int = 16
    embedding: int = 64
    train_classes: tuple[int, ...] = (0, 1, 2, 3, 4)
    alpha: float = 32.0
    margin: float = 0.1
    lr: float = 3e-3  # from scripts/reproduce_lr_search.py (docs/reproduction.md)
    weight_decay: float = 0.1
    train_size: int = 20000  # from the subset; only the training classes are used
    test_size: int = 5000  # likewise, only the unseen classes


class EmbeddingNet(nn.Module):
    """BN-CNN -> bias-free linear embedding; ``proxies`` (one per training class) belong to the loss."""

    def __init__(self, width: int, dim: int, num_proxies: int) -> None:
        super().__init__()
        self.net = compare.make_model(width, dim)
        self.net[-1] = nn.Linear(4 * width, dim, bias=False)
        self.proxies = nn.Parameter(torch.empty(num_proxies, dim))
        nn.init.kaiming_normal_(self.proxies, mode="fan_out")

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.net(x)
        return out


def proxy_anchor_loss(emb: Tensor, labels: Tensor, proxies: Tensor, alpha: float = 32.0, margin: float = 0.1) -> Tensor:
    """ProxyAnchor: ``1/|P+| sum_{p in P+} log(1 + sum_{x in X_p+} e^{-a(s(x,p) - m)})
    + 1/|P| sum_p log(1 + sum_{x in X_p-} e^{a(s(x,p) + m)})`` with cosine similarity ``s``;
    ``P+`` are the proxies with a positive in the batch. Computed with ``softplus(logsumexp(.))``."""
    cos = F.normalize(emb, dim=1) @ F.normalize(proxies, dim=1).T  # (batch, proxies)
    pos = F.one_hot(labels, proxies.shape[0]).bool()
    neg_inf = torch.tensor(float("-inf"), dtype=cos.dtype)
    pos_lse = torch.where(pos, -alpha * (cos - margin), neg_inf).logsumexp(0)
    neg_lse = torch.where(~pos, alpha * (cos + margin), neg_inf).logsumexp(0)
    has_pos = pos.any(0)
    pos_term = F.softplus(pos_lse[has_pos]).sum() / has_pos.sum().clamp(min=1)
    neg_term = F.softplus(neg_lse).sum() / proxies.shape[0]
    return pos_term + neg_term


def recall_at_k(emb: Tensor, labels: Tensor, ks: tuple[int, ...] = KS) -> dict[int, float]:
    """Recall@k in percent: share of queries with a same-class item among their k nearest neighbours by
    cosine similarity (every item is a query; the query itself is excluded from its neighbours)."""
    if not 0 < max(ks) < len(labels):
        raise ValueError(f"recall_at_k: k must be between 1 and {len(labels) - 1}, got {max(ks)}")
    e = F.normalize(emb.float(), dim=1)
    sim = e @ e.T
    sim.fill_diagonal_(float("-inf"))
    nn_idx = sim.topk(max(ks), dim=1).indices
    hit = labels[nn_idx] == labels[:, None]
    return {k: 100.0 * float(hit[:, :k].any(1).float().mean()) for k in ks}


def split(data: fashion_mnist.Dataset, train_classes: tuple[int, ...]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Training images of ``train_classes`` (labels renumbered 0..), test images of the other classes."""
    seen = torch.tensor(train_classes)
    tr = torch.isin(data.train_y, seen)
    te = ~torch.isin(data.test_y, seen)
    remap = torch.full((fashion_mnist.NUM_CLASSES,), -1, dtype=torch.long)
    remap[seen] = torch.arange(len(seen))
    return data.train_x[tr], remap[data.train_y[tr]], data.test_x[te], data.test_y[te]


def experiment(cfg: Config) -> Experiment:
    data = fashion_mnist.load(train_size=cfg.train_size, test_size=cfg.test_size, image_size=14)
    xtr, ytr, xte, yte = split(data, cfg.train_classes)
    n_cls = len(cfg.train_classes)

    def make_model() -> nn.Module:
        return EmbeddingNet(cfg.width, cfg.embedding, n_cls)

    def loss(model: nn.Module, idx: Any) -> Tensor:
        assert isinstance(model, EmbeddingNet)
        return proxy_anchor_loss(model(xtr[idx]), ytr[idx], model.proxies, cfg.alpha, cfg.margin)

    def evaluate(model: nn.Module) -> dict[str, float]:
        with torch.no_grad():
            emb = torch.cat([model(xte[i : i + 1000]) for i in range(0, len(yte), 1000)])
        return {f"recall@{k}": v for k, v in recall_at_k(emb, yte).items()}

    def tracked(model: nn.Module) -> list[str]:
        assert isinstance(model, EmbeddingNet)
        return [*conv_weight_names(model), f"net.{len(model.net) - 1}.weight", "proxies"]

    unseen = ", ".join(fashion_mnist.CLASSES[c] for c in range(10) if c not in cfg.train_classes)
    return Experiment(
        name="retrieval",
        title="Retrieval: ProxyAnchor on Fashion-MNIST, unseen classes",
        optimizers=("adamw", "adamp"),
        metrics=tuple(Metric(f"recall@{k}", f"R@{k} (%)") for k in KS),
        make_model=make_model,
        batches=lambda gen: index_batches(len(ytr), cfg.batch_size, gen),
        steps_per_epoch=len(ytr) // cfg.batch_size,
        loss=loss,
        evaluate=evaluate,
        tracked=tracked,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        epochs=cfg.epochs,
        data_note=f"Fashion-MNIST 14x14 ({data.source}): train {len(ytr)} images of 5 classes, retrieve among "
        f"{len(yte)} test images of the 5 unseen ones ({unseen})",
    )
