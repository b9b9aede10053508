"""``caution=True`` (timm's ``cadamp`` / ``csgdp``) against timm's own AdamP/SGDP code.

timm itself may not import beside a CPU torch (its torchvision import), so its two optimizer files are
loaded by path from the installed package; the tests skip when timm is not installed.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import PATHS
from torch import Tensor, nn

from torch_adamp import SGDP, AdamP


def _timm_optim() -> tuple[Any, Any]:
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("timm is not installed (pip install --no-deps timm)")
    folder = Path(next(iter(spec.submodule_search_locations))) / "optim"
    pkg = types.ModuleType("_timm_optim_files")
    pkg.__path__ = [str(folder)]
    sys.modules.setdefault("_timm_optim_files", pkg)
    out = []
    for name in ("adamp", "sgdp"):
        full = f"_timm_optim_files.{name}"
        if full not in sys.modules:
            s = importlib.util.spec_from_file_location(full, folder / f"{name}.py")
            assert s is not None and s.loader is not None
            module = importlib.util.module_from_spec(s)
            sys.modules[full] = module
            s.loader.exec_module(module)
        out.append(sys.modules[full])
    if "caution" not in out[0].AdamP.__init__.__code__.co_varnames:
        pytest.skip("this timm has no caution option")
    return out[0], out[1]


SHAPES = ((8, 3, 3, 3), (6, 4, 3, 3), (10, 5), (7,))


def _params() -> list[nn.Parameter]:
    torch.manual_seed(0)
    return [nn.Parameter(torch.randn(s)) for s in SHAPES]


def _grads(params: list[Tensor], step: int) -> list[Tensor]:
    """Channel-orthogonal (tensor 0), layer-orthogonal (tensor 1) and generic gradients."""
    g = torch.Generator().manual_seed(200 + step)
    out = [torch.randn(p.shape, generator=g) for p in params]
    w0, g0 = params[0].detach().reshape(8, -1), out[0].reshape(8, -1)
    g0 -= (g0 * w0).sum(1, keepdim=True) / (w0 * w0).sum(1, keepdim=True) * w0
    w1 = params[1].detach()
    out[1].reshape(6, -1)[:, 0] += 3 * w1.reshape(6, -1)[:, 0].sign()
    out[1] = out[1] - (out[1] * w1).sum() / (w1 * w1).sum() * w1
    return out


def _run(make_ours: Any, make_timm: Any, steps: int = 4) -> list[float]:
    pa, pb = _params(), _params()
    a, b = make_ours(pa), make_timm(pb)
    worst = []
    for step in range(steps):
        grads = _grads([p.detach() for p in pa], step)
        with torch.no_grad():
            for p, q, g in zip(pa, pb, grads, strict=True):
                q.copy_(p)  # one step from the same weights (state evolves identically: same grads)
                p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
        worst.append(max(((p - q).norm() / q.norm()).item() for p, q in zip(pa, pb, strict=True)))
    return worst


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("caution", [True, False])
def test_adamp_caution_matches_timm(path: str, caution: bool) -> None:
    timm_adamp, _ = _timm_optim()
    hyper: dict[str, Any] = {"lr": 0.05, "weight_decay": 0.1, "nesterov": True}
    worst = _run(
        lambda ps: AdamP(ps, **hyper, caution=caution, **PATHS[path]),
        lambda ps: timm_adamp.AdamP(ps, **hyper, caution=caution),
    )
    assert max(worst) <= (0.0 if path == "single" and not caution else 1e-6), worst


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("nesterov", [True, False])
def test_sgdp_caution_matches_timm(path: str, nesterov: bool) -> None:
    _, timm_sgdp = _timm_optim()
    hyper: dict[str, Any] = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3, "nesterov": nesterov}
    worst = _run(
        lambda ps: SGDP(ps, **hyper, project_momentum=False, caution=True, **PATHS[path]),
        lambda ps: timm_sgdp.SGDP(ps, **hyper, caution=True),
    )
    assert max(worst) <= 1e-6, worst


def test_caution_changes_the_step() -> None:
    pa, pb = _params(), _params()
    a, b = AdamP(pa, lr=0.05, caution=True), AdamP(pb, lr=0.05)
    grads = _grads([p.detach() for p in pa], 0)
    for p, q, g in zip(pa, pb, grads, strict=True):
        p.grad, q.grad = g.clone(), g.clone()
    for _ in range(3):
        a.step()
        b.step()
    assert all(not torch.equal(p, q) for p, q in zip(pa, pb, strict=True))


def test_caution_must_be_a_bool() -> None:
    with pytest.raises(ValueError, match="caution"):
        AdamP(_params(), caution=1)  # type: ignore[arg-type]
