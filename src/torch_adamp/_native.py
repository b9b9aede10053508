"""The native CPU kernels: build (once per machine, cached) and the ctypes mirror of their ABI.

The sources are C files in ``torch_adamp/csrc`` (``torch_adamp.h``: the ABI, one
argument struct per call; ``common.h``, ``rows.h``: what every sweep shares;
``driver.h`` (and ``pm_log.h``): the sweep scheme of every rule, written once;
``rules/<name>.h``: one kernel rule each, its element functions and argument
struct; ``rule.c``: a rule's translation unit, compiled once per rule header;
``kernels.c``: the ABI queries and ``Projected``'s sweeps (``projected.h``)),
linked into one shared object. The kernel rules are the headers in
``csrc/rules`` (:data:`RULES`). A call steps a whole group of same-dtype tensors with
the rule's update, the scale-invariance test and the projection, in the
reference package's operation order element by element (compiled with
``-ffp-contract=off``; the projection is the batched form of
:func:`torch_adamp.projection.projection_coefficients`, ``u - c w`` with
``c = <w,u> / (||w|| + eps)^2``). Results match the multi-tensor path to
float rounding with the same decisions, and are bitwise the same for any
thread count and whatever the speculative sweep guessed. The kernels keep no
state between calls: the guesses and the spare block of the speculative sweep
are passed in by the caller (:class:`torch_adamp.engine.workspace.Workspace`).
How the sweeps move bytes, and what that measured: docs/performance.md.

Build: the system C compiler (``$CC``, else ``cc``/``gcc``/``clang``), once per
machine; the shared object is cached under ``$TORCH_ADAMP_CACHE_DIR`` (default
``~/.cache/torch_adamp``), keyed by the sources, the flags, the compiler and the
CPU. ``$TORCH_ADAMP_NATIVE_CFLAGS`` adds flags (CI builds with sanitizers, and
with warnings as errors). ``TORCH_ADAMP_NATIVE=0`` disables the kernels. When no
compiler works, :func:`load` returns ``None`` and the callers fall back (the
default path to the multi-tensor implementation).
"""

from __future__ import annotations

import atexit
import ctypes
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

#: the C sources (torch_adamp/csrc)
SOURCE_DIR = Path(__file__).resolve().parent / "csrc"
#: the kernel rules: one header each in csrc/rules, named as the rule (``torch_adamp_<name>_f32`` ...)
RULES: tuple[str, ...] = tuple(sorted(p.stem for p in (SOURCE_DIR / "rules").glob("*.h")))
#: every C source, relative to :data:`SOURCE_DIR`, sorted (what the cache key hashes)
SOURCES: tuple[str, ...] = tuple(
    sorted(str(p.relative_to(SOURCE_DIR).as_posix()) for p in SOURCE_DIR.rglob("*") if p.suffix in (".c", ".h"))
)


def translation_units() -> list[tuple[str, tuple[str, ...]]]:
    """``(name, compiler arguments)`` of each translation unit: one per kernel rule, and kernels.c."""
    rule_c = str(SOURCE_DIR / "rule.c")
    units = [(rule, (f'-DTA_RULE_HEADER="rules/{rule}.h"', rule_c)) for rule in RULES]
    return [*units, ("kernels", (str(SOURCE_DIR / "kernels.c"),))]


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
        limit = min(30.0, COMPILE_TIMEOUT)
        return subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=limit).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


#: seconds one compiler run may take (a build takes 3-5 s; a hung compiler must not hold the first step)
COMPILE_TIMEOUT = float(os.environ.get("TORCH_ADAMP_NATIVE_TIMEOUT", "120"))
#: the file, in the cache directory, that records the SHA-256 of every object built there
INDEX = "index.json"
#: index key prefix of a flag set the compiler rejected (with its error), so that later processes skip it
FAILED = "failed-"
#: why the loaded kernels are slower than the preferred build (a flag set was rejected), or ``None``
degraded: str | None = None


class UnsafeCacheError(OSError):
    """The cache directory or a file in it could be written by someone else: not used."""


def _check_private(path: Path, what: str) -> None:
    """Like ssh with its keys: ``path`` must belong to this user and be writable by nobody else."""
    st = path.lstat()
    if path.is_symlink():
        raise UnsafeCacheError(f"{what} {path} is a symbolic link")
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise UnsafeCacheError(f"{what} {path} belongs to uid {st.st_uid}, not to this user ({os.getuid()})")
    if st.st_mode & 0o022:
        raise UnsafeCacheError(f"{what} {path} is writable by group or others (mode {st.st_mode & 0o777:o})")


