"""torch_adamp.integrations.timm against timm's optimizer factory.

timm itself imports torchvision, whose PyPI wheels need the CUDA torch; where ``import timm`` fails
(CI, a CPU-only torch), the factory is loaded from the installed package's files with its parent
packages' ``__init__`` skipped: ``timm.optim._optim_factory`` and the optimizers need only torch
(``timm.models`` is stubbed; it serves only ``layer_decay``). Skips when timm is not installed.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import torch_adamp
from torch_adamp.integrations import timm as integration


def _drop_timm_modules(keep: set[str]) -> None:
    for name in [m for m in sys.modules if (m == "timm" or m.startswith("timm.")) and m not in keep]:
        del sys.modules[name]


def timm_required() -> bool:
    """CI names timm in ``$TORCH_ADAMP_REQUIRE`` where its setup installed timm with a matching torchvision: then
    the real ``import timm`` must work (no shim)."""
    return "timm" in {m.strip() for m in os.environ.get("TORCH_ADAMP_REQUIRE", "").split(",")}


@pytest.fixture
def factory() -> Iterator[Any]:
    """timm's ``timm.optim._optim_factory``: imported normally when timm imports, else loaded by path."""
    before = {m for m in sys.modules if m == "timm" or m.startswith("timm.")}
    if timm_required():
        importlib.import_module("timm")  # the whole package, torchvision included: an error fails the test
    spec = importlib.util.find_spec("timm") if "timm" not in sys.modules else sys.modules["timm"].__spec__
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("timm is not installed (pip install --no-deps timm)")
    try:
        module = importlib.import_module("timm.optim._optim_factory")
    except Exception:
        _drop_timm_modules(before)  # a partial import of timm
        root = Path(next(iter(spec.submodule_search_locations)))
        for name, folder in (("timm", root), ("timm.optim", root / "optim")):
            package = types.ModuleType(name)
            package.__path__ = [str(folder)]
            sys.modules[name] = package
        stub = types.ModuleType("timm.models")

        def group_parameters(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("timm.models is not importable here")

        stub.group_parameters = group_parameters  # type: ignore[attr-defined]
        sys.modules["timm.models"] = stub
        module = importlib.import_module("timm.optim._optim_factory")
    saved = dict(module.default_registry._optimizers)
    try:
        yield module
    finally:
        module.default_registry._optimizers.clear()
        module.default_registry._optimizers.update(saved)
        _drop_timm_modules(before)


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),  # scale-invariant conv
        nn.Flatten(), nn.Linear(8 * 6 * 6, 10),
    )  # fmt: skip


def train(opt: torch.optim.Optimizer, net: nn.Module, steps: int = 5) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in net.parameters()]


def test_defaults_are_timms(factory: Any) -> None:
    # the defaults stated in the docs are the ones of the installed timm's own entries
    for ours, theirs in integration.NAMES.items():
        timm_defaults = factory.get_optimizer_info(theirs).defaults
        expected = {k: v for k, v in integration.TIMM_DEFAULTS[theirs].items() if k != "project_momentum"}
        assert timm_defaults == expected, (ours, timm_defaults)


def test_register_adds_names_and_leaves_timms_own(factory: Any) -> None:
    assert integration.register() == ["tadamp", "tsgdp"]
    assert {"tadamp", "tsgdp", "adamp", "sgdp"} <= set(factory.list_optimizers())
    assert factory.get_optimizer_class("tadamp", bind_defaults=False) is torch_adamp.AdamP
    assert factory.get_optimizer_class("tsgdp", bind_defaults=False) is torch_adamp.SGDP
    assert factory.get_optimizer_class("adamp", bind_defaults=False).__module__ == "timm.optim.adamp"
    assert factory.get_optimizer_class("sgdp", bind_defaults=False).__module__ == "timm.optim.sgdp"


def test_create_optimizer_v2_builds_ours_with_timms_defaults(factory: Any) -> None:
    integration.register()
    net = model()
    opt = factory.create_optimizer_v2(net, "tadamp", lr=2e-3, weight_decay=0.05)
    assert type(opt) is torch_adamp.AdamP
    group = opt.param_groups[0]
    assert group["wd_ratio"] == 0.01 and group["nesterov"] is True and group["lr"] == 2e-3
    # timm's grouping: no weight decay on 1-D parameters
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.05]
    sgd = factory.create_optimizer_v2(model(), "tsgdp", lr=0.1, weight_decay=1e-4)
    assert type(sgd) is torch_adamp.SGDP
    g = sgd.param_groups[0]
    assert g["momentum"] == 0.9 and g["nesterov"] is True and g["project_momentum"] is False
    # arguments given to the factory win over the defaults
    custom = factory.create_optimizer_v2(model(), "tadamp", lr=1e-3, wd_ratio=0.1, nesterov=False)
    assert custom.param_groups[0]["wd_ratio"] == 0.1 and custom.param_groups[0]["nesterov"] is False


