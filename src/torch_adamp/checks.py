"""What every entry point checks, written once: the bottom layer, imported by the rules, the optimizers,
``Projected`` and the functional API alike.

Each check raises ``ValueError`` whose message names the argument (``Invalid <name> value: ...``), as
``torch.optim`` does, before anything is modified.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

#: the ``scale_invariant`` option: the paper's cosine test, always one view, or never
ScaleInvariant = Literal["auto", "channel", "layer"] | bool
SCALE_INVARIANT_CHOICES: tuple[ScaleInvariant, ...] = ("auto", "channel", "layer", False)
#: the ``corrected_weight_decay`` option: off, the weights the projection judged scale-invariant, or every weight
CorrectedDecay = Literal["all"] | bool

#: a check: ``check(name, value)`` raises ``ValueError`` naming the option for a value it cannot take
Check = Callable[[str, Any], None]

#: parameter dtypes the optimizers step (half precision in float32); anything else is refused by name
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def nonneg(name: str, value: Any) -> None:
    """A finite number >= 0 (a one-element tensor is read: only at construction and for checks)."""
    if isinstance(value, Tensor) and value.device.type == "meta":
        raise ValueError(
            f"Invalid {name} value: a tensor on the meta device has no value; pass a number or a real tensor"
        )
    v = value.item() if isinstance(value, Tensor) else value
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not v >= 0.0 or not math.isfinite(v):
        raise ValueError(f"Invalid {name} value: {value!r}; expected a finite number >= 0")


def fraction(name: str, value: Any) -> None:
    """A number in ``[0, 1]`` (``wd_ratio``)."""
    nonneg(name, value)
    if value > 1:
        raise ValueError(f"Invalid {name} value: {value!r}; expected a number in [0, 1]")


def below_one(name: str, value: Any) -> None:
    """A number in ``[0, 1)`` (an exponential moving-average factor)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value < 1.0:
        raise ValueError(f"Invalid {name} value: {value!r}; expected a number with 0 <= {name} < 1")


def boolean(name: str, value: Any) -> None:
    """``True`` or ``False`` (a string such as ``"no"`` would be truthy)."""
    if not isinstance(value, bool):
        raise ValueError(f"Invalid {name} value: {value!r}; expected True or False")


def optional_boolean(name: str, value: Any) -> None:
    """``True``, ``False`` or ``None`` (``foreach``, ``fused``)."""
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"Invalid {name} value: {value!r}; expected True, False or None")


def lr(name: str, value: Any) -> None:
    """A learning rate: a finite number >= 0, or a one-element tensor holding one."""
    if isinstance(value, Tensor) and value.numel() != 1:
        raise ValueError(f"Invalid {name} value: a tensor lr must have one element, got shape {tuple(value.shape)}")
    nonneg(name, value)


def scale_invariant(name: str, value: object) -> None:
    """One of ``"auto"``, ``"channel"``, ``"layer"`` or ``False``."""
    if value is True:  # spelled out: True == "auto" would be ambiguous
        raise ValueError(
            f"Invalid {name} value: True; use 'auto' (cosine test), "
            "'channel' or 'layer' (always project), or False (never project)"
        )
    if not any(value is c or (isinstance(value, str) and value == c) for c in SCALE_INVARIANT_CHOICES):
        raise ValueError(f"Invalid {name} value: {value!r}; expected one of 'auto', 'channel', 'layer', False")


def corrected_weight_decay(name: str, value: object) -> None:
    """``False``, ``True`` (the weights the projection judges scale-invariant at the step) or ``"all"``."""
    if not (value is False or value is True or (isinstance(value, str) and value == "all")):
        raise ValueError(f"Invalid {name} value: {value!r}; expected False, True or 'all'")


def lr_max(name: str, value: object) -> None:
    """``None`` (filled with the group's lr when the group is added) or a finite number > 0."""
    if value is None:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 < value < math.inf:
        raise ValueError(f"Invalid {name} value: {value!r}; expected a finite number > 0 (the schedule's peak lr)")


