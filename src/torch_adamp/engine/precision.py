"""Half precision and grouping: the math runs in float32 for float16/bfloat16 tensors."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

LOW_PRECISION = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the math runs in: float32 for half types, else the dtype itself."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


def upcast(t: Tensor) -> Tensor:
    """``t`` itself, or a float32 copy of a half-precision ``t``."""
    return t.float() if t.dtype in LOW_PRECISION else t


def write_back(params: Sequence[Tensor], computed: Sequence[Tensor]) -> None:
    """Copy float32 results into half-precision tensors (round to nearest); no-op where they are the same."""
    for p, c in zip(params, computed, strict=True):
        if p is not c:
            p.copy_(c)


def group_by_device_and_dtype(indices: Sequence[int], tensors: Sequence[Tensor]) -> dict[Any, list[int]]:
    """Indices of ``tensors`` grouped by (device, compute dtype), in order."""
    groups: dict[Any, list[int]] = defaultdict(list)
    for i in indices:
        t = tensors[i]
        groups[(t.device, compute_dtype(t.dtype))].append(i)
    return groups
