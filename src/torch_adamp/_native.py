"""The native CPU kernels: build (once per machine, cached) and the ctypes mirror of their ABI.

The sources are C files in ``torch_adamp/csrc`` (``torch_adamp.h``: the ABI, one
argument struct per call; ``common.h`` and ``rows.h``: the row machinery every
rule shares; ``adamp.h``, ``sgdp.h``: one rule each; ``kernels.c``: the float32
and float64 instances). A call steps a whole group of same-dtype tensors with
the rule's update, the scale-invariance test and the projection, in the
reference package's operation order element by element (compiled with
``-ffp-contract=off``; the projection is the batched form of
:func:`torch_adamp.projection.projection_coefficients`, ``u - c w`` with
``c = <w,u> / (||w|| + eps)^2``). Results match the multi-tensor path to
float rounding with the same decisions, and are bitwise the same for any
thread count and whatever the speculative sweep guessed. The kernels keep no
state between calls: the guesses and the spare block of the speculative sweep
are passed in by the caller (:class:`torch_adamp.engine.fused.Workspace`).
How the sweeps move bytes, and what that measured: docs/performance.md.

Build: the system C compiler (``$CC``, else ``cc``/``gcc``/``clang``), once per
machine; the shared object is cached under ``$TORCH_ADAMP_CACHE_DIR`` (default
``~/.cache/torch_adamp``), keyed by the sources, the flags, the compiler and the
CPU. ``$TORCH_ADAMP_NATIVE_CFLAGS`` adds flags (CI builds with sanitizers).
``TORCH_ADAMP_NATIVE=0`` disables the kernels. When no compiler works,
:func:`load` returns ``None`` and the callers fall back (the default path to
the multi-tensor implementation).
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
