"""What one optimizer keeps for the engine between steps: the back end of ``fused=True``, chosen when the
optimizer is built, and what the back ends reuse (the native kernel's guesses and spare block, the compile
back end's compiled steps). Only speed depends on it: results are the same bits without one."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

#: the values of ``TORCH_ADAMP_FUSED``, read when an optimizer is built
FUSED_BACKENDS = ("auto", "native", "compile", "triton")


@dataclass(frozen=True)
class Backend:
    """What ``fused=True`` runs, per device/dtype bucket.

    ``fused``: ``"auto"`` (or ``"native"``): the rule's native kernel for CPU buckets when the rule has one
    and the kernels built, its Triton kernels for CUDA buckets when it has them and Triton is installed,
    ``torch.compile`` of the multi-tensor path elsewhere; ``"compile"``: ``torch.compile`` everywhere;
    ``"triton"``: the Triton kernels for CUDA buckets and for CPU buckets (under Triton's interpreter,
    ``TRITON_INTERPRET=1``: the CPU-only check of the kernels), ``torch.compile`` elsewhere. ``compiler``:
    the ``backend`` argument of that ``torch.compile``.
    """

    fused: str = "auto"
    compiler: Any = "inductor"

    def __post_init__(self) -> None:
        if self.fused not in FUSED_BACKENDS:
            raise ValueError(f"Invalid fused back end {self.fused!r}; expected one of {', '.join(FUSED_BACKENDS)}")

    @staticmethod
    def from_env() -> Backend:
        """The back end ``TORCH_ADAMP_FUSED`` names (``auto`` when unset): read once, when an optimizer is built."""
        name = os.environ.get("TORCH_ADAMP_FUSED", "auto").strip().lower() or "auto"
        if name not in FUSED_BACKENDS:
            raise ValueError(f"TORCH_ADAMP_FUSED={name!r}: expected one of {', '.join(FUSED_BACKENDS)}")
        if name == "triton":
            _check_triton()
        return Backend(name)

    @property
    def native(self) -> bool:
        """Whether CPU buckets may take the native kernel."""
        return self.fused in ("auto", "native")


def _check_triton() -> None:
    """``TORCH_ADAMP_FUSED=triton`` refused where it cannot run: without Triton, or on a machine without CUDA
    outside Triton's interpreter (its CPU mode needs ``TRITON_INTERPRET=1`` before triton is imported)."""
    if importlib.util.find_spec("triton") is None:
        raise RuntimeError("TORCH_ADAMP_FUSED=triton: Triton is not installed (pip install triton)")
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        raise RuntimeError(
            "TORCH_ADAMP_FUSED=triton on a machine without CUDA runs the Triton kernels on CPU tensors, in Triton's "
            "interpreter only: set TRITON_INTERPRET=1 in the environment before the process imports triton"
        )


class LRU(dict[Any, Any]):
    """A dict that keeps its ``limit`` most recently set entries."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def __setitem__(self, key: Any, value: Any) -> None:
        self.pop(key, None)
        super().__setitem__(key, value)
        while len(self) > self.limit:
            del self[next(iter(self))]


class Workspace:
    """What the engine keeps between the steps of one optimizer (its ``_workspace``).

    * ``backend``: what ``fused=True`` runs (:class:`Backend`, from ``TORCH_ADAMP_FUSED`` when built);
    * the view each parameter took at its last step: the guesses of the native kernel's speculative sweep,
      kept per list of parameters handed to the kernel (a list not seen at the last steps starts without);
    * the spare block of that sweep (a ``uint8`` tensor the size of the largest tensor stepped under a
      guess, reused between steps, freed with the optimizer or by :meth:`release`);
    * how many speculative sweeps guessed right and wrong (``spec_right``, ``spec_wrong``);
    * the compile back end's compiled steps (``compiled``), one per group signature;
    * the Triton back end's plans (``triton_plans``: tables, views of the last step, spare blocks).
    """

    MAX_LISTS = 64
    #: Triton plans kept (each holds its spare blocks, up to a copy of its parameters)
    MAX_TRITON_PLANS = 16

    def __init__(self, backend: Backend | None = None) -> None:
        self.backend = backend if backend is not None else Backend.from_env()
        self.guesses: dict[tuple[int, ...], Tensor] = {}
        #: the native kernel's tables per list of parameters (see engine.native.Plan)
        self.plans: LRU = LRU(self.MAX_LISTS)
        self.compiled: dict[Any, Callable[..., Any]] = {}
        #: the Triton back end's tables and buffers per list of parameters (see engine.triton.Plan)
        self.triton_plans: LRU = LRU(self.MAX_TRITON_PLANS)
        self.spare: Tensor | None = None
        self.spec_right = 0
        self.spec_wrong = 0

    def release(self) -> None:
        """Forget every guess and plan and free the spare block."""
        self.guesses.clear()
        self.plans.clear()
        self.triton_plans.clear()
        self.spare = None

    @property
    def spare_bytes(self) -> int:
        return 0 if self.spare is None else self.spare.numel()

    def spare_block(self, nbytes: int) -> Tensor:
        """The spare block, grown to at least ``nbytes`` (the old one freed first)."""
        if self.spare is None or self.spare.numel() < nbytes:
            self.spare = None
            self.spare = torch.empty(nbytes, dtype=torch.uint8)
        return self.spare

    def remember(self, key: tuple[int, ...], codes: Tensor) -> None:
        """Keep the views of a list of parameters as the guesses of its next step."""
        self.guesses.pop(key, None)
        self.guesses[key] = codes.to(torch.int8)
        while len(self.guesses) > self.MAX_LISTS:
            del self.guesses[next(iter(self.guesses))]
