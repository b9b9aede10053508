"""Recorded trajectories of every path and option set: the guard of refactorings.

``python tests/golden/trajectories.py record`` steps AdamP and SGDP on every path
(per-tensor, multi-tensor, native fused, the CPU default, the compile back end),
with every option set, in float32, float64 and bfloat16, on tensors that take
every branch of the native kernel (staged, speculated with right and wrong
guesses, two-pass, never projected), and writes a SHA-256 digest of the bytes
of every parameter and state tensor after each run to ``trajectories.json``,
keyed by the platform (CPU, compiler, torch): bits depend on all three.
``tests/test_golden.py`` recomputes them and requires the same bits.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

HERE = Path(__file__).resolve().parent
FILE = HERE / "trajectories.json"

#: conv, matrix, 3-D, one row, 1-D, 0-d, empty, and two tensors above the kernel's 1 MiB staging threshold
#: (speculated: the view schedule below makes their guesses right and wrong)
SHAPES: list[tuple[int, ...]] = [
    (16, 8, 3, 3),
    (12, 20),
    (6, 1, 5),
    (1, 30),
    (7,),
    (),
    (0, 4),
    (300, 1024),
    (256, 128, 3, 3),
]
STEPS = 7
#: per step, the kind of gradient of every projectable tensor: c = orthogonal per row (channel view), l =
#: orthogonal to the whole tensor (layer view), n = random (no projection); repeated kinds let a guess hold
SCHEDULE = "ccnnlcc"

ADAMP_OPTIONS: dict[str, dict[str, Any]] = {
    "default": {},
    "wd_nesterov": {"weight_decay": 0.1, "nesterov": True},
    "wd_maximize": {"weight_decay": 0.05, "maximize": True, "betas": (0.8, 0.99)},
    "channel": {"scale_invariant": "channel", "weight_decay": 0.1},
    "layer": {"scale_invariant": "layer"},
    "never": {"scale_invariant": False, "weight_decay": 0.1},
    "tensor_lr": {"lr": "tensor", "weight_decay": 0.1},
}
SGDP_OPTIONS: dict[str, dict[str, Any]] = {
    "plain": {},
    "nesterov_wd": {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-3},
    "momentum_pm": {"momentum": 0.9, "weight_decay": 1e-3},
    "momentum_no_pm": {"momentum": 0.9, "weight_decay": 1e-3, "project_momentum": False},
    "dampening": {"momentum": 0.9, "dampening": 0.1},
    "channel": {"momentum": 0.9, "scale_invariant": "channel"},
    "layer": {"momentum": 0.9, "scale_invariant": "layer", "weight_decay": 1e-3},
    "never": {"momentum": 0.9, "scale_invariant": False, "weight_decay": 1e-3},
    "maximize": {"momentum": 0.5, "maximize": True},
    "tensor_lr": {"momentum": 0.9, "lr": "tensor"},
}
PATHS: dict[str, dict[str, Any]] = {
    "single": {"foreach": False},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
    "default": {},
    "compile": {"fused": True, "backend": "compile"},
}
#: option sets also run on the compile back end (slow to compile: a few)
COMPILED = ("adamp/wd_nesterov", "sgdp/momentum_pm", "adamp/tensor_lr")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def platform_key() -> str:
    """CPU model and flags, the C compiler and torch: what the bits depend on."""
    cpu = [platform.machine()]
    try:
        with open("/proc/cpuinfo") as f:
            cpu += [ln.strip() for ln in f if ln.startswith(("model name", "flags"))][:2]
    except OSError:
        pass
    try:
        cc = subprocess.run(["cc", "--version"], capture_output=True, text=True, timeout=30).stdout.splitlines()[:1]
    except (OSError, subprocess.SubprocessError):
        cc = []
    text = "\n".join([*cpu, *cc, torch.__version__])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _orthogonal(p: Tensor, g: Tensor, rows: bool) -> Tensor:
    p64 = p.double().reshape(p.shape[0] if rows else 1, -1)
    g64 = g.double().reshape_as(p64)
    g64 = g64 - (g64 * p64).sum(1, keepdim=True) / (p64 * p64).sum(1, keepdim=True).clamp_min(1e-300) * p64
    return g64.reshape(g.shape)


def _gradients(params: list[Tensor], step: int, gen: torch.Generator) -> list[Tensor]:
    out = []
    kind = SCHEDULE[step % len(SCHEDULE)]
    for p in params:
        g = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        if p.dim() > 1 and p.numel() > 0 and kind in "cl":
            g = _orthogonal(p.detach(), g, rows=kind == "c")
        out.append(g.to(p.dtype))
    return out


def _bytes(t: Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _digest(params: list[Tensor], opt: torch.optim.Optimizer) -> str:
    h = hashlib.sha256()
    for p in params:
        h.update(_bytes(p))
        for name, t in sorted(opt.state[p].items()):
            if isinstance(t, Tensor):
                h.update(name.encode() + _bytes(t))
    return h.hexdigest()[:24]


def run_one(kind: str, options: dict[str, Any], path: dict[str, Any], dtype: torch.dtype) -> str:
    import torch_adamp

    gen = torch.Generator().manual_seed(1234)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(dtype)) for s in SHAPES]
    kw = dict(options)
    path = dict(path)
    backend = path.pop("backend", None)
    if kw.get("lr") == "tensor":
        kw["lr"] = torch.tensor(0.01 if kind == "sgdp" else 1e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # torch's reductions and the kernel's row split depend on the thread count
    try:
        with _backend(backend):  # read when the optimizer is built
            if kind == "sgdp":
                kw.setdefault("lr", 0.01)
                opt: torch.optim.Optimizer = torch_adamp.SGDP(params, **kw, **path)
            else:
                opt = torch_adamp.AdamP(params, **kw, **path)
        for step in range(STEPS):
            for p, g in zip(params, _gradients(params, step, gen), strict=True):
                p.grad = g
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return _digest(params, opt)


def _backend(name: str | None) -> Any:
    import contextlib

    if name is None:
        return contextlib.nullcontext()
    os.environ["TORCH_ADAMP_FUSED"] = name

    @contextlib.contextmanager
    def restore() -> Iterator[None]:
        try:
            yield
        finally:
            os.environ.pop("TORCH_ADAMP_FUSED", None)

    return restore()


def cases() -> Iterator[tuple[str, str, dict[str, Any], str, dict[str, Any], str]]:
    for kind, table in (("adamp", ADAMP_OPTIONS), ("sgdp", SGDP_OPTIONS)):
        for oname, options in table.items():
            for pname, path in PATHS.items():
                for dname in DTYPES:
                    if pname == "compile" and (f"{kind}/{oname}" not in COMPILED or dname != "float32"):
                        continue
                    if dname != "float32" and oname not in ("default", "wd_nesterov", "momentum_pm", "nesterov_wd"):
                        continue
                    yield f"{kind}/{oname}/{pname}/{dname}", kind, options, pname, path, dname


def compute() -> dict[str, str]:
    out = {}
    for key, kind, options, _, path, dname in cases():
        out[key] = run_one(kind, options, path, DTYPES[dname])
    return out


def load() -> dict[str, dict[str, str]]:
    return json.loads(FILE.read_text()) if FILE.exists() else {}


if __name__ == "__main__":
    if sys.argv[1:] == ["record"]:
        data = load()
        data[platform_key()] = compute()
        FILE.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
        print(f"recorded {len(data[platform_key()])} digests for platform {platform_key()} in {FILE}")
    else:
        print(__doc__)
