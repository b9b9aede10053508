"""Compile every Triton kernel of the fused path ahead of time for sm_80 and sm_90, without a GPU.

``python benchmarks/triton_compile.py`` (CI runs it; about two minutes on two cores):

1. **self-check**: the kernels in Triton's interpreter (a subprocess with ``TRITON_INTERPRET=1``) against the
   multi-tensor path on every kind of tile (the GPU's tiles and small ones: rows in several tile rows, long
   rows in chunks, blocks of tensors never projected) for AdamP and SGDP: the same views at every step,
   parameters within 1e-6 relative, and the speculative step the same bits as the two-pass one;
2. **compile**: each kernel (stage, decide, apply) of each rule, in the variants the back end launches most
   (float32 and bfloat16 parameters, every mode of ``scale_invariant``, GradScaler, maximize, nesterov,
   SGDP's buffer projection, step counters on the device and on the host), through
   ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))`` with the launch options the back
   end uses (``enable_fp_fusion=False``), then ``cuobjdump --dump-resource-usage`` (from the Triton wheel)
   on the cubin: registers, stack, local memory (spills), shared memory; and, from the PTX, the float32
   FMAs (only the explicit ``tl.fma`` of the element functions: no contraction) and the widest global load.

It prints one table and exits non-zero if the self-check fails, a kernel does not compile, or a kernel spills
to local memory. ``--quick``: one variant per kernel and rule, sm_90 only. ``--no-check``: compile only.
``--tiles RTxCBxWARPS``: other tiles than the GPU's (e.g. ``32x128x8``).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

SELF_CHECK = """
import sys, torch
sys.path.insert(0, "tests")
import helpers, torch_adamp
from test_fused import run, rel
helpers.interpret_triton_faster()
from torch_adamp.engine import triton as backend
from torch_adamp.triton import driver
cases = [
    (torch_adamp.AdamP, dict(lr=1e-2, weight_decay=1e-2)),
    (torch_adamp.AdamP, dict(lr=1e-2, nesterov=True, maximize=True, scale_invariant="channel")),
    (torch_adamp.SGDP, dict(lr=1e-2, momentum=0.9, weight_decay=1e-3)),
    (torch_adamp.SGDP, dict(lr=1e-2, momentum=0.9, nesterov=True, scale_invariant="layer")),
]
shapes = [(16, 8, 3, 3), (12, 20), (1, 30), (7,), (), (0, 4), (40, 64)]
failed = 0
for config in (driver.GPU, driver.SMALL):
    backend.CONFIG = config
    for cls, kw in cases:
        ref, ref_views = run(lambda ps: cls(ps, foreach=True, track_stats=True, **kw), shapes, steps=6)
        out = []
        for speculate in (True, False):
            backend.SPECULATE = speculate
            with helpers.fused_backend("triton"):
                out.append(run(lambda ps: cls(ps, fused=True, track_stats=True, **kw), shapes, steps=6))
        (got, views), (two, _) = out
        ok = views == ref_views and rel(got, ref) < 1e-6 and all(torch.equal(a, b) for a, b in zip(got, two))
        failed += not ok
        print(f"  {'ok  ' if ok else 'FAIL'} {cls.__name__} {kw} tiles {config.rt}x{config.cb}: "
              f"views {'equal' if views == ref_views else 'DIFFER'}, rel {rel(got, ref):.2e}")
sys.exit(1 if failed else 0)
"""


def self_check() -> bool:
    """The interpreter check, in a process of its own (the interpreter must be on before triton is imported)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "TORCH_ADAMP_FUSED": "triton"}
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", SELF_CHECK], cwd=ROOT, env=env, capture_output=True, text=True)
    print(out.stdout, end="")
    if out.returncode != 0:
        print(out.stderr[-4000:])
    print(f"self-check in the interpreter: {'passed' if out.returncode == 0 else 'FAILED'} "
          f"({time.perf_counter() - start:.0f} s)")  # fmt: skip
    return out.returncode == 0


