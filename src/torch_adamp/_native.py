"""The CPU kernels of the fused path: C source, build (once per machine, cached) and ctypes binding.

Why a hand-written kernel rather than ``torch.compile`` on CPU (measured on the
2-core AMD EPYC development machine, 1 thread, see docs/performance.md):

* compiling the functional step with inductor takes minutes for a ResNet-50
  parameter list (gcc -O3 on one C++ function with thousands of loops), and
  the generated code ran 2.5-3x slower than torch's fused AdamW: it computes
  ``u = m / (sqrt(v) / sqrt(bc2) + eps)`` in both passes (square root and
  division bound the step on CPU as much as memory does) and re-evaluates the
  decision's scalar chain inside the inner loops;
* this kernel computes ``u`` once per element and moves the fewest bytes the
  cache allows. The scale-invariance test needs ``<w,g>``, ``||w||^2`` and
  ``||g||^2`` of every row (and their totals) before ``w`` may change. AdamP,
  tensors up to ``_fused.STAGE_BYTES``: sweep A updates the moments, stages
  ``u`` in a scratch buffer and sums the row statistics and ``<w,u>``; sweep B
  projects and steps from the staged ``u`` while it is still in cache. Larger
  AdamP tensors are **speculated**: the kernel remembers the view each one took
  at its last step (keyed by its data pointer) and sweeps it once, row by row,
  under that view: stage the row (moments, ``u`` in a per-thread row buffer,
  the four row sums), copy the old row to a spare block with non-temporal
  stores, step it. When the decision, taken at the end from the same row sums,
  differs (or a row fails a guessed channel test), the written rows are
  stepped again from the copy under the decided view; the result is bitwise
  the staged scheme's either way, only slower. Tensors above
  ``_fused.SPECULATE_MAX_BYTES`` (64 MiB) are not speculated, which bounds the
  spare block kept between steps. Views rarely change between
  steps (measured, 600 AdamP steps of the Fashion-MNIST BatchNorm CNN: the
  guess was right in 2379 of 2388 sweeps; the conv weights never changed view,
  the classifier's weight sometimes moved between "none" and "layer"), so the
  steady state is one sweep plus the copy. Without a guess (first step, the
  layer view, half-precision parameters) the two-pass scheme runs: pass 1 reads
  only ``w`` and ``g``; pass 2 goes row by row, keeping ``u`` of the row in a
  per-thread buffer while it sums ``<w,u>``, then projects and steps (the row
  is still in L1/L2); only the layer view needs a sweep for the whole-tensor
  ``<w,u>`` first. ``scale_invariant="channel"`` needs no guess and no copy: one
  sweep. SGDP (whose direction costs no division): sweep A (buffer update, row
  sums and ``<w,d>``) then sweep B; tensors above the same threshold are
  speculated the same way (sweep A then B per row, the old row copied), except
  under a channel guess when the projected direction is stored in the buffer
  (the default ``project_momentum=True`` without nesterov): the buffer would
  need a copy too, and that measured slower than the two sweeps. Tensors
  that are never projected take one sweep, like torch's fused kernels. Traffic
  from memory for tensors larger than the cache, per parameter: AdamP 32 bytes
  when the guess holds (AdamW: 28; the copy adds 4), 36 without a guess (``w``
  and ``g`` read twice), up to 44 when the guess is wrong; SGDP 24 when
  speculated, 28-32 otherwise (SGD: 20).

The operation order mirrors the reference package element by element (``m *
b1`` then a fused multiply-add like ``add_(alpha=)``, the same scalar roundings
of step size and decay factor, ``eps`` added after the bias-corrected square
root), compiled with ``-ffp-contract=off`` so that the compiler adds no fused
operations of its own; the projection uses the batched form of
:func:`torch_adamp.projection.projection_coefficients` (``u - c w`` with
``c = <w,u> / (||w|| + eps)^2``). Results match the reference to float32
rounding (about 1e-7 relative over 100 steps), like the multi-tensor path.
Any thread count gives identical bits (row sums are formed per row by one
thread and added in row order); AdamP's two schemes do the same arithmetic
in different loops (bitwise equal with the GCC 12 build measured here).

Build: the system C compiler (``$CC``, else ``cc``/``gcc``/``clang``), 3-5
seconds, once per machine; the shared object is cached under
``$TORCH_ADAMP_CACHE_DIR`` (default ``~/.cache/torch_adamp``), keyed by the
source, the flags, the compiler and the CPU. ``TORCH_ADAMP_NATIVE=0`` disables
it. When no compiler works, :func:`load` returns ``None`` and the callers fall
back (the default path to the multi-tensor implementation).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

#: the C sources (torch_adamp/csrc), compiled as one translation unit: kernels.c includes the others
SOURCE_DIR = Path(__file__).resolve().parent / "csrc"
SOURCES = ("torch_adamp.h", "common.h", "rows.h", "adamp.h", "sgdp.h", "kernels.c")


def source() -> str:
    """The C sources, concatenated in :data:`SOURCES` order (what the cache key hashes)."""
    return "".join(f"/* ---- {name} ---- */\n" + (SOURCE_DIR / name).read_text() for name in SOURCES)


BASE_FLAGS = ("-O3", "-fPIC", "-shared", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off")
#: tried in order: OpenMP threads + SIMD; SIMD pragmas only; no pragmas (still correct, slower)
FLAG_SETS = (("-march=native", "-fopenmp"), ("-march=native", "-fopenmp-simd"), ("-fopenmp-simd",), ())

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
#: why the kernels are unavailable (``None`` while they are, or before the first attempt)
failure: str | None = None
#: seconds the last build took (0.0 when the cached object was loaded)
build_seconds: float | None = None
#: path of the loaded shared object
library_path: Path | None = None


def enabled() -> bool:
    return os.environ.get("TORCH_ADAMP_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    env = os.environ.get("TORCH_ADAMP_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "torch_adamp"


def _compilers() -> list[str]:
    found = []
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name) and name not in found:
            found.append(name)
    return found


def _cpu_id() -> str:
    """What ``-march=native`` depends on: the CPU model and its feature flags."""
    ident = [platform.machine(), platform.processor()]
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features")):
                    ident.append(line.strip())
                if len(ident) >= 4:
                    break
    except OSError:
        pass
    return "\n".join(ident)


def _compiler_version(cc: str) -> str:
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def build(directory: Path | None = None, force: bool = False) -> tuple[Path, float]:
    """Compile the kernels (or find them in the cache); returns ``(path, seconds spent compiling)``."""
    src = source()
    errors = []
    for cc in _compilers():
        version = _compiler_version(cc)
        for extra in FLAG_SETS:
            flags = (*BASE_FLAGS, *extra)
            parts = (src, cc, version, *flags, *extra_flags(), _cpu_id(), sys.platform)
            key = hashlib.sha256("\0".join(parts).encode()).hexdigest()
            out_dir = directory if directory is not None else cache_dir()
            target = out_dir / f"torch_adamp_kernels_{key[:20]}.so"
            if target.exists() and not force:
                return target, 0.0
            out_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
                so_tmp = Path(tmp) / target.name
                start = time.perf_counter()
                res = subprocess.run(
                    [cc, *flags, *extra_flags(), str(SOURCE_DIR / "kernels.c"), "-o", str(so_tmp), "-lm"],
                    capture_output=True,
                    text=True,
                    timeout=600,
                )
                seconds = time.perf_counter() - start
                if res.returncode == 0:
                    os.replace(so_tmp, target)  # atomic: concurrent builders race harmlessly
                    return target, seconds
                errors.append(f"{cc} {' '.join(extra)}: {res.stderr.strip()[-300:]}")
    raise RuntimeError("could not compile the torch_adamp CPU kernels: " + ("; ".join(errors) or "no C compiler found"))


class AdamPArgs(ctypes.Structure):
    """``ta_adamp_args`` of csrc/torch_adamp.h."""

    _fields_ = [("beta1", ctypes.c_double), ("beta2", ctypes.c_double), ("nesterov", ctypes.c_int32)]


class SGDPArgs(ctypes.Structure):
    """``ta_sgdp_args`` of csrc/torch_adamp.h."""

    _fields_ = [
        ("momentum", ctypes.c_double),
        ("dampening", ctypes.c_double),
        ("nesterov", ctypes.c_int32),
        ("project_momentum", ctypes.c_int32),
    ]


class RuleArgs(ctypes.Union):
    """``ta_rule_args``: one member per rule, named as the rule."""

    _fields_ = [("adamp", AdamPArgs), ("sgdp", SGDPArgs)]


class Args(ctypes.Structure):
    """``ta_args`` of csrc/torch_adamp.h: the one argument of every kernel call."""

    _fields_ = [
        ("n", ctypes.c_int64),
        ("ptrs", ctypes.c_void_p),
        ("meta", ctypes.c_void_p),
        ("guess", ctypes.c_void_p),
        ("spare", ctypes.c_void_p),
        ("spare_bytes", ctypes.c_int64),
        ("lr", ctypes.c_double),
        ("eps", ctypes.c_double),
        ("weight_decay", ctypes.c_double),
        ("delta", ctypes.c_double),
        ("wd_ratio", ctypes.c_double),
        ("maximize", ctypes.c_int32),
        ("mode", ctypes.c_int32),
        ("threads", ctypes.c_int32),
        ("reserved", ctypes.c_int32),
        ("stage_bytes", ctypes.c_int64),
        ("spec_max_bytes", ctypes.c_int64),
        ("rule", RuleArgs),
        ("views", ctypes.c_void_p),
        ("spec_right", ctypes.c_int64),
        ("spec_wrong", ctypes.c_int64),
    ]


def _bind(lib: ctypes.CDLL) -> None:
    for rule in ("adamp", "sgdp"):
        for sfx in ("f32", "f64"):
            fn = getattr(lib, f"torch_adamp_{rule}_{sfx}")
            fn.restype = ctypes.c_int  # 0, or -1 when a scratch allocation failed (nothing modified)
            fn.argtypes = [ctypes.POINTER(Args)]
            fn = getattr(lib, f"torch_adamp_{rule}_spare_{sfx}")
            fn.restype = ctypes.c_int64
            fn.argtypes = [ctypes.POINTER(Args)]


def load() -> ctypes.CDLL | None:
    """The kernels, built on first use; ``None`` (and :data:`failure` set) when unavailable."""
    global _lib, _tried, failure, build_seconds, library_path
    if _lib is not None or _tried:
        return _lib
    with _lock:
        if _lib is not None or _tried:
            return _lib
        _tried = True
        if not enabled():
            failure = "disabled by TORCH_ADAMP_NATIVE=0"
            return None
        try:
            try:
                path, build_seconds = build()
            except OSError:  # unwritable cache directory: build in a private temporary one
                path, build_seconds = build(Path(tempfile.mkdtemp(prefix="torch_adamp_")))
            lib = ctypes.CDLL(str(path))
            _bind(lib)
        except Exception as exc:  # no compiler, failed build, unloadable object
            failure = f"{type(exc).__name__}: {exc}"
            return None
        library_path = path
        _lib = lib
        return _lib


def extra_flags() -> tuple[str, ...]:
    """Compiler flags added from ``$TORCH_ADAMP_NATIVE_CFLAGS`` (e.g. sanitizers in CI); part of the cache key."""
    return tuple(os.environ.get("TORCH_ADAMP_NATIVE_CFLAGS", "").split())


def kernel(rule: str, float64: bool) -> tuple[Any, Any]:
    """``(step, spare_query)`` C functions of ``rule`` for float64 or float32 (the kernels must be loaded)."""
    lib = load()
    assert lib is not None
    sfx = "f64" if float64 else "f32"
    return getattr(lib, f"torch_adamp_{rule}_{sfx}"), getattr(lib, f"torch_adamp_{rule}_spare_{sfx}")
