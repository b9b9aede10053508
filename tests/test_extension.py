"""The extension point: a rule defined outside the package (examples/custom_rule.py) on every path.

What a new projected optimizer gets from the engine without touching it: the path choice asks the rule
for its kernels (a rule without one takes the multi-tensor path by default and ``torch.compile`` for
``fused=True``, never the native binding), its options are checked from their declarations, and the
built-in rules' kernels are the ones the native build compiles.
"""

from __future__ import annotations

from typing import Any

import helpers
import pytest
import torch

import torch_adamp
from torch_adamp import _native
from torch_adamp.engine import native
from torch_adamp.rule import Rule

RMSpropP: Any = helpers.example("custom_rule").RMSpropP


def _params() -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(6, 3, 2, 2), (5, 4), (7,)]]


def _run(make: Any, steps: int = 4) -> list[torch.Tensor]:
    ps = _params()
    opt = make(ps)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return [p.detach().clone() for p in ps]


def test_a_rule_without_a_kernel_never_reaches_the_native_binding(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU default of a kernel-less rule is the multi-tensor path, bit for bit (it used to fail with an
    AttributeError from the native back end, which assumed every rule had a kernel)."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the native binding was reached for a rule without a kernel")

    monkeypatch.setattr(_native, "kernel", refuse)
    monkeypatch.setattr(native, "_run_kernel", refuse)
    default = _run(lambda ps: RMSpropP(ps, weight_decay=0.1))
    foreach = _run(lambda ps: RMSpropP(ps, weight_decay=0.1, foreach=True))
    assert all(torch.equal(a, b) for a, b in zip(default, foreach, strict=True))
    assert not native.takes(RMSpropP.rule, RMSpropP.rule.options(RMSpropP(_params()).param_groups[0]))


def test_a_fused_request_without_a_kernel_is_compiled_once() -> None:
    with helpers.counting_compile_backend() as counter:
        fused = _run(lambda ps: RMSpropP(ps, weight_decay=0.1, fused=True), steps=5)
    assert counter.frame_count == 1
    foreach = _run(lambda ps: RMSpropP(ps, weight_decay=0.1, foreach=True), steps=5)
    assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-7) for a, b in zip(fused, foreach, strict=True))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alpha": 1.0}, "Invalid alpha value: 1.0"),  # the option's own check (checks.below_one)
        ({"alpha": "0.9"}, "Invalid alpha value"),
        ({"caution": "no"}, "Invalid caution value: 'no'; expected True or False"),  # bool from the field type
        ({"wd_ratio": 2.0}, "Invalid wd_ratio value"),  # the base options' checks
        ({"fp32_state": 1}, "Invalid fp32_state value"),  # the optimizer's own group keys
    ],
)
def test_options_are_checked_from_their_declarations(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RMSpropP(_params(), **kwargs)
    opt = RMSpropP(_params())
    with pytest.raises(ValueError, match=match):  # and for a group added later
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2, 2))], **kwargs})


def test_rules_are_found_by_name() -> None:
    assert Rule.named("adamp") is torch_adamp.AdamP.rule
    assert Rule.named("sgdp") is torch_adamp.SGDP.rule
    assert Rule.named("rmspropp") is RMSpropP.rule


def test_every_kernel_rule_has_its_kernel_and_every_kernel_its_rule() -> None:
    """The rules that declare a native kernel are the kernel rules the build compiles (one list)."""
    declared = {name for name, rule in Rule._registry.items() if "native" in rule.kernels}
    assert declared == set(_native.RULES)
    for name in _native.RULES:
        assert name in native.OPS  # its custom op, registered from the same list


def test_a_rule_must_define_a_direction() -> None:
    with pytest.raises(TypeError, match="must override direction"):

        class Empty(Rule[Any]):
            name = "empty"
