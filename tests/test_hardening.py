"""Defects other projects' optimizer suites found (PyTorch's test_optim, timm, pytorch_optimizer), each a test.

Every test here failed before its fix: the numbers in the docstrings are the issue's items.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from helpers import PATHS, path_kwargs
from torch import Tensor

import torch_adamp
from torch_adamp import SGDP, AdamP


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(6, 4, 3, 3), (5, 7), (7,), ()]
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]


def _grads(params: list[torch.nn.Parameter], seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)


MAKERS = {
    "adamp": lambda ps, **kw: AdamP(ps, lr=1e-2, weight_decay=0.1, **kw),
    "sgdp": lambda ps, **kw: SGDP(ps, lr=0.1, momentum=0.9, weight_decay=1e-3, **kw),
}


# -- 1: load_state_dict() and deepcopy() keep the param groups as they were ------------------------
@pytest.mark.parametrize("kind", list(MAKERS))
def test_state_dict_is_deterministic_through_load_and_deepcopy(kind: str) -> None:
    params = _params()
    opt = MAKERS[kind](params)
    _grads(params, 1)
    opt.step()
    saved = opt.state_dict()
    other = MAKERS[kind](_params())
    other.load_state_dict(copy.deepcopy(saved))
    again = other.state_dict()
    assert again["param_groups"] == saved["param_groups"]
    assert "differentiable" not in again["param_groups"][0]
    assert copy.deepcopy(opt).state_dict()["param_groups"] == saved["param_groups"]


# -- 2: SGDP takes lr from the groups alone ---------------------------------------------------------
def test_sgdp_needs_no_top_level_lr_when_every_group_has_one() -> None:
    a, b = _params(), _params(1)
    opt = SGDP([{"params": a, "lr": 0.1}, {"params": b, "lr": 0.01}], momentum=0.9)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.01]
    _grads(a + b, 2)
    opt.step()
    with pytest.raises(ValueError, match="lr"):
        SGDP([{"params": _params(), "lr": 0.1}, {"params": _params(1)}])  # one group without any lr
    with pytest.raises(ValueError, match="lr"):
        SGDP(_params())


# -- 3: any one-element tensor lr, on every path, and never a half-applied step ----------------------
@pytest.mark.parametrize("shape", [(), (1,), (1, 1)], ids=["0d", "1", "1x1"])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", list(MAKERS))
def test_one_element_tensor_lr(kind: str, path: str, shape: tuple[int, ...]) -> None:
    results = []
    for lr in (0.01, torch.full(shape, 0.01)):
        params = _params()
        cls = AdamP if kind == "adamp" else SGDP
        extra = {"momentum": 0.9} if kind == "sgdp" else {}
        opt = cls(params, lr=lr, weight_decay=0.1, **extra, **path_kwargs(path))
        for k in range(3):
            _grads(params, k)
            opt.step()
        results.append([p.detach().clone() for p in params])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# -- 5: SGDP's nesterov with momentum 0 or dampening, as the reference package --------------------
@pytest.mark.parametrize("options", [{"momentum": 0.0}, {"momentum": 0.9, "dampening": 0.1}])
@pytest.mark.parametrize("path", PATHS)
def test_sgdp_nesterov_edge_cases_match_the_reference(options: dict[str, Any], path: str) -> None:
    adamp_ref = pytest.importorskip("adamp")
    ours, ref = _params(), _params()
    opt = SGDP(ours, lr=0.1, nesterov=True, weight_decay=1e-3, **options, **path_kwargs(path))
    ref_opt = adamp_ref.SGDP(ref, lr=0.1, nesterov=True, weight_decay=1e-3, **options)
    for k in range(4):
        _grads(ours, k)
        _grads(ref, k)
        opt.step()
        ref_opt.step()
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# -- 8: non-float parameters are refused by name, at construction and add_param_group ---------------
@pytest.mark.parametrize("dtype", [torch.int16, torch.uint8, torch.bool, torch.int32, torch.int64, torch.float8_e4m3fn])
@pytest.mark.parametrize("kind", list(MAKERS))
def test_non_float_parameters_are_refused(kind: str, dtype: torch.dtype) -> None:
    bad = torch.zeros(4, 3, dtype=dtype)
    with pytest.raises(ValueError, match=r"'bad'.*dtype"):
        MAKERS[kind]([("ok", torch.nn.Parameter(torch.zeros(3))), ("bad", bad)])
    opt = MAKERS[kind](_params())
    with pytest.raises(ValueError, match="dtype"):
        opt.add_param_group({"params": [bad]})
    assert len(opt.param_groups) == 1


# -- 11: group values checked on load as at construction ---------------------------------------------
@pytest.mark.parametrize(("key", "value"), [("nesterov", "no"), ("lr", "abc"), ("eps", -1.0)])
def test_bad_group_values_are_refused_on_load_before_anything_changes(key: str, value: Any) -> None:
    params = _params()
    opt = MAKERS["adamp"](params)
    _grads(params, 0)
    opt.step()
    saved = opt.state_dict()
    before = copy.deepcopy(opt.state_dict())
    bad = copy.deepcopy(saved)
    bad["param_groups"][0][key] = value
    with pytest.raises(ValueError, match=key):
        opt.load_state_dict(bad)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for k, st in before["state"].items():
        for name, t in st.items():
            assert torch.equal(after["state"][k][name], t)


@pytest.mark.parametrize("path", PATHS)
def test_integer_step_counters_are_normalised(path: str) -> None:
    """A checkpoint with an int64 (or Python int) step, which torch.optim.AdamW and foreach=False accept."""
    params = _params()
    opt = AdamP(params, lr=1e-2, **path_kwargs(path))
    _grads(params, 0)
    opt.step()
    sd = opt.state_dict()
    ref = AdamP([torch.nn.Parameter(p.detach().clone()) for p in params], lr=1e-2, **path_kwargs(path))
    ref.load_state_dict(copy.deepcopy(sd))
    sd["state"][0]["step"] = torch.tensor(1, dtype=torch.int64)
    sd["state"][1]["step"] = 1
    opt.load_state_dict(sd)
    for o in (opt, ref):
        _grads(list(o.param_groups[0]["params"]), 1)
        o.step()
    for p, q in zip(opt.param_groups[0]["params"], ref.param_groups[0]["params"], strict=True):
        assert torch.equal(p, q)
    assert all(isinstance(opt.state[p]["step"], Tensor) and opt.state[p]["step"].dtype == torch.float32 for p in params)


def test_torch_adamp_exports_still_work() -> None:
    assert torch_adamp.SGDP is SGDP


# -- 10: one huge or non-finite gradient element stays one element, on every path --------------------
@pytest.mark.parametrize("big", [1e20, 1e38, float("inf"), float("nan")], ids=["1e20", "1e38", "inf", "nan"])
@pytest.mark.parametrize("kind", list(MAKERS))
def test_a_huge_gradient_element_is_contained_as_on_the_per_tensor_path(kind: str, big: float) -> None:
    """A row whose squared norm overflows float32 fails the test (its cosine would read 0, and projecting
    would spread the element over the row, then NaN over the tensor): not projected, like the per-tensor
    path, whose cosine does not overflow; torch.optim.SGD stays finite too."""
    counts = {}
    for path in [*PATHS, "default"]:
        gen = torch.Generator().manual_seed(1)
        p = torch.nn.Parameter(torch.randn(8, 16, generator=gen))
        kw = path_kwargs(path) if path != "default" else {}
        opt = SGDP([p], lr=0.1, momentum=0.9, **kw) if kind == "sgdp" else AdamP([p], lr=0.1, **kw)
        for step in range(3):
            g = torch.randn(8, 16, generator=gen)
            if step == 0:
                g[2, 3] = big
            p.grad = g
            opt.step()
        counts[path] = int((~torch.isfinite(p)).sum())
    expected = 0 if abs(big) < float("inf") else 1  # inf and NaN (abs(nan) < inf is False): that element only
    assert counts == dict.fromkeys(counts, expected), counts
