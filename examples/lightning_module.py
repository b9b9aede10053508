"""PyTorch Lightning with torch_adamp: AdamP in ``configure_optimizers``.

    bash scripts/setup.sh examples               # or: pip install lightning
    python examples/lightning_module.py          # 200 steps, small CNN, CPU or GPU (about 8 s of CPU time)

``configure_optimizers`` returns the optimizer and a per-step scheduler
(``OneCycleLR``, which also cycles AdamP's ``betas``, like Adam's). The
scale-invariant weights are found numerically from ``example_input_array``,
and ``opt.stats()`` is logged every ``log_every_n_steps``.
"""

from __future__ import annotations

import argparse
import warnings
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from torch_adamp import AdamP, param_groups


class LitCNN(L.LightningModule):
    def __init__(self, lr: float = 3e-3, weight_decay: float = 1e-2, total_steps: int = 200, width: int = 16) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(width, 10),
        )
        self.example_input_array = torch.randn(32, 3, 16, 16)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if (self.global_step % self.trainer.log_every_n_steps == 0) or self.global_step == self.trainer.max_steps:
            stats = self.trainer.optimizers[0].stats()  # the raw AdamP (self.optimizers() is Lightning's wrapper)
            self.log("projected_fraction", stats["projected_fraction"])
            self.log("conv2_lr_over_norm_sq", stats["net.3.weight/lr_over_norm_sq"])

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        # Biases and norm scales without weight decay; `scale_invariant` per weight from a numerical check.
        groups = param_groups(self.net, hp.weight_decay, example_inputs=self.example_input_array.to(self.device))
        # param_groups names the parameters relative to self.net; prefix them as the module names them
        for g in groups:
            g["param_names"] = [f"net.{n}" for n in g["param_names"]]
        opt = AdamP(groups, lr=hp.lr, track_stats=True)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=hp.lr, total_steps=hp.total_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def make_loader(n: int, batch_size: int, image_size: int = 16, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(10, 3, image_size, image_size, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    x = templates[y] + 2.0 * torch.randn(n, 3, image_size, image_size, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True, drop_last=True)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="Lightning with torch_adamp.AdamP")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for torch (default: 1, as torch-adamp's CLI: more threads are slower on small models)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    L.seed_everything(0, verbose=False)
    module = LitCNN(total_steps=args.steps)
    module.example_input_array = torch.randn(32, 3, args.image_size, args.image_size)
    trainer = L.Trainer(
        max_steps=args.steps,
        accelerator=args.accelerator,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        log_every_n_steps=max(1, min(50, args.steps // 4)),
    )
    trainer.fit(module, make_loader(max(args.steps, 16) * args.batch_size // 4, args.batch_size, args.image_size))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    print(metrics)
    return metrics


if __name__ == "__main__":
    main()
