"""Step-time benchmark: AdamP / SGDP (every path) against torch.optim and the reference ``adamp``.

Run ``python benchmarks/step_time.py`` from a clone (``--help`` for the options;
``torch-adamp bench`` runs this file too, without the targets). For each
parameter set it builds one set of parameters and gradients, then times
``optimizer.step()`` for every optimizer of a family (Adam-like, SGD-like)
**interleaved round-robin** in one process, and prints the median step time in
ms, its ratio to torch's AdamW/SGD with ``foreach=True`` and ``fused=True``, the
optimizer-state bytes and the peak temporary bytes of one step.

Method, and why:

* **Parameter sets**: the exact tensor shapes of ResNet-50 (161 tensors, 25.6M
  parameters) and ViT-B/16 (152 tensors, 86.6M), derived below from the
  architectures (no torchvision needed), and 1000 tensors of 64 x 64 (per-tensor
  overhead). ``--scale k`` divides every dimension >= 16 by ``k`` (``--quick``).
* **Gradients** are fixed random tensors shaped like what the projection sees
  in practice: for ResNet-50 every conv weight gets a gradient orthogonal to
  each of its output channels (a conv followed by BatchNorm is scale-invariant
  per channel), so AdamP projects them in the channel view; ViT-B/16 gets plain
  random gradients (its linear layers are not scale-invariant: no projection);
  the 1000-tensor set mixes channel-orthogonal, layer-orthogonal and random
  gradients, so all three outcomes of the test occur. The decisions are printed.
* **Learning rate 1e-10** for every optimizer: the weights stay put, so the
  projection decisions stay those printed, while every optimizer does exactly
  the arithmetic it does at any learning rate (no implementation has a branch
  on the value of ``lr``). All optimizers of a family share the parameters and
  gradients; each keeps its own state.
* **Hyper-parameters**: Adam family ``betas=(0.9, 0.999), eps=1e-8,
  weight_decay=1e-2`` (AdamW's default decay, decoupled in both AdamW and
  AdamP); SGD family ``momentum=0.9``, no weight decay (SGD's coupled decay and
  SGDP's decoupled one are different computations), no nesterov.
* **Timing**: each round steps every optimizer once, in a cyclic order that
  puts each torch baseline right before the path of ours it is compared with
  (the starting point rotates every round); the table shows medians over the
  rounds, and each ratio is the median of the per-round ratios, so that load
  coming and going elsewhere on the machine hits both sides of a ratio.
* **Memory**: state bytes are the tensors in ``optimizer.state``; peak
  temporaries are the high-water mark of the bytes that torch ops allocate (and
  have not freed) during one step, plus, for the native kernel, its C scratch.
* **Lower bound**: bytes that must move per parameter in the steady state
  (AdamW 28: read w, g, m, v, write w, m, v; SGD 20; SGDP 28: the
  scale-invariance test needs ``<w,g>``, ``||w||`` and ``||g||`` of the whole
  tensor before ``w`` may change, so ``w`` and ``g`` of projectable tensors are
  read twice by the two sweeps (a tensor the kernel speculates on moves 24);
  AdamP 28 for tensors small enough to stage in the cache, 32 for larger
  projectable ones: the speculative sweep under the view of the last step also
  copies the old ``w``, and the first step, without a guess, reads ``w`` and
  ``g`` twice: 36), divided by a measured in-place streaming
  bandwidth (the best of ``a.mul_(1)`` and ``a.add_(b)`` on buffers larger than
  the caches; ``b.copy_(a)`` is printed too), and the bandwidth the fused steps
  actually achieve over those bytes.
  Fused kernels with more concurrent streams can beat the simple-op figure, so
  the "bound" is a yardstick, not a guarantee.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import math
import platform
import statistics
import sys
import tempfile
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from torch_adamp import SGDP, AdamP, LionP, Projected, _native, projection
from torch_adamp.engine import Backend
from torch_adamp.engine import native as _native_backend

Shape = tuple[int, ...]

# --------------------------------------------------------------------------------------------
# parameter sets
# --------------------------------------------------------------------------------------------


def resnet50_shapes() -> list[Shape]:
    """Parameter shapes of torchvision's ``resnet50()`` (bottleneck v1.5), in ``parameters()`` order."""
    shapes: list[Shape] = [(64, 3, 7, 7), (64,), (64,)]  # stem conv, bn
    inplanes = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            shapes += [(width, inplanes, 1, 1), (width,), (width,)]  # conv1, bn1
            shapes += [(width, width, 3, 3), (width,), (width,)]  # conv2, bn2
            shapes += [(width * 4, width, 1, 1), (width * 4,), (width * 4,)]  # conv3, bn3
            if b == 0:
                shapes += [(width * 4, inplanes, 1, 1), (width * 4,), (width * 4,)]  # downsample conv, bn
            inplanes = width * 4
    return [*shapes, (1000, 2048), (1000,)]  # fc