def _private_dir(path: Path) -> Path:
    """Create ``path`` (mode 0700) if needed; raise :class:`UnsafeCacheError` if it is not private."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    _check_private(path, "cache directory")
    return path


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read_index(directory: Path) -> dict[str, str]:
    index = directory / INDEX
    if not index.exists():
        return {}
    _check_private(index, "cache index")
    try:
        data = json.loads(index.read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def _write_index(directory: Path, entries: dict[str, str]) -> None:
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".index-", suffix=".json")  # mode 0600
    with os.fdopen(fd, "w") as f:
        json.dump(entries, f, indent=1, sort_keys=True)
    os.replace(tmp, directory / INDEX)


def _verified(target: Path, index: dict[str, str]) -> bool:
    """Whether ``target`` is a private file whose bytes are those recorded when it was built here."""
    if not target.exists():
        return False
    _check_private(target, "cached kernel")
    recorded = index.get(target.name)
    return recorded is not None and _sha256(target) == recorded


@contextmanager
def _build_lock(directory: Path) -> Iterator[None]:
    """One process builds while the others (ranks starting together) wait, then find the object built."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): concurrent builders race harmlessly thanks to the atomic rename
        yield
        return
    fd = os.open(directory / ".build.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def build(directory: Path | None = None, force: bool = False) -> tuple[Path, float]:
    """Compile the kernels, or find them in the cache; returns ``(path, seconds spent compiling)``.

    The cache directory must be private (created 0700; one that belongs to another user or is writable by
    group or others raises :class:`UnsafeCacheError`). A cached object is used only if it is private and
    its SHA-256 is the one recorded in the directory's index when it was built; otherwise (missing,
    truncated, corrupt, planted) it is rebuilt. Builds write a temporary file and rename it into place,
    under a lock, so that concurrent first builds never load a partial file and compile once.
    """
    global degraded
    src = source()
    out_dir = _private_dir(directory if directory is not None else cache_dir())
    errors: list[str] = []
    with _build_lock(out_dir):
        index = _read_index(out_dir)
        for cc in _compilers():
            version = _compiler_version(cc)
            for rank, extra in enumerate(FLAG_SETS):
                flags = (*BASE_FLAGS, *extra)
                parts = (src, cc, version, *flags, *extra_flags(), _cpu_id(), sys.platform)
                key = hashlib.sha256("\0".join(parts).encode()).hexdigest()
                target = out_dir / f"torch_adamp_kernels_{key[:20]}.so"
                degraded = _degraded(cc, rank, errors) if rank else None
                if not force and _verified(target, index):
                    return target, 0.0
                failed = FAILED + key[:20]
                if not force and failed in index:  # this compiler cannot build this flag set: do not retry
                    errors.append(index[failed])
                    continue
                work = Path(tempfile.mkdtemp(dir=out_dir, prefix=".build-"))  # mode 0700
                so_tmp = work / "kernels.so"
                try:
                    start = time.perf_counter()
                    try:
                        res = _compile_and_link(cc, flags, work, so_tmp)
                    except subprocess.TimeoutExpired:  # not recorded: a loaded machine may build it next time
                        errors.append(f"{cc} {' '.join(extra)}: no result after {COMPILE_TIMEOUT:.0f} s")
                        continue
                    seconds = time.perf_counter() - start
                    if res is not None:
                        errors.append(f"{cc} {' '.join(extra)}: {res.strip()[-300:]}")
                        index[failed] = errors[-1]
                        _write_index(out_dir, index)
                        continue
                    os.chmod(so_tmp, 0o700)
                    index[target.name] = _sha256(so_tmp)
                    os.replace(so_tmp, target)  # atomic: a reader sees the old file or the whole new one
                    _write_index(out_dir, index)
                    return target, seconds
                finally:
                    shutil.rmtree(work, ignore_errors=True)
    degraded = None
    raise RuntimeError("could not compile the torch_adamp CPU kernels: " + ("; ".join(errors) or "no C compiler found"))


def _compile_and_link(cc: str, flags: tuple[str, ...], work: Path, so: Path) -> str | None:
    """Compile every translation unit into ``work`` (concurrently, each run to its end), then link them into
    ``so``; ``None``, or the compiler's first error. Raises ``subprocess.TimeoutExpired`` when the runs take
    over :data:`COMPILE_TIMEOUT`."""
    compile_flags = [f for f in (*flags, *extra_flags()) if f != "-shared"]
    runs = []
    try:
        for name, args in translation_units():
            cmd = [cc, *compile_flags, *args, "-c", "-o", str(work / f"{name}.o")]
            runs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        deadline = time.monotonic() + COMPILE_TIMEOUT
        errors = [run.communicate(timeout=max(0.0, deadline - time.monotonic()))[1] for run in runs]
        failed = [err for run, err in zip(runs, errors, strict=True) if run.returncode != 0]
        if failed:
            return failed[0]
    finally:
        for run in runs:
            if run.poll() is None:
                run.kill()
                run.wait()
    objects = [str(work / f"{name}.o") for name, _ in translation_units()]
    link = [cc, *flags, *extra_flags(), *objects, "-o", str(so), "-lm"]
    res = subprocess.run(link, capture_output=True, text=True, timeout=COMPILE_TIMEOUT)
    return res.stderr if res.returncode != 0 else None


def _degraded(cc: str, rank: int, errors: list[str]) -> str:
    """Why a build with the ``rank``-th flag set (not the first) is slower than the first would be."""
    lost = ("", "no OpenMP threads (one thread per call)", "no -march=native (generic SIMD only)", "no SIMD pragmas")
    return f"{cc}: built with {' '.join(FLAG_SETS[rank]) or 'no optional flags'}: {lost[rank]} ({'; '.join(errors)})"


#: the C types a kernel rule's argument may have (``Rule.kernel_fields``), as ctypes
C_TYPES: dict[str, Any] = {
    "double": ctypes.c_double,
    "float": ctypes.c_float,
    "int32": ctypes.c_int32,
    "int64": ctypes.c_int64,
}
_rule_structs: dict[tuple[str, tuple[tuple[str, str], ...]], type[ctypes.Structure]] = {}


def rule_struct(rule: str, fields: tuple[tuple[str, str], ...]) -> type[ctypes.Structure]:
    """The ctypes mirror of ``ta_<rule>_args`` (csrc/rules/<rule>.h) from the Python rule's ``kernel_fields``
    (``(name, C type)`` in the order of the C struct), built once per declaration."""
    key = (rule, tuple(fields))
    struct = _rule_structs.get(key)
    if struct is None:
        struct = _rule_structs[key] = type(
            f"ta_{rule}_args", (ctypes.Structure,), {"_fields_": [(name, C_TYPES[ctype]) for name, ctype in fields]}
        )
    return struct


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
        ("rule", ctypes.c_void_p),  # const ta_<rule>_args*: see rule_struct
        ("views", ctypes.c_void_p),
        ("spec_right", ctypes.c_int64),
        ("spec_wrong", ctypes.c_int64),
        ("grad_scale", ctypes.c_void_p),  # const float*, NULL: no GradScaler scale
        ("found_inf", ctypes.c_void_p),  # const float*, NULL: no GradScaler skip
    ]


