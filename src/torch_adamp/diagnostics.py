"""Which weights are scale-invariant, checked on the real model; parameter groups in one call.

:func:`find_scale_invariant` scales each weight (the whole tensor: *layer*
view; each output channel by a different factor: *channel* view, as the
optimizers define them) and compares the model's output, or loss, with the
unscaled one. Factors are powers of two, so the scaling itself is exact in
floating point and only the normalisation's ``eps`` moves the output of a truly
scale-invariant weight. Nothing about module types is assumed.

:func:`param_groups` builds the usual groups: no weight decay on 1-D parameters
and, given example inputs, ``scale_invariant`` set per weight from that check.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter
from torch.utils._pytree import tree_leaves

from .projection import projectable

View = Literal["channel", "layer", "none"]

#: per-row exponents of the channel trials (row ``i`` uses ``pattern[i % len(pattern)]``)
_CHANNEL_TRIALS = ((1, 2), (2, 1, 0))
#: factors of the layer trials
_LAYER_TRIALS = (2.0, 4.0)


@contextmanager
def _preserved(model: nn.Module) -> Iterator[Callable[[], None]]:
    """Restore parameters, buffers, train/eval flags and RNG state on exit.

    Yields ``reset_rng()``, which puts the RNG back to its state at entry, so
    that every forward draws the same random numbers (dropout masks).
    """
    tensors = [*model.parameters(), *model.buffers()]
    saved = [t.detach().clone() for t in tensors]
    flags = [(m, m.training) for m in model.modules()]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    def reset_rng() -> None:
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)

    try:
        yield reset_rng
    finally:
        reset_rng()
        for m, training in flags:
            m.training = training
        with torch.no_grad():
            for t, s in zip(tensors, saved, strict=True):
                if not torch.equal(t, s):
                    t.copy_(s)


def _close(ref: list[Any], out: list[Any], rtol: float) -> bool:
    """Whether every leaf of ``out`` matches ``ref``: ``||out - ref|| <= rtol ||ref||`` for floats."""
    if len(ref) != len(out):
        return False
    for a, b in zip(ref, out, strict=True):
        if isinstance(a, Tensor) and (a.is_floating_point() or a.is_complex()):
            if not isinstance(b, Tensor) or a.shape != b.shape:
                return False
            wide = torch.complex128 if a.is_complex() else torch.float64
            a64, b64 = a.detach().to(wide), b.detach().to(wide)
            if not torch.linalg.vector_norm(b64 - a64) <= rtol * torch.linalg.vector_norm(a64):  # NaN: not close
                return False
        elif isinstance(a, Tensor):
            if not (isinstance(b, Tensor) and torch.equal(a, b)):
                return False
        elif a != b:
            return False
    return True


def find_scale_invariant(
    model: nn.Module,
    *example_inputs: Any,
    loss_fn: Callable[[Any], Tensor] | None = None,
    rtol: float = 1e-3,
    train: bool = True,
) -> dict[str, View]:
    """Check numerically which weights of ``model`` are scale-invariant, and in which view.

    Each weight with at least 2 dimensions is scaled per output channel
    (``w[i]`` by different powers of two) and as a whole, and ``model(*example_inputs)``
    (or ``loss_fn(output)``) is compared with the unscaled result: the weight is
    invariant when every trial stays within ``rtol`` of it (relative 2-norm,
    per output tensor). A weight that passes must also *matter*: a random
    perturbation of it must change the result, otherwise it is reported
    ``"none"`` (unused or zero weights). Parameters with fewer than 2
    dimensions are reported ``"none"`` without a test, since the optimizers
    never project them.

    The forwards run in training mode (``train=True``; BatchNorm is
    scale-invariant only with batch statistics) under ``torch.no_grad()``, each
    with the RNG reset to its state at entry, so dropout draws the same masks.
    Afterwards parameters, buffers (running statistics), every submodule's
    train/eval flag and the CPU and CUDA RNG states are as they were.

    Args:
        model: any module.
        example_inputs: positional inputs of ``model.forward`` (as many as it takes).
        loss_fn: compare ``loss_fn(output)`` instead of the output (e.g. to
            include the targets: ``lambda out: F.cross_entropy(out, y)``).
        rtol: tolerance relative to the scale of the output.
        train: put every submodule in training mode for the check.

    Returns:
        ``{parameter name: "channel" | "layer" | "none"}`` in ``named_parameters()`` order.
    """
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    if any(isinstance(t, (UninitializedParameter, UninitializedBuffer)) for t in (*params.values(), *buffers.values())):
        raise ValueError("find_scale_invariant: the model has uninitialised lazy modules; run one forward first")
    with _preserved(model) as reset_rng:
        if train:
            model.train()

        def run(name: str | None = None, value: Tensor | None = None) -> list[Any]:
            # buffers are copies: running statistics of the real model are never touched
            tensors = {n: b.clone() for n, b in buffers.items()}
            if name is not None and value is not None:
                tensors[name] = value
            reset_rng()
            with torch.no_grad():
                out = functional_call(model, tensors, example_inputs)
                return tree_leaves(loss_fn(out) if loss_fn is not None else out)

        ref = run()
        gen = torch.Generator().manual_seed(0)
        result: dict[str, View] = {}
        for name, p in params.items():
            if not projectable(p):
                result[name] = "none"
                continue
            w = p.detach()

            def invariant(factors: Tensor, name: str = name, w: Tensor = w) -> bool:
                return _close(ref, run(name, w * factors.to(w.device, w.dtype)), rtol)

            rows, row_shape = torch.arange(w.shape[0]), (-1,) + (1,) * (w.dim() - 1)
            per_row = [2.0 ** torch.tensor(pattern)[rows % len(pattern)].view(row_shape) for pattern in _CHANNEL_TRIALS]
            view: View = "none"
            if all(invariant(factors) for factors in per_row):
                view = "channel"
            elif all(invariant(torch.tensor(c)) for c in _LAYER_TRIALS):
                view = "layer"
            if view != "none":
                noise = torch.randn(w.shape, generator=gen).to(w.device, w.dtype)
                scale = torch.linalg.vector_norm(w) / math.sqrt(w.numel())
                if _close(ref, run(name, w + noise * scale), rtol):
                    view = "none"  # the result does not depend on this weight: nothing to tell
            result[name] = view
    return result


def param_groups(
    model: nn.Module,
    weight_decay: float,
    *,
    example_inputs: Any = None,
    loss_fn: Callable[[Any], Tensor] | None = None,
    rtol: float = 1e-3,
) -> list[dict[str, Any]]:
    """Parameter groups for :class:`~torch_adamp.AdamP` / :class:`~torch_adamp.SGDP` in one call.

    Trainable parameters with fewer than 2 dimensions (biases, norm scales) get
    no weight decay; the others get ``weight_decay``. Given ``example_inputs``
    (a tensor, or a tuple of the positional inputs of ``model``), each weight
    also gets ``scale_invariant`` from :func:`find_scale_invariant`:
    ``"channel"`` or ``"layer"``, or ``False`` (never projected, full weight
    decay) for ``"none"``. Without them, the optimizer's ``scale_invariant``
    (``"auto"`` by default) applies. Groups carry ``param_names``, so
    ``optimizer.stats()`` keys use the parameter names. Empty groups are left out.
    """
    views: dict[str, View] | None = None
    if example_inputs is not None:
        args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
        views = find_scale_invariant(model, *args, loss_fn=loss_fn, rtol=rtol)
    buckets: dict[Any, list[tuple[str, Tensor]]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            key = "no_decay" if p.dim() < 2 else (views[name] if views is not None else "decay")
            buckets.setdefault(key, []).append((name, p))
    options: dict[Any, dict[str, Any]] = {
        "decay": {"weight_decay": weight_decay},
        "channel": {"weight_decay": weight_decay, "scale_invariant": "channel"},
        "layer": {"weight_decay": weight_decay, "scale_invariant": "layer"},
        "none": {"weight_decay": weight_decay, "scale_invariant": False},
        "no_decay": {"weight_decay": 0.0},
    }
    return [
        {"params": [p for _, p in buckets[key]], "param_names": [n for n, _ in buckets[key]], **opts}
        for key, opts in options.items()
        if key in buckets
    ]