@pytest.mark.parametrize(("ours", "theirs", "kwargs"), [
    ("tadamp", "adamp", {"lr": 1e-2, "weight_decay": 0.05}),
    ("tsgdp", "sgdp", {"lr": 0.1, "weight_decay": 1e-3}),
    ("tsgdp", "sgdp", {"lr": 0.1, "weight_decay": 1e-3, "nesterov": False}),  # the unprojected buffer matters
])  # fmt: skip
def test_same_numbers_as_timms_own_optimizer(factory: Any, ours: str, theirs: str, kwargs: dict[str, Any]) -> None:
    integration.register()
    reference = model()
    expected = train(factory.create_optimizer_v2(reference, theirs, **kwargs), reference)
    net = model()
    opt = factory.create_optimizer_v2(net, ours, track_stats=True, **kwargs)
    got = train(opt, net)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert opt.stats()["projected_fraction"] > 0  # the conv before BatchNorm was projected: the test means something


def test_replace_points_timms_names_at_ours(factory: Any) -> None:
    assert integration.register(replace=True) == ["tadamp", "tsgdp", "adamp", "sgdp"]
    opt = factory.create_optimizer_v2(model(), "adamp", lr=1e-3)
    assert type(opt) is torch_adamp.AdamP and opt.param_groups[0]["wd_ratio"] == 0.01
    assert type(factory.create_optimizer_v2(model(), "lookahead_sgdp", lr=0.1)._base_optimizer) is torch_adamp.SGDP


def test_an_explicit_registry(factory: Any) -> None:
    registry = factory.OptimizerRegistry()
    integration.register(registry=registry)
    assert registry.list_optimizers() == ["tadamp", "tsgdp"]
    assert "tadamp" not in factory.list_optimizers()  # the default registry untouched


def test_without_timm_the_error_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "timm.optim._optim_factory", None)  # import raises ImportError
    with pytest.raises(ImportError, match="needs an importable timm") as e:
        integration.register()
    assert "scripts/setup.sh timm" in str(e.value)


@pytest.mark.parametrize(
    ("version", "pin", "index"),
    [
        ("2.13.0+cpu", "'torchvision==0.28.*'", "--index-url https://download.pytorch.org/whl/cpu"),
        ("2.9.1+cu128", "'torchvision==0.24.*'", "--index-url https://download.pytorch.org/whl/cu128"),
        ("2.14.1", "'torchvision==0.29.*'", None),  # PyPI's own build: its torchvision is on PyPI
    ],
)
def test_install_hint_names_the_matching_torchvision(
    version: str, pin: str, index: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "version", lambda name: version if name == "torch" else "0")
    hint = integration.install_hint()
    assert f"'torch=={version}' {pin}" in hint and "pip install timm" in hint
    assert (index in hint) if index else ("--index-url" not in hint)


def test_create_optimizer_v2_adamp_is_ours_after_register_replace() -> None:
    """The README's route with the real timm: after ``register(replace=True)``,
    ``timm.optim.create_optimizer_v2(model, "adamp")`` builds torch_adamp.AdamP (where timm imports)."""
    before = {m for m in sys.modules if m == "timm" or m.startswith("timm.")}
    try:
        import timm
    except Exception as e:
        _drop_timm_modules(before)  # a partial import of timm
        if timm_required():
            raise
        pytest.skip(f"timm does not import here ({type(e).__name__}): tested through the shim above")
    from timm.optim import _optim_factory

    saved = dict(_optim_factory.default_registry._optimizers)
    try:
        integration.register(replace=True)
        opt = timm.optim.create_optimizer_v2(model(), "adamp", lr=1e-3, weight_decay=0.05)
        assert type(opt) is torch_adamp.AdamP and opt.param_groups[0]["wd_ratio"] == 0.01
        assert type(timm.optim.create_optimizer_v2(model(), "sgdp", lr=0.1)) is torch_adamp.SGDP
    finally:
        _optim_factory.default_registry._optimizers.clear()
        _optim_factory.default_registry._optimizers.update(saved)
