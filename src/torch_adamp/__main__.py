"""``python -m torch_adamp``: the versions, the native CPU kernels, and which weights of a model are scale-invariant.

    python -m torch_adamp                                  # versions and native kernel status
    python -m torch_adamp --model convnet                  # + find_scale_invariant on a built-in toy model
    python -m torch_adamp --model pkg.models:build --input-shape 8,3,32,32

``--model`` names a built-in toy model (:data:`MODELS`) or ``module:callable``, a callable
importable from the current environment that returns an ``nn.Module`` when called without
arguments; its example input is ``torch.randn(*--input-shape)``. Exit status 2 for bad options.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

import torch
from torch import nn

from . import __version__, _native, find_scale_invariant


def _convnet() -> nn.Module:
    """Conv (no bias) -> BatchNorm -> ReLU, twice, then a linear classifier: the convs are per-channel invariant."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


def _mlp_layernorm() -> nn.Module:
    """Linear (no bias) -> LayerNorm: the first weight is invariant as a whole (layer), not per row."""
    return nn.Sequential(nn.Linear(16, 32, bias=False), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 10))


def _mlp() -> nn.Module:
    """Linear -> ReLU -> Linear: no weight is scale-invariant."""
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10))


#: built-in toy models (no torchvision): name -> (constructor, default input shape)
MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "convnet": (_convnet, (4, 3, 16, 16)),
    "mlp-layernorm": (_mlp_layernorm, (4, 16)),
    "mlp": (_mlp, (4, 16)),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(t) for t in text.replace("x", ",").split(",") if t.strip())
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected positive sizes like 8,3,32,32, got {text!r}")
    return shape


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m torch_adamp",
        description="Print the versions of torch-adamp and torch and the status of the native CPU kernels; "
        "with --model, which weights of the model are scale-invariant (torch_adamp.find_scale_invariant).",
    )
    parser.add_argument(
        "--model",
        metavar="NAME",
        help=f"a built-in toy model ({', '.join(MODELS)}) or module:callable returning an nn.Module",
    )
    parser.add_argument(
        "--input-shape",
        type=_shape,
        metavar="N,C,...",
        help="shape of the random example input (default: the built-in model's; required for module:callable)",
    )
    parser.add_argument("--rtol", type=float, default=1e-3, help="tolerance of the check (default: 1e-3)")
    return parser


def native_status() -> list[str]:
    """Lines describing the native CPU kernels (building them on first use, as the optimizers would)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the failure is printed below
        lib = _native.load()
    if lib is None:
        return [f"native CPU kernels: unavailable ({_native.failure}); the CPU default step uses the multi-tensor path"]
    seconds = _native.build_seconds
    how = "loaded from the cache" if not seconds else f"built in {seconds:.1f} s"
    lines = [f"native CPU kernels: {how}: {_native.library_path}"]
    if _native.degraded is not None:
        lines.append(f"  slower build: {_native.degraded}")
    return lines


def load_model(spec: str) -> tuple[nn.Module, tuple[int, ...] | None]:
    """The model named by ``spec`` and its default input shape (``None`` for ``module:callable``)."""
    if spec in MODELS:
        make, shape = MODELS[spec]
        return make(), shape
    if ":" not in spec:
        raise ValueError(f"unknown model {spec!r}: choose among {', '.join(MODELS)} or give module:callable")
    module_name, _, attr = spec.partition(":")
    obj: object = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{spec} is not callable")
    model = obj()
    if not isinstance(model, nn.Module):
        raise ValueError(f"{spec}() returned {type(model).__name__}, not an nn.Module")
    return model, None


def main(argv: Sequence[str] | None = None, out: Callable[[str], None] = print) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    model: nn.Module | None = None
    shape: tuple[int, ...] | None = None
    if args.model is not None:  # before any output: a bad --model is one line on stderr
        try:
            model, default_shape = load_model(args.model)
        except (ImportError, AttributeError, ValueError, TypeError) as e:
            parser.error(f"--model {args.model}: {type(e).__name__}: {e}")
        shape = args.input_shape or default_shape
        if shape is None:
            parser.error(f"--model {args.model}: give --input-shape")
    out(f"torch-adamp {__version__} ({Path(__file__).parent})")
    out(f"torch {torch.__version__}")
    for line in native_status():
        out(line)
    if model is None or shape is None:
        return 0
    torch.manual_seed(0)
    try:
        views = find_scale_invariant(model, torch.randn(shape), rtol=args.rtol)
    except (RuntimeError, ValueError) as e:  # e.g. an input shape the model does not take
        first = str(e).splitlines()[0] if str(e) else ""
        parser.error(f"--model {args.model} on an input of shape {shape}: {type(e).__name__}: {first}")
    params = dict(model.named_parameters())
    out(f"\nfind_scale_invariant({args.model}, input {'x'.join(map(str, shape))}):")
    width = max((len(n) for n in views), default=0)
    for name, view in views.items():
        out(f"  {name:<{width}}  {view:<7}  {tuple(params[name].shape)}")
    counts = {v: sum(1 for x in views.values() if x == v) for v in ("channel", "layer", "none")}
    out("  " + ", ".join(f"{n} {v}" for v, n in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
