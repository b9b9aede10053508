"""LightningCLI with torch_adamp's optimizers chosen on the command line, no optimizer code in the module.

    bash scripts/setup.sh examples      # lightning, and jsonargparse[signatures], the parser LightningCLI needs
    python examples/lightning_cli.py fit            # AdamP with this file's defaults, 60 steps (about 6 s of CPU time)
    python examples/lightning_cli.py fit --optimizer torch_adamp.AdamP --optimizer.lr 1e-3 \\
        --optimizer.weight_decay 0.05 --optimizer.track_stats true
    python examples/lightning_cli.py fit --optimizer torch_adamp.integrations.lightning.SGDP \\
        --optimizer.lr 0.1 --optimizer.momentum 0.9 --optimizer.nesterov true --optimizer.track_stats true
    python examples/lightning_cli.py fit --optimizer torch_adamp.AdamP --print_config   # the resolved YAML

``--optimizer CLASS`` takes any ``torch.optim.Optimizer`` subclass by its import path, and
``--optimizer.ARG VALUE`` every argument of its signature (``lr``, ``betas``, ``weight_decay``,
``delta``, ``wd_ratio``, ``nesterov``, ``scale_invariant``, ``track_stats``, ...; ``--optimizer.help
torch_adamp.AdamP`` lists them). ``--lr_scheduler CLASS`` works the same way; the same keys go in a
``--config`` YAML file (``optimizer: {class_path: torch_adamp.AdamP, init_args: {lr: 0.001}}``). For SGDP
use the class path ``torch_adamp.integrations.lightning.SGDP``: ``torch_adamp.SGDP`` keeps the
reference's ``lr=required`` sentinel, which the command line's parser (jsonargparse) rejects.

LightningCLI hands the optimizer ``model.parameters()``, one group: every parameter gets the weight
decay, biases and norm scales included. For the usual no-decay split (``torch_adamp.param_groups``),
define ``configure_optimizers`` in the module instead (examples/lightning_module.py); when a module
defines it and ``--optimizer`` is given too, LightningCLI replaces the module's with its own, with a
warning.

The module here logs ``opt.stats()`` (with ``--optimizer.track_stats true``, this file's default) to
show which weights AdamP/SGDP project: the convolutions before BatchNorm.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LightningCLI
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset


class CNN(L.LightningModule):
    """Two conv-BatchNorm-ReLU blocks (scale-invariant conv weights) and a linear head; no optimizer code."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        opt = self.trainer.optimizers[0]  # the optimizer LightningCLI built (self.optimizers() is a wrapper)
        if getattr(opt, "defaults", {}).get("track_stats") and self.global_step > 0:
            self.log("projected_fraction", opt.stats()["projected_fraction"])
        return loss


class RandomImages(L.LightningDataModule):
    """Noisy copies of 10 random templates: a task a small CNN learns in a few dozen steps."""

    def __init__(self, n: int = 1024, batch_size: int = 64, image_size: int = 16) -> None:
        super().__init__()
        self.n, self.batch_size, self.image_size = n, batch_size, image_size

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        templates = torch.randn(10, 3, self.image_size, self.image_size, generator=g)
        y = torch.randint(0, 10, (self.n,), generator=g)
        x = templates[y] + torch.randn(self.n, 3, self.image_size, self.image_size, generator=g)
        return DataLoader(TensorDataset(x, y), batch_size=self.batch_size, shuffle=True, drop_last=True)


class CLI(LightningCLI):
    def add_arguments_to_parser(self, parser: Any) -> None:
        # what `fit` uses without --optimizer: AdamP with statistics (any --optimizer... given replaces it).
        # The optimizer options are added here, as LightningCLI would add them after this method, so that
        # they can have a default.
        parser.add_optimizer_args((torch.optim.Optimizer,))
        parser.set_defaults(
            {
                "optimizer": {
                    "class_path": "torch_adamp.AdamP",
                    "init_args": {"lr": 3e-3, "weight_decay": 1e-2, "track_stats": True},
                }
            }
        )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    torch.set_num_threads(1)  # a small model: more threads are slower, as in torch-adamp's CLI
    cli = CLI(
        CNN,
        RandomImages,
        args=argv,
        seed_everything_default=0,
        save_config_callback=None,  # writes no config.yaml into the working folder
        trainer_defaults={
            "max_steps": 60,
            "accelerator": "cpu",
            "devices": 1,
            "logger": False,
            "enable_checkpointing": False,
            "enable_model_summary": False,
            "enable_progress_bar": False,
            "log_every_n_steps": 10,
        },
    )
    if cli.subcommand is None:  # run=False
        return {}
    opt = cli.trainer.optimizers[0]
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    print(f"{type(opt).__module__}.{type(opt).__name__}: {metrics}")
    return {"optimizer": opt, "metrics": metrics}


if __name__ == "__main__":
    main()