class RowsArgs(ctypes.Structure):
    """``ta_rows_args`` of csrc/torch_adamp.h: the argument of ``torch_adamp_projected_rows``."""

    _fields_ = [
        ("n", ctypes.c_int64),
        ("ptrs", ctypes.c_void_p),
        ("meta", ctypes.c_void_p),
        ("scale", ctypes.c_double),
        ("eps", ctypes.c_double),
        ("extra", ctypes.c_double),
        ("threads", ctypes.c_int32),
        ("reserved", ctypes.c_int32),
        ("out", ctypes.c_void_p),
        ("views", ctypes.c_void_p),
    ]


class AbiField(ctypes.Structure):
    """``ta_abi_field``: one row of an ABI query (csrc/torch_adamp.h)."""

    _fields_ = [("name", ctypes.c_char_p), ("offset", ctypes.c_int64), ("size", ctypes.c_int64)]


def _bind(lib: ctypes.CDLL) -> None:
    for rule in RULES:
        for sfx in ("f32", "f64"):
            fn = getattr(lib, f"torch_adamp_{rule}_{sfx}")
            fn.restype = ctypes.c_int  # 0, or -1 when a scratch allocation failed (nothing modified)
            fn.argtypes = [ctypes.POINTER(Args)]
            for query in ("spare", "scratch"):
                fn = getattr(lib, f"torch_adamp_{rule}_{query}_{sfx}")
                fn.restype = ctypes.c_int64
                fn.argtypes = [ctypes.POINTER(Args)]
    for name in ("rows", "before", "after"):
        for sfx in ("f32", "f64"):
            fn = getattr(lib, f"torch_adamp_projected_{name}_{sfx}")
            fn.restype = ctypes.c_int
            fn.argtypes = [ctypes.POINTER(RowsArgs)]
    for struct in ("args", "rows_args", *RULES):
        fn = getattr(lib, f"torch_adamp_{struct}_abi")
        fn.restype = ctypes.POINTER(AbiField)
        fn.argtypes = []


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
            except OSError as exc:  # an unsafe or unwritable cache directory: the per-user fallback
                path, build_seconds = _build_elsewhere(exc)
            lib = ctypes.CDLL(str(path))
            _bind(lib)
        except Exception as exc:  # no compiler, failed build, unloadable object
            failure = f"{type(exc).__name__}: {exc}"
            warnings.warn(
                f"torch_adamp: the native CPU kernels are unavailable ({failure}); the CPU default step falls "
                "back to the multi-tensor path, several times slower. Install a C compiler (gcc or clang), "
                "or set TORCH_ADAMP_NATIVE=0 to choose that path and silence this warning.",
                RuntimeWarning,
                stacklevel=3,
            )
            return None
        if degraded is not None:
            warnings.warn(
                f"torch_adamp: the native CPU kernels were built without a preferred flag set, so they run "
                f"slower ({degraded}). Install what the compiler lacked (e.g. libgomp for -fopenmp), then "
                f"remove {path.parent} to rebuild.",
                RuntimeWarning,
                stacklevel=3,
            )
        library_path = path
        _lib = lib
        return _lib


