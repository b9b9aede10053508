"""``torch_adamp.OrthoGrad(inner)`` against pytorch_optimizer's ``OrthoGrad`` (Prieto et al. 2025).

The rewrite of the gradients equals pytorch_optimizer's ``apply_orthogonal_gradients`` within float32
rounding on every tensor of held-out models (convolutional with BatchNorm, and a transformer block); the
wrapped optimizer's trajectory stays within float32 rounding of pytorch_optimizer's over a short run; no host
read is added; the step compiles with ``fullgraph=True``. FSDP2: tests/test_distributed.py.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import torch_adamp
from torch_adamp import OrthoGrad, distributed
from torch_adamp.projected.orthograd import orthogonalize

pytorch_optimizer = pytest.importorskip("pytorch_optimizer")


def _conv_net() -> nn.Module:
    # conv without bias before BatchNorm: a bias there has a gradient of rounding noise only, which Adam
    # normalises to lr-sized steps (any two implementations then diverge chaotically)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5)
    )


def _transformer() -> nn.Module:
    return nn.Sequential(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), nn.Flatten(1))


def _loss(model: nn.Module, kind: str, step: int, dtype: torch.dtype = torch.float32) -> Tensor:
    g = torch.Generator().manual_seed(step)
    if kind == "conv":
        x, y = torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 5, (16,), generator=g)
        return F.cross_entropy(model(x.to(dtype)), y)
    x = torch.randn(4, 6, 16, generator=g)
    return model(x.to(dtype)).square().mean()


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return _conv_net() if kind == "conv" else _transformer()


@pytest.mark.parametrize("kind", ["conv", "transformer"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rewrite_is_pytorch_optimizers(kind: str, dtype: torch.dtype) -> None:
    model = _model(kind).to(dtype)
    _loss(model, kind, 0, dtype).backward()
    params = [p for p in model.parameters() if p.grad is not None]
    grads = [p.grad.clone() for p in params]  # type: ignore[union-attr]
    distributed.finish(orthogonalize(params, [p.grad for p in params]))  # type: ignore[misc]
    ours = [p.grad.clone() for p in params]  # type: ignore[union-attr]
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    pytorch_optimizer.base.optimizer.BaseOptimizer.apply_orthogonal_gradients(params, eps=1e-30)
    tol = 2e-6 if dtype == torch.float32 else 1e-12
    for a, p in zip(ours, params, strict=True):
        torch.testing.assert_close(a, p.grad, rtol=tol, atol=tol * p.grad.abs().max().item())  # type: ignore[union-attr]
        # orthogonal to the weight, and of the original norm (or zero where the gradient was radial)
    for a, p, g in zip(ours, params, grads, strict=True):
        if a.abs().max() > 0:
            assert abs((a * p).sum().item()) <= 1e-4 * a.norm().item() * p.norm().item() + 1e-30
            torch.testing.assert_close(a.norm(), g.norm(), rtol=1e-5, atol=0)


@pytest.mark.parametrize(("kind", "inner"), [("conv", "AdamW"), ("conv", "SGD"), ("transformer", "SGD")])
def test_wrapped_trajectory_is_pytorch_optimizers(kind: str, inner: str) -> None:
    """(Not AdamW on the transformer: its key bias has a gradient of rounding noise only, softmax being
    invariant to it, which Adam normalises to lr-sized steps: any two implementations diverge there.)"""
    a_model = _model(kind)
    b_model = copy.deepcopy(a_model)

    def make(params: Any) -> torch.optim.Optimizer:
        if inner == "AdamW":
            return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
        return torch.optim.SGD(params, lr=0.05, momentum=0.9)

    a = OrthoGrad(make(a_model.parameters()))
    b = pytorch_optimizer.OrthoGrad(make(b_model.parameters()))
    for step in range(10):
        for m, o in ((a_model, a), (b_model, b)):
            o.zero_grad()
            _loss(m, kind, step).backward()
            o.step()
    for p, q in zip(a_model.parameters(), b_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5 * q.abs().max().item())
    # and it is not the plain inner optimizer
    c_model = _model(kind)
    c = make(c_model.parameters())
    for step in range(10):
        c.zero_grad()
        _loss(c_model, kind, step).backward()
        c.step()
    assert (
        max((p - q).abs().max().item() for p, q in zip(a_model.parameters(), c_model.parameters(), strict=True)) > 1e-4
    )


def test_shares_containers_and_schedulers() -> None:
    model = _model("conv")
    inner = torch.optim.AdamW(model.parameters(), lr=0.1)
    opt = OrthoGrad(inner)
    assert opt.param_groups is inner.param_groups and opt.state is inner.state
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    _loss(model, "conv", 0).backward()
    opt.step()
    sched.step()
    assert inner.param_groups[0]["lr"] == 0.05
    sd = opt.state_dict()
    opt.load_state_dict(sd)
    assert repr(opt).startswith("OrthoGrad(")


class _CountOps(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_no_host_read() -> None:
    model = _model("conv")
    opt = OrthoGrad(torch.optim.SGD(model.parameters(), lr=0.1, foreach=True))
    _loss(model, "conv", 0).backward()
    with torch.no_grad(), _CountOps() as c:
        opt.step()
    assert "aten._local_scalar_dense.default" not in c.ops


class _PlainSGD(torch.optim.Optimizer):
    def __init__(self, params: Any, lr: float) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for g in self.param_groups:
            ps = [p for p in g["params"] if p.grad is not None]
            torch._foreach_add_(ps, [p.grad for p in ps], alpha=-g["lr"])


def test_compiles_fullgraph() -> None:
    pa = [nn.Parameter(torch.randn(s)) for s in ((6, 4), (5,), (3, 2, 2))]
    pb = [nn.Parameter(p.detach().clone()) for p in pa]
    a, b = OrthoGrad(_PlainSGD(pa, 0.1)), OrthoGrad(_PlainSGD(pb, 0.1))
    step = torch.compile(b.step, fullgraph=True, backend="aot_eager")
    for k in range(2):
        g = torch.Generator().manual_seed(k)
        for p, q in zip(pa, pb, strict=True):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        a.step()
        step()
        for p, q in zip(pa, pb, strict=True):
            torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-6)


def test_half_precision_and_refusals() -> None:
    p = nn.Parameter(torch.randn(8, 4, dtype=torch.bfloat16))
    p.grad = torch.randn_like(p)
    opt = OrthoGrad(torch.optim.SGD([p], lr=0.1))
    opt.step()
    assert p.grad.dtype == torch.bfloat16
    with pytest.raises(TypeError, match=r"torch\.optim\.Optimizer"):
        OrthoGrad(object())  # type: ignore[arg-type]
    q = nn.Parameter(torch.randn(3, 2, dtype=torch.complex64))
    with pytest.raises(ValueError, match="complex"):
        OrthoGrad(torch.optim.SGD([q], lr=0.1))
    e = nn.Embedding(5, 3, sparse=True)
    e(torch.tensor([1])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        OrthoGrad(torch.optim.SGD(e.parameters(), lr=0.1)).step()
    assert torch_adamp.OrthoGrad is OrthoGrad
