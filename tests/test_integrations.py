"""torch_adamp.integrations.lightning (SGDP for jsonargparse command lines) and .torchtitan (the optimizer
container with "AdamP" and "SGDP"). Each part skips where its package is missing, unless $TORCH_ADAMP_REQUIRE
names it (CI)."""

from __future__ import annotations

import copy
import importlib
import inspect
import os
from typing import Any

import pytest
import torch
from torch import nn

import torch_adamp
from torch_adamp.integrations import lightning as lightning_integration


def require(module: str) -> Any:
    if module in {m.strip() for m in os.environ.get("TORCH_ADAMP_REQUIRE", "").split(",")}:
        return importlib.import_module(module)
    try:
        return importlib.import_module(module)
    except Exception as e:
        pytest.skip(f"{module} is not usable here: {type(e).__name__}: {e}")


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),  # conv before BN: projected
        nn.Flatten(), nn.Linear(8 * 6 * 6, 10),
    )  # fmt: skip


def train(opt: Any, model: nn.Module, steps: int = 4, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


# -- lightning ---------------------------------------------------------------------------------------------
def test_lightning_sgdp_is_sgdp_with_lr_required() -> None:
    cls = lightning_integration.SGDP
    assert issubclass(cls, torch_adamp.SGDP) and lightning_integration.AdamP is torch_adamp.AdamP
    assert inspect.signature(cls).parameters["lr"].default is inspect.Parameter.empty
    a, b = net(), net()
    ours = cls(a.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    plain = torch_adamp.SGDP(b.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    train(ours, a)
    train(plain, b)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
    state = copy.deepcopy(ours.state_dict())
    torch_adamp.SGDP(b.parameters(), lr=0.1, momentum=0.9, nesterov=True).load_state_dict(state)  # interchangeable


@pytest.mark.parametrize(
    ("class_path", "status"),
    [("torch_adamp.SGDP", 2), ("torch_adamp.integrations.lightning.SGDP", 0), ("torch_adamp.AdamP", 0)],
)
def test_lightning_cli_takes_the_integration_sgdp(
    class_path: str, status: int, capsys: pytest.CaptureFixture[str], tmp_path: Any, monkeypatch: Any
) -> None:
    """Why the integration exists: LightningCLI's ``fit`` refuses SGDP's ``lr=required`` default even with
    ``--optimizer.lr`` given ("<required parameter>"), and takes the integration's class (and AdamP). If the
    first case starts passing, jsonargparse has learnt the sentinel: the docs' note and the class can go."""
    lightning = require("lightning")
    require("jsonargparse")
    from lightning.pytorch.cli import LightningCLI

    class Module(lightning.LightningModule):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(2, 2)

    monkeypatch.chdir(tmp_path)
    lr = "0.1" if "SGDP" in class_path else "0.001"
    with pytest.raises(SystemExit) as e:  # --print_config: parse, print the YAML, exit; nothing trained
        LightningCLI(Module, args=["fit", "--optimizer", class_path, "--optimizer.lr", lr, "--print_config"])
    assert e.value.code == status
    out, err = capsys.readouterr()
    if status:
        assert "required parameter" in err
    else:
        assert f"class_path: {class_path}" in out and f"lr: {lr}" in out


# -- torchtitan ------------------------------------------------------------------------------------------------
@pytest.fixture
def titan() -> Any:
    require("torchtitan")
    return importlib.import_module("torch_adamp.integrations.torchtitan")


@pytest.mark.parametrize(
    ("implementation", "fused", "foreach"),
    [("fused", True, False), ("foreach", False, True), ("for-loop", False, False)],
)
def test_torchtitan_container_builds_ours_and_passes_the_implementation(
    titan: Any, implementation: str, fused: bool, foreach: bool
) -> None:
    from torchtitan.components.optimizer import ParamGroupConfig

    model = net()
    no_decay = {"lr": 1e-2, "weight_decay": 0.0}
    decay = {"lr": 1e-2, "weight_decay": 0.1, "track_stats": True}
    config = titan.OptimizersContainer.Config(
        param_groups=[
            ParamGroupConfig(pattern=r"^1\.", optimizer_name="AdamP", optimizer_kwargs=no_decay),
            ParamGroupConfig(pattern=r".*", optimizer_name="AdamP", optimizer_kwargs=decay),
        ],
        implementation=implementation,
    )
    container = config.build(model_parts=[model])
    assert type(container) is titan.OptimizersContainer and len(container) == 1
    opt = container.optimizers[0]
    assert type(opt) is torch_adamp.AdamP
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.1]
    assert all(g["fused"] is fused and g["foreach"] is foreach for g in opt.param_groups)
    assert opt.param_groups[0]["param_names"] == ["1.weight", "1.bias"]  # torchtitan's names ride along
    reference = net()
    ref_opt = torch_adamp.AdamP(
        [{"params": list(reference[1].parameters()), "weight_decay": 0.0},
         {"params": [p for n, p in reference.named_parameters() if not n.startswith("1.")], "weight_decay": 0.1}],
        lr=1e-2, fused=fused, foreach=foreach,
    )  # fmt: skip
    train(container, model)
    train(ref_opt, reference)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q)  # the container adds nothing to the step
    assert opt.stats()["projected_fraction"] > 0


def test_torchtitan_names_theirs_still_resolve_and_unknown_names_are_refused(titan: Any) -> None:
    assert titan.resolve_optimizer_factory("AdamP") is torch_adamp.AdamP
    assert titan.resolve_optimizer_factory("SGDP") is torch_adamp.SGDP
    assert titan.resolve_optimizer_factory("AdamW") is torch.optim.AdamW
    with pytest.raises(NotImplementedError):
        titan.resolve_optimizer_factory("Lamb")


def test_torchtitan_default_adamp_mirrors_default_adamw(titan: Any) -> None:
    from torchtitan.components.optimizer import default_adamw

    ours, theirs = titan.default_adamp(lr=3e-4), default_adamw(lr=3e-4)
    assert [g.optimizer_name for g in ours.param_groups] == ["AdamP"]
    assert ours.param_groups[0].optimizer_kwargs == theirs.param_groups[0].optimizer_kwargs
    assert ours.param_groups[0].pattern == theirs.param_groups[0].pattern
    opt = ours.build(model_parts=[net()]).optimizers[0]
    assert type(opt) is torch_adamp.AdamP and opt.param_groups[0]["betas"] == (0.9, 0.95)


def test_torchtitan_flat_checkpoint_round_trip(titan: Any) -> None:
    """torchtitan's container state dict (flat, keyed by parameter name, as its checkpointer saves it) loads
    into a fresh container, which then steps as the original does."""
    from torchtitan.components.optimizer import ParamGroupConfig

    config = titan.OptimizersContainer.Config(
        param_groups=[ParamGroupConfig(pattern=r".*", optimizer_name="SGDP",
                                       optimizer_kwargs={"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3})]
    )  # fmt: skip
    model = net()
    container = config.build(model_parts=[model])
    train(container, model, steps=3)
    state = copy.deepcopy(container.state_dict())
    assert "state.0.weight.momentum" in state and "param_groups.0.weight.lr" in state
    weights = copy.deepcopy(model.state_dict())
    train(container, model, steps=2, seed=5)
    expected = copy.deepcopy(model.state_dict())
    container.zero_grad()  # (set_to_none) as between torchtitan's steps: its load materialises state only then
    model.load_state_dict(weights)
    fresh = config.build(model_parts=[model])
    fresh.load_state_dict(state)
    train(fresh, model, steps=2, seed=5)
    for k, v in model.state_dict().items():
        assert torch.equal(v, expected[k]), k