@dataclass(frozen=True)
class Variant:
    """One launch configuration of a rule's kernels."""

    name: str
    rule: str
    dtype: str  # the parameters' Triton type
    options: dict[str, Any]  # the Launch fields that are compile-time


def variants(quick: bool) -> list[Variant]:
    adamp = dict(steps=1, mode=1, spec=True, maximize=False, decay=True, rflags=0, dir_state=-1, gs=False, fi=False)
    sgdp = {**adamp, "steps": 0, "dir_state": 0}
    out = [
        Variant("fp32", "adamp", "fp32", adamp),
        Variant("fp32 project_momentum", "sgdp", "fp32", sgdp),
    ]
    if quick:
        return out
    return [
        *out,
        Variant("bf16 amp nesterov maximize host-steps", "adamp", "bf16",
                {**adamp, "steps": 2, "gs": True, "fi": True, "maximize": True, "rflags": 1, "decay": False}),
        Variant("fp16 channel", "adamp", "fp16", {**adamp, "mode": 2}),
        Variant("fp32 layer", "adamp", "fp32", {**adamp, "mode": 3}),
        Variant("fp32 never", "adamp", "fp32", {**adamp, "mode": 0, "spec": False}),
        Variant("bf16 amp nesterov maximize", "sgdp", "bf16",
                {**sgdp, "gs": True, "fi": True, "maximize": True, "rflags": 1, "dir_state": -1}),
        Variant("fp32 raw buffer", "sgdp", "fp32", {**sgdp, "dir_state": -1}),
    ]  # fmt: skip


#: argument types of the kernels (``P``: the parameters' type; ``LR``, ``GS``, ``FI``: per variant)
ARG_TYPES = dict(work_ptr="*i64", meta_ptr="*i64", ptr_ptr="*i64", n="i32", like_p="*P", hyp_ptr="*fp64",
                 lr_ptr="*fp64", count_ptr="*fp32", gs_ptr="*GS", fi_ptr="*FI", rows_ptr="*fp32", views_ptr="*i8",
                 spare_ptr="*P", spare2_ptr="*fp32", thr_ptr="*fp32", rowcoef_ptr="*fp32", flags_ptr="*i32",
                 tcoef_ptr="*fp32")  # fmt: skip


def compile_one(kernel: Any, consts: dict[str, Any], types: dict[str, str], cap: int, opts: dict[str, Any]) -> Any:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    consts = {k: v for k, v in consts.items() if k in kernel.arg_names}
    signature = {a: "constexpr" if a in consts else types[a] for a in kernel.arg_names}
    src = ASTSource(fn=kernel, signature=signature, constexprs=consts)
    return triton.compile(src, target=GPUTarget("cuda", cap, 32), options=opts)


