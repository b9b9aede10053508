"""torchtitan's smallest Llama 3 (``debugmodel``, 6.2M parameters) trained with AdamP from torchtitan's own
optimizer and learning-rate containers, on the CPU.

    bash scripts/setup.sh torchtitan           # or: pip install 'torchtitan>=0.3,<0.4' triton (beside your torch)
    python examples/torchtitan_llama.py        # 40 steps, then a checkpoint round trip (11 s CPU)
    python examples/torchtitan_llama.py --optimizer SGDP

``torch_adamp.integrations.torchtitan.OptimizersContainer`` is torchtitan's container with ``"AdamP"``
and ``"SGDP"`` among its optimizer names; in a torchtitan trainer configuration it replaces
``default_adamw(...)``::

    from torch_adamp.integrations.torchtitan import default_adamp
    config.optimizer = default_adamp(lr=8e-4)

Here the container is built the way torchtitan's ``Trainer`` builds it (``config.optimizer.build(
model_parts=[model])``, then ``LRSchedulersContainer``), with two groups: no weight decay on the RMSNorm
scales, AdamW's 0.1 on the rest. torchtitan's ``Trainer`` itself needs a GPU, a tokenizer and a data set
(its flex attention has no backward on the CPU and its varlen attention is CUDA-only), so this script
runs the model with torchtitan's SDPA attention and its own training loop on a synthetic sequence task,
then saves the container's state (torchtitan's flat, name-keyed layout) and loads it into a fresh
container, which takes the same next step. In this pre-norm transformer no weight is followed directly by
a normalisation: the cosine test rarely passes and AdamP steps as AdamW (the printed statistics show it).
"""

from __future__ import annotations

import argparse
import copy
import sys
from typing import Any

import torch
import torch.nn.functional as F


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="torchtitan's debug Llama 3 with torch_adamp's AdamP or SGDP")
    parser.add_argument("--optimizer", choices=["AdamP", "SGDP"], default="AdamP")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--implementation", choices=["fused", "foreach", "for-loop"], default="fused")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch (default: 1)")
    args = parser.parse_args(argv)
    try:  # after parsing, so that --help works without torchtitan
        from torchtitan.components.optimizer import LRSchedulersContainer, ParamGroupConfig
        from torchtitan.models.common.attention import FlexAttention, ScaledDotProductAttention
        from torchtitan.models.llama3 import model_registry

        from torch_adamp.integrations.torchtitan import OptimizersContainer
    except ImportError as e:
        sys.exit(f"this example needs torchtitan 0.3 and triton (bash scripts/setup.sh torchtitan): {e}")

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = model_registry("debugmodel").model
    for _, _, parent, attr in list(config.traverse(FlexAttention.Config)):  # SDPA: trainable on the CPU
        setattr(parent, attr, ScaledDotProductAttention.Config())
    model = config.build()
    model.init_states()
    vocab = config.vocab_size

    if args.optimizer == "AdamP":
        kwargs: dict[str, Any] = {"lr": 3e-3, "betas": (0.9, 0.95), "eps": 1e-8}
    else:
        kwargs = {"lr": 0.3, "momentum": 0.9, "nesterov": True}
    opt_config = OptimizersContainer.Config(
        param_groups=[
            ParamGroupConfig(
                pattern=r"norm\.weight$",
                optimizer_name=args.optimizer,
                optimizer_kwargs={**kwargs, "weight_decay": 0.0},
            ),
            ParamGroupConfig(
                pattern=r".*",
                optimizer_name=args.optimizer,
                optimizer_kwargs={**kwargs, "weight_decay": 0.1, "track_stats": True},
            ),
        ],
        implementation=args.implementation,
    )
    optimizers = opt_config.build(model_parts=[model])
    schedulers = LRSchedulersContainer.Config(warmup_steps=4, decay_ratio=0.8, decay_type="linear").build(
        optimizers=optimizers, training_steps=args.steps
    )
    opt = optimizers.optimizers[0]
    print(f"{type(optimizers).__module__}.{type(optimizers).__name__} holds {type(opt).__module__}."
          f"{type(opt).__name__}: {[len(g['params']) for g in opt.param_groups]} parameters per group, "
          f"fused={opt.param_groups[0]['fused']}, foreach={opt.param_groups[0]['foreach']}")  # fmt: skip

    gen = torch.Generator().manual_seed(0)

    def batch() -> torch.Tensor:  # counting sequences s, s+1, ... (mod vocab): learnable from the context
        starts = torch.randint(0, vocab, (args.batch_size, 1), generator=gen)
        return (starts + torch.arange(args.seq_len + 1)) % vocab

    def loss_of(tokens: torch.Tensor) -> torch.Tensor:
        logits = model(tokens[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())

    losses = []
    for step in range(1, args.steps + 1):
        loss = loss_of(batch())
        loss.backward()
        optimizers.step()
        schedulers.step()
        optimizers.zero_grad()
        losses.append(loss.item())
        if step % 10 == 0 or step == args.steps:
            stats = opt.stats()
            print(f"step {step:3d}  loss {loss.item():.3f}  lr {opt.param_groups[0]['lr']:.2e}  projected: "
                  f"{stats['projected_fraction']:.0%} of the weights")  # fmt: skip

    # a checkpoint round trip through torchtitan's flat, name-keyed optimizer state dict: a fresh container
    # loaded from it takes the same next step as the original
    check_lr = kwargs["lr"] / 10  # the schedule has ended at 0: a step with lr 0 would change nothing
    for g in opt.param_groups:
        g["lr"] = check_lr
    saved_state = copy.deepcopy(optimizers.state_dict())  # its tensors are the live state: copy, as a save would
    saved_weights = {k: v.clone() for k, v in model.state_dict().items()}
    tokens = batch()
    loss_of(tokens).backward()
    optimizers.step()
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    moved = any(not torch.equal(v, saved_weights[k]) for k, v in expected.items())  # the check step did something
    optimizers.zero_grad()
    model.load_state_dict(saved_weights)
    fresh = opt_config.build(model_parts=[model])
    fresh.load_state_dict(saved_state)
    assert all(g["lr"] == check_lr for g in fresh.optimizers[0].param_groups)  # loaded with the state
    loss_of(tokens).backward()
    fresh.step()
    same = moved and all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    print(f"{len(saved_state)} entries in the flat optimizer state dict; a fresh container loaded from it takes "
          f"the same next step: {same}")  # fmt: skip
    return {"losses": losses, "stats": opt.stats(), "resumed_identically": same, "optimizers": optimizers}


if __name__ == "__main__":
    main()
