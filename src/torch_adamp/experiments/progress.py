"""Progress bars (tqdm, imported lazily) and the check for the optional CLI dependencies."""

from __future__ import annotations

import importlib.util
import sys
from typing import Any


class MissingDependency(Exception):
    """An optional dependency of the command line is not installed (one-line message)."""


def require(*modules: str) -> None:
    """Raise :class:`MissingDependency` unless every module can be imported."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise MissingDependency(f"{' and '.join(missing)} {verb} needed here: pip install 'torch-adamp[cli]'")


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


def progress_bar(*, total: int, unit: str = "it", quiet: bool = False, desc: str | None = None) -> Any:
    """A tqdm bar on stderr, or a silent stand-in when ``quiet``."""
    if quiet:
        return _Silent()
    require("tqdm")
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, desc=desc, file=sys.stderr, dynamic_ncols=True, smoothing=0.05)
