"""The native kernel cache is as careful as ssh with its keys (issue 15, items 7 and 9).

Each case runs in a fresh process (the library is loaded once per process) with its own cache directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from torch_adamp import _native

pytestmark = pytest.mark.skipif(_native.load() is None, reason=f"native kernels unavailable: {_native.failure}")

PROBE = textwrap.dedent(
    """
    import json, sys, warnings
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
        from torch_adamp import _native
        lib = _native.load()
    print(json.dumps({"loaded": lib is not None, "path": str(_native.library_path), "seconds": _native.build_seconds,
                      "failure": _native.failure, "warnings": [str(w.message) for w in caught]}))
    """
)


#: every case builds into a fresh cache: without optimisation (the last -O wins), which is all a cache test
#: needs, and several times faster to compile
QUICK = {"TORCH_ADAMP_NATIVE_CFLAGS": "-O0"}


def probe(cache: Path, **env: str) -> dict:
    full = {**os.environ, **QUICK, "TORCH_ADAMP_CACHE_DIR": str(cache), **env}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=full, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_cache_is_created_private_and_reused(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = probe(cache)
    assert first["loaded"] and first["seconds"] > 0 and Path(first["path"]).parent == cache
    assert cache.stat().st_mode & 0o777 == 0o700
    so = Path(first["path"])
    assert so.stat().st_mode & 0o022 == 0
    assert json.loads((cache / "index.json").read_text())[so.name] == _native._sha256(so)
    again = probe(cache)
    assert again["loaded"] and again["seconds"] == 0 and again["path"] == first["path"]


@pytest.mark.parametrize("damage", ["truncated", "garbage", "planted"])
def test_a_corrupt_or_planted_object_is_rebuilt_never_loaded(tmp_path: Path, damage: str) -> None:
    cache = tmp_path / "cache"
    so = Path(probe(cache)["path"])
    good = so.read_bytes()
    if damage == "truncated":
        so.write_bytes(good[: len(good) // 3])
    elif damage == "garbage":
        so.write_bytes(os.urandom(len(good)))
    else:  # a valid shared object of someone else's, under the expected name
        other = tmp_path / "evil.c"
        other.write_text('#include <stdio.h>\n__attribute__((constructor)) static void f(void) { puts("PWNED"); }\n')
        subprocess.run(["cc", "-shared", "-fPIC", str(other), "-o", str(so)], check=True)
    out = probe(cache)
    assert out["loaded"] and out["seconds"] > 0  # rebuilt
    assert so.read_bytes() == good


def test_a_shared_cache_directory_is_refused(tmp_path: Path) -> None:
    cache = tmp_path / "shared"
    cache.mkdir()
    cache.chmod(0o777)  # e.g. a group-writable directory on a cluster
    out = probe(cache, TMPDIR=str(tmp_path))
    assert out["loaded"] and Path(out["path"]).parent != cache
    assert any("cannot be used" in w and "writable by group or others" in w for w in out["warnings"])
    assert not list(cache.glob("*.so"))


@pytest.mark.skipif(not hasattr(os, "getuid") or os.getuid() != 0, reason="needs root to chown")
def test_a_file_of_another_user_is_refused(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    so = Path(probe(cache)["path"])
    os.chown(so, 65534, 65534)  # as if planted by user "nobody"
    out = probe(cache)
    assert out["loaded"] and Path(out["path"]).parent != cache
    assert any("belongs to uid 65534" in w for w in out["warnings"])


def test_concurrent_first_builds_compile_once(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    env = {**os.environ, **QUICK, "TORCH_ADAMP_CACHE_DIR": str(cache)}
    procs = [
        subprocess.Popen([sys.executable, "-c", PROBE], stdout=subprocess.PIPE, text=True, env=env) for _ in range(4)
    ]
    results = [json.loads(p.communicate(timeout=600)[0].strip().splitlines()[-1]) for p in procs]
    assert all(r["loaded"] for r in results)
    assert sum(r["seconds"] > 0 for r in results) == 1  # the others waited on the lock, then loaded it
    assert len({r["path"] for r in results}) == 1


def test_a_hung_compiler_is_bounded_and_the_fallback_warns(tmp_path: Path) -> None:
    slow = tmp_path / "slowcc"
    slow.write_text("#!/bin/sh\nexec /bin/sleep 60\n")
    slow.chmod(0o755)
    env = {"CC": str(slow), "PATH": str(tmp_path), "TORCH_ADAMP_NATIVE_TIMEOUT": "1"}  # no other compiler
    out = probe(tmp_path / "cache", **env)
    assert not out["loaded"]
    assert "no result after 1 s" in out["failure"]
    assert any("multi-tensor path" in w and "TORCH_ADAMP_NATIVE=0" in w for w in out["warnings"])
    silenced = probe(tmp_path / "cache", TORCH_ADAMP_NATIVE="0")
    assert not silenced["loaded"] and silenced["warnings"] == []


def test_a_rejected_flag_set_warns_and_is_not_retried(tmp_path: Path) -> None:
    real = subprocess.run(["sh", "-c", "command -v cc || command -v gcc"], capture_output=True, text=True)
    log = tmp_path / "calls.log"
    nomp = tmp_path / "nompcc"  # a compiler without OpenMP: rejects -fopenmp, builds everything else
    nomp.write_text(
        f'#!/bin/sh\necho "$*" >> {log}\ncase " $* " in *" -fopenmp "*) echo "no libgomp" >&2; exit 1;; esac\n'
        f'exec {real.stdout.strip()} "$@"\n'
    )
    nomp.chmod(0o755)
    env = {"CC": str(nomp), "PATH": f"{tmp_path}:/usr/bin:/bin"}
    first = probe(tmp_path / "cache", **env)
    assert first["loaded"] and first["seconds"] > 0
    assert any("-fopenmp-simd" in w and "no OpenMP threads" in w and "no libgomp" in w for w in first["warnings"])
    builds = [line for line in log.read_text().splitlines() if "kernels.c" in line]
    assert len(builds) == 2 and " -fopenmp " in f" {builds[0]} " and "-fopenmp-simd" in builds[1]
    second = probe(tmp_path / "cache", **env)  # the cached object, no compile of the rejected set
    assert second["loaded"] and second["seconds"] == 0.0 and second["path"] == first["path"]
    assert any("no OpenMP threads" in w for w in second["warnings"])
    assert len([line for line in log.read_text().splitlines() if "kernels.c" in line]) == 2


def test_an_unusable_cache_falls_back_once_per_user_and_leaves_nothing_per_process(tmp_path: Path) -> None:
    """Hardening round 3, item 4: where the cache cannot be written (here a path under a regular file, which
    even root cannot create) every process used to compile again into a new temporary directory, silently,
    and leave it behind. Now: a warning saying where and why, and one private fallback per user, reused."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    env = {"TMPDIR": str(tmp)}
    first = probe(blocker / "cache", **env)
    second = probe(blocker / "cache", **env)
    fallback = tmp / f"torch_adamp-{os.getuid()}"
    assert first["loaded"] and first["seconds"] > 0 and Path(first["path"]).parent == fallback
    assert second["loaded"] and second["seconds"] == 0 and second["path"] == first["path"]  # built once
    for out in (first, second):
        (warning,) = [w for w in out["warnings"] if "kernel cache" in w]
        assert str(blocker / "cache") in warning and "NotADirectoryError" in warning and str(fallback) in warning
    assert sorted(p.name for p in tmp.iterdir()) == [fallback.name]  # nothing left per process
    assert fallback.stat().st_mode & 0o777 == 0o700


def test_an_unsafe_fallback_builds_in_a_directory_removed_at_exit(tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    unsafe = tmp / f"torch_adamp-{os.getuid()}"
    unsafe.mkdir()
    unsafe.chmod(0o777)  # writable by others: refused as a cache
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    out = probe(blocker / "cache", TMPDIR=str(tmp))
    assert out["loaded"]
    (warning,) = [w for w in out["warnings"] if "kernel cache" in w]
    assert "cannot be used either" in warning and "removed at exit" in warning
    assert sorted(p.name for p in tmp.iterdir()) == [unsafe.name]  # the per-process directory is gone
    assert list(unsafe.iterdir()) == []
