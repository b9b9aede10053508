"""Language modelling with and without weight normalisation: a character-level Transformer on the KJV.

Corpus: Genesis (training) and Exodus (validation) of the King James Version
(public domain), shipped as ``torch_adamp_reproduce/data/kjv_genesis_exodus.txt.gz``
(made by ``scripts/make_kjv_excerpt.py`` from Debian's ``bible-kjv-text``).
The model is a small pre-LayerNorm causal Transformer; with ``weight_norm``
every linear layer (attention input and output projections, both feed-forward
layers and the output head) is wrapped in
``torch.nn.utils.parametrizations.weight_norm`` (``dim=0``): its weight is
``g * v / ||v||`` per output row, with ``original0 = g`` of shape ``(out, 1)``
and ``original1 = v``. The loss does not depend on the scale of any row of
``v``, so ``v`` is scale-invariant in the *channel* view, while ``g`` is not
scale-invariant at all. Without weight norm the linear weights feed residual
sums and LayerNorms and are not scale-invariant; AdamP should then hardly
project anything and behave as AdamW. The metric is the validation perplexity
per character, ``exp`` of the mean cross-entropy on fixed windows of Exodus.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from importlib import resources
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from .common import Experiment, Metric

CORPUS_FILE = "kjv_genesis_exodus.txt.gz"
PAPER_WN = {
    "pair": "adamw",
    "text": "WikiText-103 perplexity, Transformer-XL with weight norm, AdamW -> AdamP: 23.96 -> 22.77 "
    "(1.19 lower; without weight norm 23.38 -> 23.26, 0.12 lower)",
    "gain": "+1.19 (23.96 → 22.77)",
}
PAPER_PLAIN = {
    "pair": "adamw",
    "text": "WikiText-103 perplexity, Transformer-XL without weight norm, AdamW -> AdamP: 23.38 -> 23.26 "
    "(0.12 lower; with weight norm 23.96 -> 22.77, 1.19 lower)",
    "gain": "+0.12 (23.38 → 23.26)",
}


@dataclass
class Config:
    weight_norm: bool = True
    epochs: int = 2
    steps_per_epoch: int = 125
    batch_size: int = 32
    context: int = 64
    dim: int = 64
    layers: int = 2
    heads: int = 4
    eval_windows: int = 256
    lr: float = 3e-2  # from scripts/reproduce_lr_search.py (docs/reproduction.md)
    weight_decay: float = 0.1


def load_corpus() -> tuple[str, str]:
    """(Genesis, Exodus) as text, one verse per line."""
    ref = resources.files("torch_adamp_reproduce") / "data" / CORPUS_FILE
    with ref.open("rb") as f:
        text = gzip.decompress(f.read()).decode("ascii")
    _, genesis, exodus = text.split("# ", 2)
    return genesis.split("\n", 1)[1], exodus.split("\n", 1)[1]


def encode(text: str, vocab: str) -> Tensor:
    table = {c: i for i, c in enumerate(vocab)}
    return torch.tensor([table[c] for c in text], dtype=torch.long)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, wn: bool) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = _linear(dim, 3 * dim, wn), _linear(dim, dim, wn)
        self.fc1, self.fc2 = _linear(dim, 4 * dim, wn), _linear(4 * dim, dim, wn)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(a)
        out: Tensor = x + self.fc2(F.gelu(self.fc1(self.ln2(x))))
        return out


def _linear(i: int, o: int, wn: bool) -> nn.Module:
    lin = nn.Linear(i, o)
    return weight_norm(lin) if wn else lin


class CharTransformer(nn.Module):
    def __init__(self, vocab: int, cfg: Config) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, cfg.dim)
        self.pos = nn.Parameter(torch.randn(cfg.context, cfg.dim) * 0.02)
        self.blocks = nn.Sequential(*(Block(cfg.dim, cfg.heads, cfg.weight_norm) for _ in range(cfg.layers)))
        self.ln = nn.LayerNorm(cfg.dim)
        self.head = _linear(cfg.dim, vocab, cfg.weight_norm)

    def forward(self, idx: Tensor) -> Tensor:
        out: Tensor = self.head(self.ln(self.blocks(self.emb(idx) + self.pos[: idx.shape[1]])))
        return out


def projection_weights(model: nn.Module) -> tuple[list[str], list[str]]:
    """(the tracked weights: ``v`` under weight norm, else the linear weights; the ``g`` of weight norm)."""
    names = [n for n, _ in model.named_parameters()]
    if any(n.endswith("original1") for n in names):
        return [n for n in names if n.endswith("original1")], [n for n in names if n.endswith("original0")]
    linear = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return linear, []


def experiment(cfg: Config) -> Experiment:
    train_text, valid_text = load_corpus()
    vocab = "".join(sorted(set(train_text) | set(valid_text)))
    train, valid = encode(train_text, vocab), encode(valid_text, vocab)
    span = cfg.context + 1
    stride = max(1, (len(valid) - span) // cfg.eval_windows)
    starts = torch.arange(cfg.eval_windows) * stride
    valid_windows = torch.stack([valid[s : s + span] for s in starts.tolist()])

    def batches(gen: torch.Generator) -> list[Tensor]:
        s = torch.randint(0, len(train) - span, (cfg.steps_per_epoch, cfg.batch_size), generator=gen)
        return [torch.stack([train[j : j + span] for j in row.tolist()]) for row in s]

    def loss(model: nn.Module, w: Any) -> Tensor:
        logits = model(w[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1))

    def evaluate(model: nn.Module) -> dict[str, float]:
        with torch.no_grad():
            total = 0.0
            for i in range(0, len(valid_windows), 64):
                w = valid_windows[i : i + 64]
                logits = model(w[:, :-1])
                total += float(
                    F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1), reduction="sum")
                )
        return {"perplexity": float(torch.tensor(total / valid_windows[:, 1:].numel()).exp())}

    wn = "with" if cfg.weight_norm else "without"
    return Experiment(
        name="language" if cfg.weight_norm else "language-plain",
        title=f"Language modelling {wn} weight norm: char Transformer on the KJV",
        optimizers=("adamw", "adamp"),
        metrics=(Metric("perplexity", "valid ppl/char", higher_is_better=False, fmt=".3f"),),
        make_model=lambda: CharTransformer(len(vocab), cfg),
        batches=batches,
        steps_per_epoch=cfg.steps_per_epoch,
        loss=loss,
        evaluate=evaluate,
        tracked=lambda m: projection_weights(m)[0],
        watched=lambda m: projection_weights(m)[1],
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        epochs=cfg.epochs,
        evals_per_epoch=4,
        data_note=f"KJV Genesis ({len(train)} characters) for training, {cfg.eval_windows} windows of "
        f"{cfg.context} characters of Exodus for validation; vocabulary {len(vocab)}; {cfg.layers} layers, "
        f"width {cfg.dim}, {wn} weight norm",
    )
