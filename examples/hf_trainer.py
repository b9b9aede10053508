"""Hugging Face ``transformers.Trainer`` with torch_adamp's AdamP, built by the Trainer.

    bash scripts/setup.sh examples             # or: pip install transformers accelerate (beside your torch)
    python examples/hf_trainer.py              # a tiny randomly initialised Llama, 60 steps (about 8 s of CPU time)
    python examples/hf_trainer.py --trainer-groups   # the Trainer's own decay / no-decay groups

The idiomatic route is ``Trainer(..., optimizer_cls_and_kwargs=(AdamP, kwargs))``: the Trainer builds the
optimizer itself, after it has placed the model on its device, and builds its usual scheduler
(``lr_scheduler_type``, ``warmup_steps``) around it. Give ``lr`` in ``kwargs``: on this route the Trainer
passes only ``kwargs`` and the parameters to the class, so ``TrainingArguments.learning_rate`` is not used
(the class default would be; the schedule scales the ``lr`` given here).

The parameters: put ``"params": param_groups(model, weight_decay=...)`` in ``kwargs`` and the Trainer uses
those groups (no weight decay on 1-D parameters, the usual split; ``param_groups(..., example_inputs=x)``
also fixes the view of every weight found scale-invariant). Without ``"params"`` (``--trainer-groups``),
the Trainer makes its own two groups, ``TrainingArguments.weight_decay`` on the weights, none on biases
and normalisation weights. ``Trainer(optimizers=(AdamP(...), None))`` also works, with the model placed
on its final device before the optimizer is built.

A callback reads ``opt.stats()`` to log which fraction of the weights AdamP treated as scale-invariant.
In a pre-norm transformer like this one, no weight is followed directly by a normalisation, the cosine
test rarely or never passes, and AdamP behaves as AdamW; the statistics make that visible. (See the
diagnostics guide for checking a model with ``find_scale_invariant``.)
"""

from __future__ import annotations

import argparse
import tempfile
from typing import Any

import torch
from torch.utils.data import Dataset

from torch_adamp import AdamP, param_groups


class CountingSequences(Dataset):
    """Token sequences ``s, s+1, s+2, ...`` (mod vocab) from random starts: a causal LM learns them fast."""

    def __init__(self, n: int, seq_len: int, vocab: int, seed: int = 0) -> None:
        starts = torch.randint(0, vocab, (n, 1), generator=torch.Generator().manual_seed(seed))
        self.ids = (starts + torch.arange(seq_len)) % vocab

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

    parser = argparse.ArgumentParser(description="transformers.Trainer with torch_adamp.AdamP")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--vocab", type=int, default=128)
    parser.add_argument("--output-dir", default=None, help="default: a temporary folder (nothing is saved)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for torch (default: 1, as torch-adamp's CLI: more threads are slower on small models)",
    )
    parser.add_argument(
        "--trainer-groups",
        action="store_true",
        help="let the Trainer group the parameters (its weight_decay on weights, none on biases and norms)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=args.seq_len,
    )
    model = LlamaForCausalLM(config)  # random initialisation: nothing is downloaded

    # the optimizer's arguments; the Trainer adds the parameters ("params" here: our groups, else its own)
    adamp_kwargs: dict[str, Any] = {"lr": 3e-3, "betas": (0.9, 0.98), "track_stats": True}
    if not args.trainer_groups:
        adamp_kwargs["params"] = param_groups(model, weight_decay=0.01)

    class ProjectionStats(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any):
            opt = getattr(kwargs["optimizer"], "optimizer", kwargs["optimizer"])  # under accelerate's wrapper
            stats = opt.stats()
            if stats:
                print(f"step {state.global_step}: projected_fraction={stats['projected_fraction']:.2f}")

    with tempfile.TemporaryDirectory() as tmp:
        training_args = TrainingArguments(
            output_dir=args.output_dir or tmp,
            max_steps=args.steps,
            per_device_train_batch_size=args.batch_size,
            lr_scheduler_type="cosine",
            warmup_steps=max(1, args.steps // 10),
            logging_steps=max(1, args.steps // 6),
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            weight_decay=0.01,  # used by the Trainer's own groups (--trainer-groups) only
            use_cpu=not torch.cuda.is_available(),
            dataloader_pin_memory=False,
        )
        trainer = Trainer(
            model=model,
            args=training_args,
            train_dataset=CountingSequences(1024, args.seq_len, args.vocab),
            optimizer_cls_and_kwargs=(AdamP, adamp_kwargs),  # the Trainer builds AdamP, then its scheduler
            callbacks=[ProjectionStats()],
        )
        result = trainer.train()
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert isinstance(opt, AdamP), type(opt)
    print(f"final training loss {result.training_loss:.3f}")
    groups = [{"weight_decay": g["weight_decay"], "params": len(g["params"])} for g in opt.param_groups]
    return {
        "training_loss": result.training_loss,
        "log_history": trainer.state.log_history,
        "stats": opt.stats(),
        "groups": groups,
    }


if __name__ == "__main__":
    main()
