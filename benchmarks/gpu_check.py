"""The GPU check of the Triton back end: one command, one table, at most five minutes on one H100.

    python benchmarks/gpu_check.py            # a CUDA machine with triton and adamp==0.3.0 (pip install -e ".[test]")
    python benchmarks/gpu_check.py --dry-run  # anywhere: CPU tensors, the kernels in Triton's interpreter, small
                                              # shapes (what tests/test_triton.py runs: the script's own check)

What it checks, for AdamP and SGDP, on CUDA tensors:

* **exactness** of every path (per-tensor, multi-tensor, the Triton back end of ``fused=True``, the compile back
  end) against the multi-tensor path and against ``adamp==0.3.0``: gradients that make every view occur
  (channel, layer, none), a channels_last weight and a row longer than a tile; the same views at every step,
  parameters within 1e-6 relative after 12 steps (the suite's bound);
* **no host synchronisation**: ``torch.cuda.set_sync_debug_mode("error")`` around ``step()`` on every path (after
  a first step, which compiles);
* **CUDA graphs**: ``step()`` with ``capturable=True`` (AdamP; SGDP has no counters) captured in a
  ``torch.cuda.CUDAGraph`` and replayed on new gradients, bitwise against the same optimizer stepped eagerly;
* **GradScaler**: a step with an inf gradient changes nothing (parameters, state, counters: bitwise);
* **speed**: step time of the Triton back end against ``torch.optim.AdamW(fused=True)``, ``AdamW(foreach=True)``,
  ``SGD(fused=True)`` and the multi-tensor path, on the parameter shapes of ResNet-50, ViT-B/16 and a 1B-parameter
  decoder (TinyLlama-1.1B's: hidden 2048, FFN 5632, 22 layers, vocab 32000), interleaved rounds timed with CUDA
  events, ratios as medians of per-round ratios; the targets (Triton AdamP <= 1.3x fused AdamW on ResNet-50 and
  ViT-B/16, <= 1.2x on the decoder; SGDP <= 1.3x fused SGD), and how many tensors the speculation guessed right;
* **memory**: optimizer state, the back end's workspace (its spare blocks: the old weights of guessed tensors)
  and the peak of temporaries in a step.

It exits non-zero when a correctness check fails (the speed targets are reported, not enforced). ``--sets``,
``--rounds``, ``--tiles RTxCBxWARPS`` (time other tiles than the GPU's too, e.g. ``32x128x8``: the table gets a
row per tiling) and ``--no-speed`` trim or extend it.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

if "--dry-run" in sys.argv:  # before triton is imported (by anything)
    os.environ["TRITON_INTERPRET"] = "1"

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_time import _orthogonal, resnet50_shapes, scaled, vit_b16_shapes

import torch_adamp
from torch_adamp.engine import Backend
from torch_adamp.engine import triton as triton_backend

if "--dry-run" in sys.argv:  # the interpreter's redundant re-patching skipped (tests/helpers.py says why)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import helpers

    helpers.interpret_triton_faster()

Shape = tuple[int, ...]


def decoder_1b_shapes(
    hidden: int = 2048, ffn: int = 5632, layers: int = 22, vocab: int = 32000, kv: int = 256
) -> list[Shape]:
    """Parameter shapes of a 1.1B-parameter decoder (TinyLlama-1.1B: grouped-query attention, SwiGLU, RMSNorm)."""
    shapes: list[Shape] = [(vocab, hidden)]
    for _ in range(layers):
        shapes += [(hidden,), (hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden)]  # norm, q, k, v, o
        shapes += [(hidden,), (ffn, hidden), (ffn, hidden), (hidden, ffn)]  # norm, gate, up, down
    return [*shapes, (hidden,), (vocab, hidden)]  # final norm, head


# --------------------------------------------------------------------------------------------
# the table
# --------------------------------------------------------------------------------------------


@dataclass
class Row:
    section: str
    item: str
    adamp: str = ""
    sgdp: str = ""
    target: str = ""
    ok: bool | None = None  # None: information only


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)

    def add(self, *args: Any, **kw: Any) -> Row:
        row = Row(*args, **kw)
        self.rows.append(row)
        return row

    def print(self, header: str) -> None:
        cols = ["section", "check", "AdamP", "SGDP", "target", "verdict"]
        lines = [
            [r.section, r.item, r.adamp, r.sgdp, r.target, "" if r.ok is None else ("ok" if r.ok else "FAIL")]
            for r in self.rows
        ]
        widths = [max(len(c), *(len(line[k]) for line in lines)) for k, c in enumerate(cols)]
        print(header)
        print("| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)) + " |")
        print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        for line in lines:
            print("| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) + " |")

    @property
    def failed(self) -> bool:
        return any(r.ok is False and r.section != "speed" for r in self.rows)


# --------------------------------------------------------------------------------------------
# optimizers on every path
# --------------------------------------------------------------------------------------------

PATHS = ("single", "foreach", "triton", "compile")
ADAMP_KW: dict[str, Any] = dict(lr=1e-2, weight_decay=1e-2)
SGDP_KW: dict[str, Any] = dict(lr=1e-2, momentum=0.9, weight_decay=1e-3)


def make(kind: str, params: Any, path: str, dry: bool, **kw: Any) -> Any:
    cls = torch_adamp.AdamP if kind == "adamp" else torch_adamp.SGDP
    opts = {**(ADAMP_KW if kind == "adamp" else SGDP_KW), **kw}
    flags = {"single": dict(foreach=False), "foreach": dict(foreach=True)}.get(path, dict(fused=True))
    opt = cls(params, **opts, **flags)
    if path == "triton":
        opt._workspace.backend = Backend("triton")
    elif path == "compile":
        opt._workspace.backend = Backend("compile", "eager" if dry else "inductor")
    return opt


def rel(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        if y.numel():
            d = (x.double() - y.double()).norm() / y.double().norm().clamp_min(1e-30)
            worst = max(worst, float(d))
    return worst


def check_shapes(dry: bool) -> list[Shape]:
    long_row = (3, 40) if dry else (3, 5000)  # longer than a tile's row: the chunked sweep
    return [(16, 8, 3, 3), (12, 20), (6, 1, 5), (1, 30), (7,), (), (0, 4), (40, 64), long_row]


def schedule_grads(params: Sequence[Tensor], step: int, gen: torch.Generator) -> list[Tensor]:
    """Per tensor and step: orthogonal per row, orthogonal as a whole, or random (every view occurs)."""
    out = []
    for i, p in enumerate(params):
        g = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.device, p.dtype)
        if p.dim() > 1 and p.numel() > 0 and (i + step) % 3 < 2:
            g = _orthogonal(p.detach(), g, rows=(i + step) % 3 == 0)
        out.append(g)
    return out


def trajectory(
    make_opt: Callable[[list[Tensor]], Any],
    device: torch.device,
    dry: bool,
    steps: int = 12,
    channels_last: bool = True,
) -> tuple[list[Tensor], list[list[int]]]:
    """Parameters after ``steps`` steps of the schedule, and the views of every step (from track_stats); the
    first weight channels_last (not for the reference, whose ``view`` cannot take it)."""
    gen = torch.Generator().manual_seed(0)
    shapes = check_shapes(dry)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).float().to(device)) for s in shapes]
    if channels_last:
        with torch.no_grad():
            params[0].data = params[0].data.contiguous(memory_format=torch.channels_last)
    opt = make_opt(params)
    views = []
    for step in range(steps):
        for p, g in zip(params, schedule_grads(params, step, gen), strict=True):
            p.grad = g.contiguous(memory_format=torch.channels_last) if g.dim() == 4 and channels_last else g
        opt.step()
        stats = opt.stats() if hasattr(opt, "stats") else {}
        views.append([int(stats.get(f"group0.param{i}/view", -1)) for i in range(len(params))])
    return [p.detach().clone() for p in params], views


def nonempty(params: list[Tensor]) -> list[Tensor]:
    """The reference crashes on tensors with a size-0 dimension."""
    return [p for p in params if p.numel() > 0]


def check_exactness(report: Report, device: torch.device, dry: bool) -> None:
    try:
        import adamp as reference  # type: ignore[import-untyped,import-not-found,unused-ignore]
    except ImportError:
        reference = None
    steps = 6 if dry else 12
    results: dict[str, dict[str, tuple[float, bool]]] = {p: {} for p in PATHS}
    ref_rel: dict[str, dict[str, float]] = {p: {} for p in ("foreach", "triton")}
    for kind in ("adamp", "sgdp"):
        base, base_views = trajectory(
            lambda ps, k=kind: make(k, ps, "foreach", dry, track_stats=True), device, dry, steps
        )
        for path in PATHS[:1] + PATHS[2:]:
            got, views = trajectory(
                lambda ps, k=kind, p=path: make(k, ps, p, dry, track_stats=True), device, dry, steps
            )
            results[path][kind] = (rel(got, base), views == base_views)
        if reference is not None:
            cls = reference.AdamP if kind == "adamp" else reference.SGDP
            kw = ADAMP_KW if kind == "adamp" else SGDP_KW
            ref, _ = trajectory(lambda ps, c=cls, k=kw: c(nonempty(ps), **k), device, dry, steps, False)
            for path in ("foreach", "triton"):
                got, _ = trajectory(lambda ps, k=kind, p=path: make(k, nonempty(ps), p, dry), device, dry, steps, False)
                ref_rel[path][kind] = rel([g for g in got if g.numel()], [r for r in ref if r.numel()])
    for path in PATHS[:1] + PATHS[2:]:
        cells = {k: f"rel {r:.1e}, views {'equal' if same else 'DIFFER'}" for k, (r, same) in results[path].items()}
        ok = all(r < 1e-6 and same for r, same in results[path].values())
        report.add(
            "exact", f"{path} vs foreach ({steps} steps)", cells["adamp"], cells["sgdp"], "< 1e-6, same views", ok
        )
    for path in ("foreach", "triton"):
        if reference is None:
            report.add("exact", f"{path} vs adamp 0.3.0", "adamp not installed", "", "< 1e-6", None)
            continue
        r = ref_rel[path]
        ok = all(v < 1e-6 for v in r.values())
        report.add("exact", f"{path} vs adamp 0.3.0", f"rel {r['adamp']:.1e}", f"rel {r['sgdp']:.1e}", "< 1e-6", ok)


def check_sync_free(report: Report, device: torch.device, dry: bool) -> None:
    if dry:
        report.add("sync", "set_sync_debug_mode('error') around step()", "n/a on the CPU", "n/a on the CPU", "")
        return
    cells: dict[str, list[str]] = {"adamp": [], "sgdp": []}
    ok = True
    for kind in ("adamp", "sgdp"):
        for path in PATHS:
            variants: list[dict[str, Any]] = [{}]
            if kind == "adamp" and path != "compile":  # (each compile-path optimizer compiles its own graph)
                variants.append({"capturable": True, "lr": torch.tensor(1e-2, device=device)})
            for kw in variants:
                params = [torch.nn.Parameter(torch.randn(s, device=device)) for s in check_shapes(dry)]
                opt = make(kind, params, path, dry, track_stats=True, **kw)
                for k in range(3):
                    for p in params:
                        p.grad = torch.randn_like(p)
                    if k == 2:
                        torch.cuda.set_sync_debug_mode("error")
                    try:
                        opt.step()
                    except RuntimeError as e:
                        ok = False
                        cells[kind].append(f"{path}{'+capturable' if kw else ''}: {str(e)[:60]}")
                    finally:
                        torch.cuda.set_sync_debug_mode(0)
        if not cells[kind]:
            cells[kind] = ["every path: no sync"]
    report.add("sync", "set_sync_debug_mode('error') around step()", "; ".join(cells["adamp"]),
               "; ".join(cells["sgdp"]), "no sync", ok)  # fmt: skip


def check_graphs(report: Report, device: torch.device, dry: bool) -> None:
    if dry:
        report.add("graphs", "CUDA graph capture and replay of step()", "n/a on the CPU", "n/a on the CPU", "")
        return
    cells = {}
    ok = True
    for kind in ("adamp", "sgdp"):
        gen = torch.Generator(device=device).manual_seed(1)
        shapes = [(64, 32, 3, 3), (256, 300), (300,), (2, 9000)]
        init = [torch.randn(s, device=device, generator=gen) for s in shapes]
        graph_p = [torch.nn.Parameter(t.clone()) for t in init]
        eager_p = [torch.nn.Parameter(t.clone()) for t in init]
        kw: dict[str, Any] = {"capturable": True, "lr": torch.tensor(1e-2, device=device)} if kind == "adamp" else {}
        opt_g = make(kind, graph_p, "triton", dry, **kw)
        opt_e = make(kind, eager_p, "triton", dry, **copy.deepcopy(kw))
        static = [torch.zeros_like(p) for p in graph_p]
        for p, g in zip(graph_p, static, strict=True):
            p.grad = g
        grads = [[torch.randn(s, device=device, generator=gen) for s in shapes] for _ in range(8)]
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for k in range(3):  # warm-up: the plan built, the kernels compiled
                    for g, new in zip(static, grads[k], strict=True):
                        g.copy_(new)
                    opt_g.step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                opt_g.step()
            for k in range(3, 8):
                for g, new in zip(static, grads[k], strict=True):
                    g.copy_(new)
                graph.replay()
            for k in range(8):
                for p, new in zip(eager_p, grads[k], strict=True):
                    p.grad = new.clone()
                opt_e.step()
            torch.cuda.synchronize()
            same = all(torch.equal(a, b) for a, b in zip(graph_p, eager_p, strict=True))
            cells[kind] = "replayed 5 steps: " + (
                "bitwise equal to eager" if same else f"rel {rel(graph_p, eager_p):.1e}"
            )
            ok &= same
        except Exception as e:  # reported in the table
            cells[kind] = f"{type(e).__name__}: {str(e)[:80]}"
            ok = False
    report.add("graphs", "CUDA graph capture and replay of step() (Triton)", cells["adamp"], cells["sgdp"],
               "bitwise", ok)  # fmt: skip


def check_grad_scaler(report: Report, device: torch.device, dry: bool) -> None:
    cells = {}
    ok = True
    for kind in ("adamp", "sgdp"):
        params = [torch.nn.Parameter(torch.randn(s, device=device)) for s in check_shapes(dry)]
        opt = make(kind, params, "triton", dry)
        scaler = torch.amp.GradScaler(device.type, init_scale=2.0**10)
        for k in range(4):
            scale = scaler.scale(torch.ones((), device=device))
            for p in params:
                p.grad = torch.randn_like(p) * scale
                if k == 3 and p.numel() > 4:
                    p.grad.view(-1)[3] = math.inf
            before = [t.clone() for t in params] + [
                v.clone() for p in params for v in opt.state[p].values() if isinstance(v, Tensor)
            ]
            scaler.step(opt)
            scaler.update()
        after = [t.clone() for t in params] + [
            v.clone() for p in params for v in opt.state[p].values() if isinstance(v, Tensor)
        ]
        same = all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
        cells[kind] = "inf step: nothing changed" if same else "inf step CHANGED the state"
        ok &= same
    report.add("amp", "GradScaler: a step with an inf gradient (Triton)", cells["adamp"], cells["sgdp"], "bitwise", ok)


# --------------------------------------------------------------------------------------------
# speed and memory
# --------------------------------------------------------------------------------------------

LR = 1e-10  # the weights stay put: the decisions stay those of the first step, every optimizer does its arithmetic


@dataclass
class Timed:
    name: str
    make: Callable[[list[Tensor]], Any]
    times: list[float] = field(default_factory=list)
    state: int = 0
    workspace: int = 0
    peak: int = 0
    spec: str = ""
    opt: Any = None


def tensors(shapes: Sequence[Shape], grads: str, device: torch.device) -> list[Tensor]:
    gen = torch.Generator(device=device).manual_seed(0)
    params = []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn(s, device=device, generator=gen))
        g = torch.randn(s, device=device, generator=gen)
        if grads == "conv" and len(s) == 4:
            g = _orthogonal(p.detach(), g, rows=True)
        p.grad = g
        params.append(p)
    return params


def workspace_bytes(opt: Any) -> int:
    ws = getattr(opt, "_workspace", None)
    if ws is None:
        return 0
    total = 0
    for plan in ws.triton_plans.values():
        total += sum(t.numel() * t.element_size() for t in vars(plan.buf).values() if isinstance(t, Tensor))
    return total


def state_bytes(opt: Any) -> int:
    return sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values() if isinstance(v, Tensor))


@contextmanager
def timer(device: torch.device, out: list[float]) -> Iterator[None]:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end))
    else:
        t0 = time.perf_counter()
        yield
        out.append((time.perf_counter() - t0) * 1e3)


def time_family(entries: list[Timed], params: list[Tensor], device: torch.device, rounds: int, warmup: int) -> None:
    for e in entries:
        e.opt = e.make(params)
        for _ in range(warmup):
            e.opt.step()
        e.state = state_bytes(e.opt)
        e.workspace = workspace_bytes(e.opt)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            e.opt.step()
            torch.cuda.synchronize()
            e.peak = torch.cuda.max_memory_allocated() - base
    for r in range(rounds):
        order = entries[r % len(entries) :] + entries[: r % len(entries)]
        for e in order:
            with timer(device, e.times):
                e.opt.step()
    for e in entries:  # freed before the next family is built (the 1.1B decoder's state is 4.4 GB per tensor set)
        e.spec = spec_summary(e.opt) if getattr(e.opt, "_workspace", None) is not None else ""
        e.opt = None
    if device.type == "cuda":
        torch.cuda.empty_cache()


def ratio(a: Timed, b: Timed) -> float:
    return statistics.median(x / y for x, y in zip(a.times, b.times, strict=True))


def spec_summary(opt: Any) -> str:
    """Tensors of the last step stepped once (guessed right) / projectable ones."""
    right = total = 0
    for plan in opt._workspace.triton_plans.values():
        flags = plan.buf.flags[: plan.layout.n].tolist()
        for f, m in zip(flags, plan.layout.meta, strict=True):
            if m[7]:
                total += 1
                right += not f & 1
    return f"{right}/{total}"


def check_speed(
    report: Report, device: torch.device, dry: bool, sets: list[str], rounds: int, tiles: list[Any]
) -> None:
    catalogue = {
        "resnet50": ("ResNet-50", resnet50_shapes, "conv", 1.3),
        "vit_b16": ("ViT-B/16", vit_b16_shapes, "random", 1.3),
        "decoder_1b": ("decoder 1.1B", decoder_1b_shapes, "random", 1.2),
    }
    warmup = 1 if dry else 3

    def mib(n: int) -> str:
        return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"

    def ms(e: Timed) -> str:
        return f"{statistics.median(e.times):.3f} ms"

    for key in sets:
        title, shapes_fn, grads, target = catalogue[key]
        shapes = shapes_fn() if key != "decoder_1b" or not dry else decoder_1b_shapes(64, 96, 2, 500, 16)
        if dry:
            shapes = scaled(shapes, 32)[:12]
        params = tensors(shapes, grads, device)
        numel = sum(p.numel() for p in params)
        tilings = [f"{t.rt}x{t.cb}x{t.num_warps}" for t in tiles]
        adam = [
            Timed("AdamW fused", lambda ps: torch.optim.AdamW(ps, lr=LR, weight_decay=1e-2, fused=True)),
            Timed("AdamW foreach", lambda ps: torch.optim.AdamW(ps, lr=LR, weight_decay=1e-2, foreach=True)),
            Timed("AdamP foreach", lambda ps: make("adamp", ps, "foreach", dry, lr=LR)),
        ] + [
            Timed(f"AdamP triton {name}", lambda ps, t=t: tiled(make("adamp", ps, "triton", dry, lr=LR), t))
            for t, name in zip(tiles, tilings, strict=True)
        ]
        sgd = [
            Timed("SGD fused", lambda ps: torch.optim.SGD(ps, lr=LR, momentum=0.9, nesterov=True, fused=True)),
            Timed("SGD foreach", lambda ps: torch.optim.SGD(ps, lr=LR, momentum=0.9, nesterov=True, foreach=True)),
            Timed("SGDP foreach", lambda ps: make("sgdp", ps, "foreach", dry, lr=LR, nesterov=True)),
            Timed("SGDP triton, no nesterov", lambda ps: make("sgdp", ps, "triton", dry, lr=LR)),
        ] + [
            Timed(
                f"SGDP triton {name}", lambda ps, t=t: tiled(make("sgdp", ps, "triton", dry, lr=LR, nesterov=True), t)
            )
            for t, name in zip(tiles, tilings, strict=True)
        ]
        for family in (adam, sgd):
            time_family(family, params, device, rounds, warmup)
        a_ours, s_ours = adam[3:], sgd[4:]
        head = f"{title} ({numel / 1e6:.1f}M)"
        for k, name in enumerate(tilings):
            ra, rs = ratio(a_ours[k], adam[0]), ratio(s_ours[k], sgd[0])
            report.add("speed", f"{head}: Triton {name} / torch fused",
                       f"{ra:.2f}x AdamW ({ms(a_ours[k])} / {ms(adam[0])})",
                       f"{rs:.2f}x SGD ({ms(s_ours[k])} / {ms(sgd[0])})",
                       f"<= {target}x", None if dry else max(ra, rs) <= target)  # fmt: skip
        a, g = a_ours[0], s_ours[0]
        faster = None if dry else ratio(a, adam[2]) < 1 and ratio(g, sgd[2]) < 1
        report.add("speed", f"{title}: Triton / torch foreach; / our foreach",
                   f"{ratio(a, adam[1]):.2f}x; {ratio(a, adam[2]):.2f}x",
                   f"{ratio(g, sgd[1]):.2f}x; {ratio(g, sgd[2]):.2f}x", "< 1 (faster)", faster)  # fmt: skip
        report.add("speed", f"{title}: SGDP without nesterov (reference default) / SGD fused", "",
                   f"{ratio(sgd[3], sgd[0]):.2f}x ({ms(sgd[3])})", "", None)  # fmt: skip
        report.add("speed", f"{title}: projectable tensors stepped in one pass", a.spec, g.spec, "", None)
        report.add("memory", f"{title}: state + workspace, step peak; torch fused state",
                   f"{mib(a.state)} + {mib(a.workspace)}, {mib(a.peak)}; {mib(adam[0].state)}",
                   f"{mib(g.state)} + {mib(g.workspace)}, {mib(g.peak)}; {mib(sgd[0].state)}", "", None)  # fmt: skip
        del params
        if device.type == "cuda":
            torch.cuda.empty_cache()


def tiled(opt: Any, config: Any) -> Any:
    """The optimizer's Triton plans built with these tiles (set while it builds them: at its first step)."""
    step = opt.step

    def first(*a: Any, **k: Any) -> Any:
        old = triton_backend.CONFIG
        triton_backend.CONFIG = config
        try:
            return step(*a, **k)
        finally:
            triton_backend.CONFIG = old
            opt.step = step

    opt.step = first
    return opt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU tensors, kernels interpreted, small shapes")
    parser.add_argument("--sets", default="resnet50,vit_b16,decoder_1b", help="parameter sets to time")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 20; dry run 2)")
    parser.add_argument("--tiles", default="", help="other tilings to time too, RTxCBxWARPS,...")
    parser.add_argument("--no-speed", action="store_true", help="correctness only")
    args = parser.parse_args(argv)
    dry = args.dry_run
    if dry:
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        parser.error("no CUDA device: run with --dry-run to check the script itself on the CPU")
    else:
        device = torch.device("cuda")
    from torch_adamp.triton import driver

    tiles = [triton_backend._config(device)]
    for spec in filter(None, args.tiles.split(",")):
        rt, cb, warps = map(int, spec.lower().split("x"))
        tiles.append(replace(driver.GPU, rt=rt, cb=cb, flat=rt * cb, num_warps=warps))
    start = time.perf_counter()
    report = Report()
    check_exactness(report, device, dry)
    check_sync_free(report, device, dry)
    check_graphs(report, device, dry)
    check_grad_scaler(report, device, dry)
    if not args.no_speed:
        rounds = args.rounds if args.rounds is not None else (2 if dry else 20)
        check_speed(report, device, dry, args.sets.split(","), rounds, tiles)
    name = "CPU (dry run: the Triton interpreter)" if dry else torch.cuda.get_device_name(device)
    import triton

    report.print(
        f"torch-adamp GPU check on {name}: torch {torch.__version__}, triton {triton.__version__}, "
        f"{time.perf_counter() - start:.0f} s"
    )
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
