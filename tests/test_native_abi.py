"""The ctypes mirror of the native kernels' argument structs is what the C compiler laid out.

Every argument struct of csrc/ is declared from one field list (torch_adamp.h's ``ta_args`` and
``ta_rows_args``, each kernel rule's ``ta_<rule>_args`` in csrc/rules/<rule>.h), which also gives its ABI
query: the name, offset and size of every field, then sizeof and alignof. The Python side is
``_native.Args``, ``_native.RowsArgs`` and, per rule, the Structure ``_native.rule_struct`` builds from the
rule's ``kernel_fields``. A field reordered, retyped, added or removed on one side only fails here.
"""

from __future__ import annotations

import ctypes

import pytest

import torch_adamp  # noqa: F401  (defines the built-in rules)
from torch_adamp import _native
from torch_adamp.engine import native as _fused
from torch_adamp.rule import Rule

pytestmark = pytest.mark.skipif(_native.load() is None, reason=f"native kernels unavailable: {_native.failure}")

RULES = list(Rule._registry.values())
KERNEL_RULES = [r for r in RULES if r.name in _native.RULES]


def layout(struct: type[ctypes.Structure]) -> tuple[list[tuple[str, int, int]], int, int]:
    """What ctypes makes of ``struct``, in the form of :func:`torch_adamp._native.abi`."""
    fields = [(f[0], getattr(struct, f[0]).offset, getattr(struct, f[0]).size) for f in struct._fields_]
    return fields, ctypes.sizeof(struct), ctypes.alignment(struct)


@pytest.mark.parametrize("name, mirror", [("args", _native.Args), ("rows_args", _native.RowsArgs)])
def test_common_structs_match(name: str, mirror: type[ctypes.Structure]) -> None:
    assert layout(mirror) == _native.abi(name)


@pytest.mark.parametrize("rule", KERNEL_RULES, ids=[r.name for r in KERNEL_RULES])
def test_rule_structs_match(rule: Rule) -> None:
    name, fields = rule.name, rule.kernel_fields
    assert layout(_native.rule_struct(name, fields)) == _native.abi(name)


def test_every_kernel_rule_has_a_python_rule_and_its_custom_op() -> None:
    """The kernel rules are the headers in csrc/rules: each needs a Python rule (its struct's mirror) and
    gets its custom op, which the Python rules without a kernel do not."""
    assert _native.RULES and set(_native.RULES) <= {r.name for r in RULES}
    assert set(_fused.OPS) == set(_native.RULES)
    assert all(f"rules/{name}.h" in _native.SOURCES for name in _native.RULES)


def test_scratch_comes_from_the_kernel() -> None:
    """native_scratch_bytes asks the kernel: AdamP keeps u of one group of rows per thread for a tensor too
    large to stage, and of a whole staged tensor; SGDP stages nothing, and keeps an exception count per row
    (its project_momentum log)."""
    import torch

    large = [torch.zeros(1024, 512)]  # 2 MiB of float32: speculated or read twice, in groups of 16 rows
    one = _fused.native_scratch_bytes("adamp", large, threads=1)
    two = _fused.native_scratch_bytes("adamp", large, threads=2)
    assert two - one == 4 * 16 * 512
    small = [torch.zeros(64, 64)]
    adamp, sgdp = (_fused.native_scratch_bytes(rule, small, threads=1) for rule in ("adamp", "sgdp"))
    # staged u, one u per thread, less SGDP's exception count per row; and two more pointers (a second state
    # tensor and the step counter) in the array passed from Python
    assert adamp - sgdp == 4 * 64 * 64 + 4 - 8 * 64 + 2 * 8
    assert len({_fused.native_scratch_bytes("sgdp", large, threads=t) for t in (1, 2)}) == 1