def correction(group: dict[str, Any]) -> None:
    """``corrected_weight_decay`` needs ``lr_max`` (checked where both are known: a group, the functional API)."""
    if group.get("corrected_weight_decay", False) is not False and group.get("lr_max") is None:
        raise ValueError(
            "Invalid lr_max value: None; corrected_weight_decay scales the decay by lr / lr_max, so lr_max (the "
            "schedule's peak lr) must be given (optimizers fill it with the group's lr when a group is added with "
            "the correction on; set group['lr_max'] when turning it on later)"
        )


def lr_value(lr: Any) -> float | None:
    """The number a group's ``lr`` holds (read once, when a group is added: the default ``lr_max``), or ``None``
    where it has none to read (a meta-device tensor)."""
    if isinstance(lr, Tensor):
        return None if lr.device.type == "meta" else float(lr.detach().reshape(()).item())
    return float(lr)


def scaling_tensors(opt: Any) -> tuple[Tensor | None, Tensor | None]:
    """GradScaler's ``(opt.grad_scale, opt.found_inf)`` as it sets them for ``step()`` (``None`` when absent),
    checked: ``ValueError`` naming the attribute for anything but a one-element real tensor."""
    out = []
    for name in ("grad_scale", "found_inf"):
        t = getattr(opt, name, None)
        real = isinstance(t, Tensor) and (t.is_floating_point() or t.dtype == torch.bool)
        if t is not None and not (real and t.numel() == 1):
            raise ValueError(
                f"Invalid {name} value: {t!r}; GradScaler's protocol sets a one-element float tensor (or None)"
            )
        out.append(t)
    return out[0], out[1]


def describe(group: dict[str, Any], i: int, p: Tensor) -> str:
    """How errors name parameter ``i`` of ``group``: its name when the optimizer was given
    ``named_parameters()``, else its index and shape."""
    names = group.get("param_names")
    if names is not None and i < len(names):
        return f"parameter {names[i]!r}"
    return f"parameter #{i} (shape {tuple(p.shape)}) of its parameter group"


def parameters(group: dict[str, Any], params: Sequence[Any], optimizer: str, *, float_only: bool = True) -> None:
    """Refuse complex parameters and (``float_only``) dtypes the optimizers do not step, naming the parameter.

    ``params`` may hold ``(name, tensor)`` pairs (``named_parameters()``)."""
    for i, p in enumerate(params):
        name, p = p if isinstance(p, tuple) else (None, p)
        if not isinstance(p, Tensor):
            continue
        what = f"parameter {name!r}" if name is not None else describe(group, i, p)
        if p.is_complex():
            raise ValueError(
                f"{what} is complex; {optimizer} does not support complex parameters "
                "(pass torch.view_as_real(p) as a real parameter instead)"
            )
        if float_only and p.dtype not in FLOAT_DTYPES:
            raise ValueError(
                f"{what} has dtype {p.dtype}; {optimizer} steps float32, float64, float16 and bfloat16 parameters only"
            )


def betas(name: str, betas: Any) -> None:
    """A pair ``(beta1, beta2)`` of numbers in ``[0, 1)`` (one-element CPU tensors too, as torch.optim.Adam
    takes them: their values are read here, when the group is built)."""
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"Invalid {name} value: {betas!r}; expected a pair (beta1, beta2)")
    for k, b in enumerate(betas):
        if isinstance(b, Tensor):  # as torch.optim.Adam takes them; their values are read to the host here
            if b.numel() != 1 or not b.is_floating_point() or not b.is_cpu:
                raise ValueError(
                    f"Invalid beta parameter at index {k}: {b!r}; a tensor beta must be a one-element float "
                    "tensor on the CPU (its value is read when the group is built, never at a step on a device)"
                )
            b = b.item()
        if not isinstance(b, (int, float)) or isinstance(b, bool) or not 0.0 <= b < 1.0:
            raise ValueError(f"Invalid beta parameter at index {k}: {b!r}; expected 0 <= beta < 1")