def fallback_dir() -> Path:
    """The cache of every process whose own cannot be used: one private directory per user in the system's
    temporary directory (``torch_adamp-<uid>``), reused, so that such processes build once, not each."""
    user = str(os.getuid()) if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
    return Path(tempfile.gettempdir()) / f"torch_adamp-{user}"


def _build_elsewhere(reason: OSError) -> tuple[Path, float]:
    """Build where the cache could not be used (``reason``: unwritable, or refused as unsafe), saying so once:
    in :func:`fallback_dir`, or, where that is unsafe or unwritable too, in a temporary directory removed
    when the process exits (never a compiled library left behind per process)."""
    where = cache_dir()
    try:
        path, seconds = build(fallback_dir())
        instead = f"using {fallback_dir()} instead, shared by this user's processes"
    except OSError as second:
        scratch = Path(tempfile.mkdtemp(prefix="torch_adamp_"))
        atexit.register(shutil.rmtree, scratch, ignore_errors=True)
        path, seconds = build(scratch)
        instead = f"{fallback_dir()} cannot be used either ({second}): building in {scratch}, removed at exit"
    warnings.warn(
        f"torch_adamp: the kernel cache {where} cannot be used ({type(reason).__name__}: {reason}); {instead}. "
        "Set TORCH_ADAMP_CACHE_DIR to a directory only you can write to keep the build between processes.",
        RuntimeWarning,
        stacklevel=4,
    )
    return path, seconds


def extra_flags() -> tuple[str, ...]:
    """Compiler flags added from ``$TORCH_ADAMP_NATIVE_CFLAGS`` (e.g. sanitizers in CI); part of the cache key."""
    return tuple(os.environ.get("TORCH_ADAMP_NATIVE_CFLAGS", "").split())


def projected(name: str, float64: bool) -> Any:
    """``torch_adamp.Projected``'s C function ``name`` (rows, before, after) for float64 or float32 (loaded)."""
    lib = load()
    assert lib is not None
    return getattr(lib, f"torch_adamp_projected_{name}_{'f64' if float64 else 'f32'}")


def kernel(rule: str, float64: bool) -> tuple[Any, Any]:
    """``(step, spare_query)`` C functions of ``rule`` for float64 or float32 (the kernels must be loaded)."""
    lib = load()
    assert lib is not None
    sfx = "f64" if float64 else "f32"
    return getattr(lib, f"torch_adamp_{rule}_{sfx}"), getattr(lib, f"torch_adamp_{rule}_spare_{sfx}")


def scratch_query(rule: str, float64: bool) -> Any:
    """The C function of ``rule`` that returns the bytes of C heap a step with an :class:`Args` allocates."""
    lib = load()
    assert lib is not None
    return getattr(lib, f"torch_adamp_{rule}_scratch_{'f64' if float64 else 'f32'}")


def abi(struct: str) -> tuple[list[tuple[str, int, int]], int, int]:
    """What the loaded kernels were compiled with for ``struct`` (``"args"``, ``"rows_args"`` or a rule's
    name): ``([(field, offset, size), ...], sizeof, alignof)``."""
    lib = load()
    assert lib is not None
    rows = getattr(lib, f"torch_adamp_{struct}_abi")()
    fields = []
    k = 0
    while rows[k].name is not None:
        fields.append((rows[k].name.decode(), rows[k].offset, rows[k].size))
        k += 1
    return fields, rows[k].offset, rows[k].size