def resources(cubin: bytes) -> dict[str, int]:
    """``cuobjdump --dump-resource-usage`` of a cubin (the binary shipped in the Triton wheel)."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "kernel.cubin"
        path.write_bytes(cubin)
        text = subprocess.run([str(tool), "--dump-resource-usage", str(path)], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    if found is None:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{text}")
    return dict(zip(("REG", "STACK", "SHARED", "LOCAL"), map(int, found.groups()), strict=True))


def vector_accesses(ptx: str) -> int:
    """Global loads and stores of several elements at once (``ld.global.v4``...): 0 when every element access
    is 32-bit (the kernels reach tensors through a table of pointers, whose alignment the compiler cannot see)."""
    return len(re.findall(r"\b(?:ld|st)\.global(?:\.[a-z0-9]+)*\.v[248]\b", ptx))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--caps", default="80,90", help="compute capabilities (default 80,90)")
    parser.add_argument("--quick", action="store_true", help="one variant per rule, sm_90 only")
    parser.add_argument("--no-check", action="store_true", help="skip the interpreter self-check")
    parser.add_argument("--tiles", default=None, help="RTxCBxWARPS instead of the GPU's tiles")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("run without TRITON_INTERPRET=1 (the self-check sets it in its own process)")
    ok = True
    if not args.no_check:
        ok = self_check()

    import importlib

    from torch_adamp.triton import driver

    config = driver.GPU
    if args.tiles:
        rt, cb, warps = map(int, args.tiles.lower().split("x"))
        config = replace(config, rt=rt, cb=cb, flat=rt * cb, num_warps=warps)
    caps = [90] if args.quick else [int(c) for c in args.caps.split(",")]
    kernels = {"stage": driver.stage_kernel, "decide": driver.decide_kernel, "apply": driver.apply_kernel}
    print(f"tiles {config.rt} x {config.cb}, {config.num_warps} warps; options {driver.compile_options(config)}")
    header = f"{'rule':6} {'variant':38} {'kernel':7} {'sm':>3} {'regs':>5} {'stack':>6} {'local':>6} {'shared':>7}"
    print(header + f" {'fma.f32':>8} {'vec':>4} {'s':>5}")
    total = time.perf_counter()
    for v in variants(args.quick):
        mod = importlib.import_module(f"torch_adamp.triton.{v.rule}")
        o = v.options
        x = driver.Launch(lr=None, counts=None, grad_scale=object() if o["gs"] else None,  # type: ignore[arg-type]
                          found_inf=object() if o["fi"] else None, steps=o["steps"], mode=o["mode"], spec=o["spec"],
                          maximize=o["maximize"], decay=o["decay"], rflags=o["rflags"], dir_state=o["dir_state"])  # type: ignore[arg-type]  # fmt: skip
        types = {k: t.replace("*P", f"*{v.dtype}").replace("*GS", "*fp32" if o["gs"] else "*fp64")
                 .replace("*FI", "*fp32" if o["fi"] else "*fp64") for k, t in ARG_TYPES.items()}  # fmt: skip
        for name in driver.KERNELS:
            for cap in caps:
                start = time.perf_counter()
                try:
                    compiled = compile_one(kernels[name], driver.constexprs(name, mod, x, config), types, cap,
                                           driver.compile_options(config))  # fmt: skip
                    use = resources(compiled.asm["cubin"])
                except Exception as e:  # a failure to compile is a result: reported, and the exit status
                    print(f"{v.rule:6} {v.name:38} {name:7} {cap:>3} FAILED: {type(e).__name__}: {e}")
                    ok = False
                    continue
                ptx = compiled.asm["ptx"]
                fmas = len(re.findall(r"\bfma\.rn\.f32\b", ptx))
                spills = use["LOCAL"] > 0
                ok &= not spills
                print(f"{v.rule:6} {v.name:38} {name:7} {cap:>3} {use['REG']:>5} {use['STACK']:>6} {use['LOCAL']:>6}"
                      f" {use['SHARED']:>7} {fmas:>8} {vector_accesses(ptx):>4} {time.perf_counter() - start:>5.1f}"
                      + ("  SPILLS" if spills else ""))  # fmt: skip
    # the contraction decision, shown: the same kernel with fusion on has more float32 FMAs (a * b + c fused)
    v = variants(True)[0]
    mod = importlib.import_module(f"torch_adamp.triton.{v.rule}")
    x = driver.Launch(lr=None, counts=None, grad_scale=None, found_inf=None, steps=1, mode=1, spec=True,  # type: ignore[arg-type]
                      maximize=False, decay=True, rflags=0, dir_state=-1)  # fmt: skip
    types = {k: t.replace("*P", "*fp32").replace("*GS", "*fp64").replace("*FI", "*fp64") for k, t in ARG_TYPES.items()}
    counts = []
    for fusion in (False, True):
        opts = {**driver.compile_options(config), "enable_fp_fusion": fusion}
        ptx = compile_one(kernels["stage"], driver.constexprs("stage", mod, x, config), types, caps[-1], opts).asm[
            "ptx"
        ]
        counts.append(len(re.findall(r"\bfma\.rn\.f32\b", ptx)))
    print(
        f"fp fusion: {v.rule} stage has {counts[0]} fma.rn.f32 as launched (enable_fp_fusion=False: the explicit "
        f"tl.fma only), {counts[1]} with fusion on"
    )
    ok &= counts[0] < counts[1]
    print(f"compiled in {time.perf_counter() - total:.0f} s: {'ok' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
