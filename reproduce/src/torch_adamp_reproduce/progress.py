"""Progress bars (tqdm on a terminal, plain lines otherwise) and the check for the command's dependencies."""

from __future__ import annotations

import importlib.util
import sys
import time
from typing import Any, TextIO


class MissingDependency(Exception):
    """A dependency of the command line (matplotlib, tqdm, pycocotools) is not installed (one-line message)."""


def require(*modules: str) -> None:
    """Raise :class:`MissingDependency` unless every module can be imported."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise MissingDependency(
            f"{' and '.join(missing)} {verb} needed here (torch-adamp-reproduce depends on it): "
            f"pip install {' '.join(missing)}"
        )


class _Silent:
    """Stands in for a tqdm bar under ``--quiet``."""

    def __enter__(self) -> _Silent:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, n: int = 1) -> None:
        pass

    def set_description(self, desc: str) -> None:
        pass

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass


class _Lines:
    """Progress as plain lines, for a stream that is not a terminal (a log file, a pipe, CI).

    tqdm redraws its bar with carriage returns, which a file keeps as one huge line. This writes a
    line when the description changes, at most one every ``interval`` seconds in between, and one
    at the end: ``SGD seed 0: 312/624 step (50%), 21 s, loss=0.412``.
    """

    def __init__(self, *, total: int, unit: str, desc: str | None, file: TextIO, interval: float) -> None:
        self.total, self.unit, self.desc, self.file, self.interval = total, unit, desc, file, interval
        self.n = 0
        self.postfix = ""
        self.start = self.last = time.monotonic()
        self.pending = False  # progress not written yet

    def __enter__(self) -> _Lines:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pending:
            self._write()

    def _write(self) -> None:
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        head = f"{self.desc}: " if self.desc else ""
        tail = f", {self.postfix}" if self.postfix else ""
        elapsed = time.monotonic() - self.start
        print(f"{head}{self.n}/{self.total} {self.unit}{pct}, {elapsed:.0f} s{tail}", file=self.file, flush=True)
        self.last = time.monotonic()
        self.pending = False

    def update(self, n: int = 1) -> None:
        self.n += n
        self.pending = True
        if time.monotonic() - self.last >= self.interval or self.n == self.total:
            self._write()

    def set_description(self, desc: str) -> None:
        if desc != self.desc:
            if self.pending:
                self._write()
            self.desc = desc
            self.postfix = ""  # the previous run's
            self._write()

    def set_postfix(self, *args: Any, refresh: bool = True, **kwargs: Any) -> None:
        items = dict(*args, **kwargs)
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())


def progress_bar(
    *,
    total: int,
    unit: str = "it",
    quiet: bool = False,
    desc: str | None = None,
    file: TextIO | None = None,
    interval: float = 10.0,
) -> Any:
    """Progress on ``file`` (default: stderr): a tqdm bar on a terminal, plain lines (one at most every
    ``interval`` seconds, see :class:`_Lines`) on anything else, or a silent stand-in when ``quiet``."""
    if quiet:
        return _Silent()
    stream = sys.stderr if file is None else file
    isatty = getattr(stream, "isatty", None)
    if not (callable(isatty) and isatty()):
        return _Lines(total=total, unit=unit, desc=desc, file=stream, interval=interval)
    require("tqdm")
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, desc=desc, file=stream, dynamic_ncols=True, smoothing=0.05)