def vit_b16_shapes() -> list[Shape]:
    """Parameter shapes of torchvision's ``vit_b_16()`` (224 px, 1000 classes), in ``parameters()`` order."""
    d, mlp, layers, tokens = 768, 3072, 12, (224 // 16) ** 2 + 1
    shapes: list[Shape] = [(1, 1, d), (d, 3, 16, 16), (d,), (1, tokens, d)]  # class token, patch conv, pos emb
    for _ in range(layers):
        shapes += [(d,), (d,)]  # ln_1
        shapes += [(3 * d, d), (3 * d,), (d, d), (d,)]  # self_attention in_proj, out_proj
        shapes += [(d,), (d,)]  # ln_2
        shapes += [(mlp, d), (mlp,), (d, mlp), (d,)]  # mlp
    return [*shapes, (d,), (d,), (1000, d), (1000,)]  # final ln, head


def small_shapes() -> list[Shape]:
    return [(64, 64)] * 1000


@dataclass(frozen=True)
class ParamSet:
    key: str
    title: str
    shapes: Callable[[], list[Shape]]
    grads: str  # "conv": channel-orthogonal 4-D weights; "random"; "mixed"
    expected: tuple[int, int]  # tensors, parameters (unscaled)


SETS: dict[str, ParamSet] = {
    s.key: s
    for s in (
        ParamSet("resnet50", "ResNet-50", resnet50_shapes, "conv", (161, 25_557_032)),
        ParamSet("vit_b16", "ViT-B/16", vit_b16_shapes, "random", (152, 86_567_656)),
        ParamSet("small", "1000 x (64, 64)", small_shapes, "mixed", (1000, 4_096_000)),
    )
}


def scaled(shapes: Sequence[Shape], scale: int) -> list[Shape]:
    """Every dimension >= 16 divided by ``scale`` (a smaller model with the same structure)."""
    if scale <= 1:
        return list(shapes)
    return [tuple(d // scale if d >= 16 else d for d in s) for s in shapes]


def _orthogonal(p: Tensor, g: Tensor, rows: bool) -> Tensor:
    """``g`` minus its component along ``p`` (per row, or for the whole tensor), in float64."""
    p64 = p.double().reshape(p.shape[0] if rows else 1, -1)
    g64 = g.double().reshape_as(p64)
    g64 = g64 - (g64 * p64).sum(1, keepdim=True) / (p64 * p64).sum(1, keepdim=True) * p64
    return g64.reshape(g.shape).to(g.dtype)


def make_tensors(pset: ParamSet, scale: int = 1, seed: int = 0) -> tuple[list[Tensor], list[Tensor]]:
    """Parameters (``nn.Parameter``) and their fixed gradients for one set."""
    gen = torch.Generator().manual_seed(seed)
    params: list[Tensor] = []
    grads: list[Tensor] = []
    for i, shape in enumerate(scaled(pset.shapes(), scale)):
        p = torch.randn(shape, generator=gen)
        g = torch.randn(shape, generator=gen)
        if len(shape) > 1:
            if pset.grads == "conv" and len(shape) == 4:
                g = _orthogonal(p, g, rows=True)
            elif pset.grads == "mixed" and i % 4 < 2:
                g = _orthogonal(p, g, rows=True)
            elif pset.grads == "mixed" and i % 4 == 2:
                g = _orthogonal(p, g, rows=False)
        param = torch.nn.Parameter(p)
        param.grad = g
        params.append(param)
        grads.append(g)
    return params, grads


def decisions(params: Sequence[Tensor]) -> dict[str, int]:
    """Views AdamP/SGDP take at the first step (the decision depends on ``w`` and ``g`` only)."""
    count = {"channel": 0, "layer": 0, "none": 0, "not projectable": 0}
    for p in params:
        assert p.grad is not None
        if not projection.projectable(p):
            count["not projectable"] += 1
            continue
        _, view, _ = projection.projection_coefficients([p.detach()], [p.grad], [p.grad], delta=0.1, eps=1e-8)
        count[projection.VIEW_NAMES[int(view[0])]] += 1
    return count


# --------------------------------------------------------------------------------------------
# optimizers
# --------------------------------------------------------------------------------------------

LR = 1e-10
ADAM_HP: dict[str, Any] = dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
SGD_HP: dict[str, Any] = dict(momentum=0.9)
#: the Lion family (LionP, lion-pytorch's Lion alone and under Projected) against torch's AdamW (ADAM_HP)
LION_HP: dict[str, Any] = dict(betas=(0.9, 0.99), weight_decay=1e-2)
FAMILIES = ("adam", "sgd", "lion")
PATHS = ("torch", "reference", "single", "foreach", "fused", "default", "compiled")
DEFAULT_PATHS = ("torch", "reference", "single", "foreach", "fused", "default")


@dataclass
class Entry:
    name: str
    family: str  # "adam" or "sgd"
    path: str  # one of PATHS
    make: Callable[[list[Tensor]], torch.optim.Optimizer] | None  # None: the default path, an alias
    kind: str | None = None  # "adamp" / "sgdp" for ours
    backend: str | None = None  # the back end of fused=True, set on the optimizer when built
    alias_of: str | None = None
    times: list[float] = field(default_factory=list)
    first_step: float = math.nan
    state_bytes: int = 0
    peak_temp: int = 0


def _reference() -> Any:
    try:
        import adamp  # type: ignore[import-untyped,import-not-found,unused-ignore]
    except ImportError:
        return None
    return adamp


Maker = Callable[[list[Tensor]], torch.optim.Optimizer]


def _maker(cls: Any, backend: str | None = None, **kwargs: Any) -> Maker:
    def make(params: list[Tensor]) -> torch.optim.Optimizer:
        opt: torch.optim.Optimizer = cls(params, lr=LR, **kwargs)
        if backend is not None:
            opt._workspace.backend = Backend(backend)  # type: ignore[attr-defined]
        return opt

    return make


def _lion_pytorch() -> Any:
    try:
        import lion_pytorch
    except ImportError:
        return None
    return lion_pytorch


def _projected_lion(params: list[Tensor]) -> torch.optim.Optimizer:
    return Projected(_lion_pytorch().Lion(params, lr=LR, **LION_HP))


def _our_paths(
    cls: Any, name: str, extra: str, family: str, kind: str, hp: dict[str, Any], paths: Sequence[str]
) -> list[Entry]:
    """Our optimizer ``cls`` on the per-tensor, multi-tensor and fused paths that ``paths`` asks for."""
    options: dict[str, dict[str, bool]] = {
        "single": {"foreach": False},
        "foreach": {"foreach": True},
        "fused": {"fused": True},
    }
    entries: list[Entry] = []
    for path, opts in options.items():
        if path in paths:
            flag = ", ".join(f"{k}={v}" for k, v in opts.items())
            backend = "native" if path == "fused" and _native_backend.available() else None
            make = _maker(cls, backend, **hp, **opts)
            entries.append(Entry(f"{name}({extra}{flag})", family, path, make, kind, backend))
    return entries


def lion_catalogue(paths: Sequence[str]) -> list[Entry]:
    """The Lion family: torch's AdamW (the yardstick), lion-pytorch's Lion alone and under ``Projected``
    (its "reference" rows: what LionP replaces), and LionP by path."""
    entries: list[Entry] = []
    if "torch" in paths:
        for flag in ("foreach", "fused"):
            entries.append(
                Entry(
                    f"torch AdamW({flag}=True)", "lion", "torch", _maker(torch.optim.AdamW, **ADAM_HP, **{flag: True})
                )
            )
    if "reference" in paths and _lion_pytorch() is not None:
        entries.append(Entry("lion_pytorch.Lion", "lion", "reference", _maker(_lion_pytorch().Lion, **LION_HP)))
        entries.append(Entry("Projected(lion_pytorch.Lion)", "lion", "reference", _projected_lion))
    entries += _our_paths(LionP, "LionP", "", "lion", "lionp", LION_HP, paths)
    if "default" in paths:
        entries.append(Entry("LionP() default", "lion", "default", None, "lionp"))
    return entries


def catalogue(family: str, paths: Sequence[str]) -> list[Entry]:
    """The optimizers of one family, in table order (torch, reference, ours by path)."""
    if family == "lion":
        return lion_catalogue(paths)
    adam = family == "adam"
    torch_cls: Any = torch.optim.AdamW if adam else torch.optim.SGD
    ours: Any = AdamP if adam else SGDP
    hp = ADAM_HP if adam else SGD_HP
    tname, oname, kind = ("AdamW", "AdamP", "adamp") if adam else ("SGD", "SGDP", "sgdp")
    extra = "" if adam else "momentum=0.9, "
    entries: list[Entry] = []
    if "torch" in paths:
        for flag in ("foreach", "fused"):
            entries.append(
                Entry(f"torch {tname}({extra}{flag}=True)", family, "torch", _maker(torch_cls, **hp, **{flag: True}))
            )
    ref = _reference()
    if "reference" in paths and ref is not None:
        entries.append(
            Entry(f"adamp.{oname} 0.3.0 (reference)", family, "reference", _maker(getattr(ref, oname), **hp))
        )
    entries += _our_paths(ours, oname, extra, family, kind, hp, paths)
    if "compiled" in paths:
        name = f"{oname}({extra}fused=True) via torch.compile"
        entries.append(Entry(name, family, "compiled", _maker(ours, "compile", **hp, fused=True), kind, "compile"))
    if "default" in paths:
        entries.append(Entry(f"{oname}({extra.rstrip(', ')}) default", family, "default", None, kind))
    return entries


def _step(entry: Entry, opt: torch.optim.Optimizer) -> None:
    opt.step()


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes kept between steps: the tensors of ``opt.state``, and the spare block of the native kernel's
    speculative sweep (a tensor of the optimizer's workspace)."""
    total = 0
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, Tensor):
                total += v.numel() * v.element_size()
    workspace = getattr(opt, "_workspace", None)
    return total + (workspace.spare_bytes if workspace is not None else 0)


class _AllocationTracker(TorchDispatchMode):
    """Live bytes of the storages created by torch ops while active, and their high-water mark.

    Sees every op at the dispatcher (composite ops decomposed), not allocations
    internal to one kernel; a storage counts until it is freed (storages keep
    their Python object, so a finalizer fires exactly then).
    """

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.live = 0
        self.peak = 0
        self.seen: set[int] = set()

    def _freed(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self.seen.discard(key)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs: set[int] | None = None
        for t in _tensors(out if isinstance(out, (list, tuple)) else (out,)):
            st = t.untyped_storage()
            key, nbytes = st.data_ptr(), st.nbytes()
            if nbytes == 0 or key in self.seen or t.device.type != "cpu":
                continue
            if inputs is None:  # outputs of in-place and out= ops are their inputs
                inputs = {x.untyped_storage().data_ptr() for x in _tensors((*args, *kwargs.values()))}
            if key in inputs:
                continue
            self.seen.add(key)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(st, self._freed, key, nbytes)
        return out


def _tensors(items: Sequence[Any]) -> Iterator[Tensor]:
    """Tensors among ``items`` and inside list/tuple items (how aten ops take and return them)."""
    for a in items:
        if isinstance(a, Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from (b for b in a if isinstance(b, Tensor))


def peak_temporary_bytes(fn: Callable[[], None]) -> int:
    """High-water mark of the bytes allocated by torch ops (and not yet freed) while ``fn`` runs."""
    tracker = _AllocationTracker()
    with tracker:
        fn()
    return tracker.peak


# --------------------------------------------------------------------------------------------
# bandwidth and lower bounds
# --------------------------------------------------------------------------------------------


def bandwidth(numel: int, repeats: int = 5) -> tuple[float, float]:
    """``(copy, in-place)`` streaming bandwidth in bytes/s (read + written) on float32 buffers of ``numel``:
    ``b.copy_(a)``, and the best of ``a.mul_(1)`` and ``a.add_(b)`` (optimizers update in place)."""
    a = torch.ones(numel)
    b = torch.ones(numel)
    ops: dict[str, Callable[[], Tensor]] = {
        "copy": lambda: b.copy_(a),
        "mul": lambda: a.mul_(1.0),
        "add": lambda: a.add_(b),
    }
    best = dict.fromkeys(ops, math.inf)
    for _ in range(repeats):
        for name, fn in ops.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    return 8 * numel / best["copy"], max(8 * numel / best["mul"], 12 * numel / best["add"])


def bytes_moved(params: Sequence[Tensor], family: str, projected: bool) -> int:
    """Lower bound of the memory traffic of one step (see the module docstring)."""
    per = 28 if family == "adam" else 20  # Lion: read w, g, m, write w, m
    total = sum(per * p.numel() for p in params)
    if projected and family == "lion":  # a second read of w and g of projectable tensors (u is staged)
        total += sum(8 * p.numel() for p in params if projection.projectable(p))
    elif projected and family == "adam":  # the copy of w made by the speculative sweep (native kernel)
        total += sum(
            4 * p.numel() for p in params if projection.projectable(p) and p.numel() * 4 > _native_backend.STAGE_BYTES
        )
    elif projected:  # sweep B of the staged tensors; the larger ones are speculated (a channel guess copies nothing)
        total += sum(
            8 * p.numel() for p in params if projection.projectable(p) and p.numel() * 4 <= _native_backend.STAGE_BYTES
        )
    return total


# --------------------------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def run_family(entries: list[Entry], params: list[Tensor], repeats: int, warmup: int, memory: bool) -> None:
    """Interleaved timing of one family on shared parameters (each optimizer has its own state)."""
    real = [e for e in entries if e.make is not None]
    opts: list[tuple[Entry, torch.optim.Optimizer]] = []
    for e in real:
        assert e.make is not None
        opt = e.make(params)
        start = time.perf_counter()
        _step(e, opt)  # creates the state (and, for fused, builds or compiles)
        e.first_step = time.perf_counter() - start
        for _ in range(warmup - 1):
            _step(e, opt)
        opts.append((e, opt))
    # cyclic order: each torch baseline right before our path it is compared with, so that a burst of load
    # from elsewhere on the machine hits both (ratios are medians of per-round ratios); rotated every round
    rank = {"torch-fused": 0, "fused": 1, "torch-foreach": 2, "foreach": 3}
    opts.sort(key=lambda eo: rank.get(eo[0].path if eo[0].path != "torch" else "torch-" + _torch_flag(eo[0]), 9))
    gc.collect()
    gc.disable()
    try:
        for r in range(repeats):
            k = r % len(opts)
            for e, opt in opts[k:] + opts[:k]:
                start = time.perf_counter()
                _step(e, opt)
                e.times.append(time.perf_counter() - start)
    finally:
        gc.enable()
    for e, opt in opts:
        e.state_bytes = state_bytes(opt)
        if memory:
            e.peak_temp = peak_temporary_bytes(functools.partial(_step, e, opt))
            if e.backend == "native" and e.kind is not None:
                e.peak_temp += _native_backend.native_scratch_bytes(e.kind, params)
    del opts
    gc.collect()
    # the default path is one of the others: fused on the CPU where the kernels built (torch_adamp.engine)
    by_path = {e.path: e for e in real}
    for e in entries:
        if e.path == "default":
            resolved = "fused" if params[0].is_cpu and _native_backend.available() else "foreach"
            src = by_path.get(resolved)
            if src is not None:
                e.alias_of, e.times, e.state_bytes, e.peak_temp = src.name, src.times, src.state_bytes, src.peak_temp
            else:
                e.alias_of = resolved


def _median_ms(e: Entry) -> float:
    return statistics.median(e.times) * 1e3 if e.times else math.nan


def _torch_flag(e: Entry) -> str:
    return "fused" if "fused=True" in e.name else "foreach"


def ratio(e: Entry, base: Entry | None) -> float:
    """Median over rounds of ``e``'s step time over ``base``'s in the same round (paired: robust to load
    that comes and goes on a shared machine)."""
    if base is None or not e.times or len(e.times) != len(base.times):
        return math.nan
    return statistics.median(a / b for a, b in zip(e.times, base.times, strict=True))


def _mib(n: float) -> str:
    return f"{n / 2**20:9.1f}"


@dataclass
class Result:
    set_key: str
    family: str
    entries: list[Entry]


def report_family(
    family: str, entries: list[Entry], params: list[Tensor], bw: tuple[float, float], log: Callable[[str], None]
) -> None:
    tname = "SGD" if family == "sgd" else "AdamW"
    ref_f = next((e for e in entries if e.path == "torch" and "foreach" in e.name), None)
    ref_u = next((e for e in entries if e.path == "torch" and "fused" in e.name), None)
    hp = {"adam": ADAM_HP, "sgd": SGD_HP, "lion": LION_HP}[family]
    hp_s = ", ".join(f"{k}={v}" for k, v in hp.items())
    reps = max((len(e.times) for e in entries), default=0)
    log(
        f"  {family.capitalize() if family != 'sgd' else 'SGD'} family ({hp_s}; lr={LR:g}): medians of {reps} "
        "interleaved rounds (ratios: median of the per-round ratios)"
    )
    head = f"    {'optimizer':44s} {'median ms':>10s} {'min ms':>9s} {f'/ {tname}(foreach)':>16s}"
    head += f" {f'/ {tname}(fused)':>14s} {'state MiB':>10s} {'peak temp MiB':>14s}"
    log(head)
    for e in entries:
        med = _median_ms(e)
        lo = min(e.times) * 1e3 if e.times else math.nan
        r1, r2 = ratio(e, ref_f), ratio(e, ref_u)
        name = e.name + (f" = {_path_of(entries, e.alias_of)}" if e.alias_of else "")
        log(
            f"    {name:44s} {med:10.1f} {lo:9.1f} {r1:16.2f} {r2:14.2f} {_mib(e.state_bytes)} {_mib(e.peak_temp):>14s}"
        )
    ours = {"adam": "AdamP", "sgd": "SGDP", "lion": "LionP"}[family]
    b_torch = bytes_moved(params, "adam" if family == "lion" else family, projected=False)
    b_ours = bytes_moved(params, family, projected=True)
    n = sum(p.numel() for p in params)
    achieved = ", ".join(
        f"{who} {nbytes / _median_ms(e) / 1e6:.1f}"
        for e in entries
        for who, nbytes in (("torch", b_torch) if e.path == "torch" else ("ours", b_ours),)
        if e.times and (e.path == "fused" or (e.path == "torch" and "fused=True" in e.name))
    )
    log(
        f"    bytes moved (lower bound): {tname} {b_torch / n:.0f} B/param = {b_torch / 1e6:.0f} MB, {ours} "
        f"{b_ours / n:.1f} B/param = {b_ours / 1e6:.0f} MB; at {bw[1] / 1e9:.1f} GB/s (in-place stream): "
        f"{b_torch / bw[1] * 1e3:.1f} / {b_ours / bw[1] * 1e3:.1f} ms; fused steps achieve (GB/s): {achieved}"
    )
    compiled = [e for e in entries if e.path == "compiled"]
    for e in compiled:
        log(f"    {e.name}: first step (compilation) {e.first_step:.1f} s")


def _path_of(entries: list[Entry], name: str) -> str:
    return next((e.path for e in entries if e.name == name), "?")


#: the project's speed targets: (family, our path, torch flag, largest ratio of the medians)
TARGETS = (
    ("adam", "default", "foreach", 1.3),
    ("sgd", "default", "foreach", 1.3),
    ("adam", "fused", "fused", 1.3),
    ("sgd", "fused", "fused", 1.3),
    ("lion", "fused", "fused", 1.3),  # LionP's fused step against torch's fused AdamW (issue 27)
)


def targets(results: list[Result], log: Callable[[str], None]) -> bool:
    """Print each target with this run's ratio; whether all were met."""
    log("targets (median ratios of this run):")
    ok = True
    for res in results:
        for family, ours_path, torch_flag, limit in TARGETS:
            if res.family != family:
                continue
            ours = next((e for e in res.entries if e.path == ours_path), None)
            base = next((e for e in res.entries if e.path == "torch" and f"{torch_flag}=True" in e.name), None)
            if ours is None or base is None or not ours.times or not base.times:
                continue
            r = ratio(ours, base)
            verdict = "met" if r <= limit else "NOT met"
            ok = ok and r <= limit
            oname = {"adam": "AdamP", "sgd": "SGDP", "lion": "LionP"}[family] + f" {ours_path}"
            log(f"  {res.set_key:9s} {oname:14s} / {base.name:38s} = {r:5.2f}  (<= {limit}: {verdict})")
    return ok


def build_report(log: Callable[[str], None], fresh: bool) -> None:
    """How long the native kernels take to compile (``fresh``: from scratch, in a temporary directory)."""
    if not _native_backend.available():
        log(f"native kernels: unavailable ({_native.failure}); fused=True uses torch.compile")
        return
    if not fresh:
        log(f"native kernels: loaded from {_native.library_path} (built once per machine)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        _, seconds = _native.build(Path(tmp), force=True)
    log(f"native kernels: {seconds:.1f} s to compile from scratch, once per machine (cached: {_native.library_path})")


def main(argv: list[str] | None = None, *, prog: str = "benchmarks/step_time.py", check_targets: bool = True) -> int:
    """Run the benchmark; exit status 1 when ``check_targets`` and a speed target is not met (else 0)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Step time of AdamP/SGDP (every path) against torch.optim and the reference adamp package, "
        "interleaved in one process. On the 2-core development machine, 1 thread: --quick takes about a "
        "minute, the full run about 7 minutes."
        + (" Exit status 1 when a speed target is not met (--no-targets: always 0)." if check_targets else ""),
    )
    # every default is stated once, in its help text (no ArgumentDefaultsHelpFormatter: it would add
    # "(default: None)" to the options whose default depends on --quick)
    parser.add_argument("--sets", default=",".join(SETS), help=f"comma-separated, of {', '.join(SETS)} (default: all)")
    parser.add_argument(
        "--families", default="adam,sgd", help="comma-separated, of adam, sgd, lion (default: adam,sgd)"
    )
    parser.add_argument(
        "--paths",
        default=",".join(DEFAULT_PATHS),
        help=f"comma-separated, of {', '.join(PATHS)} (default: {','.join(DEFAULT_PATHS)})",
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed steps per optimizer (default: 15; with --quick: 5)"
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per optimizer first, >= 1 (default: 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for the run (default: 1)")
    parser.add_argument(
        "--scale", type=int, default=None, help="divide dimensions >= 16 by this (default: 1; with --quick: 4)"
    )
    parser.add_argument("--quick", action="store_true", help="smaller shapes and fewer steps")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-temporary measurement")
    if check_targets:
        parser.add_argument("--no-targets", action="store_true", help="print the targets but exit 0 either way")
    args = parser.parse_args(argv)

    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    for name, given, allowed in (("set", sets, SETS), ("family", families, FAMILIES), ("path", paths, PATHS)):
        bad = [x for x in given if x not in allowed]
        if bad:
            parser.error(f"unknown {name} {', '.join(bad)}; expected some of {', '.join(allowed)}")
    repeats = args.repeats if args.repeats is not None else (5 if args.quick else 15)
    scale = args.scale if args.scale is not None else (4 if args.quick else 1)
    if repeats < 1 or args.warmup < 1 or args.threads < 1 or scale < 1:
        parser.error("--repeats, --warmup, --threads and --scale must be >= 1")

    log = print
    with _threads(args.threads):
        log(
            f"torch {torch.__version__}, python {platform.python_version()}, {platform.machine()} "
            f"({_cpu_name()}), {torch.get_num_threads()} thread(s)"
        )
        if _reference() is None and "reference" in paths:
            log("reference package adamp not installed: its rows are skipped")
        if any(p in paths for p in ("fused", "default")):
            build_report(log, fresh=not args.quick)
        bw = bandwidth(4_000_000 if args.quick else 32_000_000)
        log(
            f"streaming bandwidth (read + written bytes): copy {bw[0] / 1e9:.1f} GB/s, "
            f"in-place (best of mul_, add_) {bw[1] / 1e9:.1f} GB/s"
        )
        results: list[Result] = []
        for key in sets:
            pset = SETS[key]
            params, _ = make_tensors(pset, scale)
            n = sum(p.numel() for p in params)
            proj = [p for p in params if projection.projectable(p)]
            note = "" if scale == 1 else f", dimensions >= 16 divided by {scale}"
            if scale == 1 and (len(params), n) != pset.expected:
                raise AssertionError(f"{key}: {len(params)} tensors / {n} parameters, expected {pset.expected}")
            dec = decisions(params)
            log("")
            log(
                f"{key}: {pset.title} parameter shapes{note}: {len(params)} tensors, {n / 1e6:.2f}M parameters "
                f"({len(proj)} projectable tensors, {sum(p.numel() for p in proj) / 1e6:.2f}M); "
                f"AdamP/SGDP views: " + ", ".join(f"{v} {k}" for k, v in dec.items())
            )
            for family in families:
                entries = catalogue(family, paths)
                print(f"  ... timing the {family} family ({len(entries)} optimizers x {repeats} rounds)",
                      file=sys.stderr, flush=True)  # fmt: skip
                run_family(entries, params, repeats, args.warmup, not args.no_memory)
                report_family(family, entries, params, bw, log)
                results.append(Result(key, family, entries))
            del params
            gc.collect()
        log("")
        met = targets(results, log)
    return 0 if met or not check_targets or args.no_targets else 1


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
