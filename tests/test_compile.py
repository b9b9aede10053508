"""``torch.compile(opt.step, fullgraph=True)`` on every path: no graph break, no recompilation.

Graph capture is dynamo's business, so most cases use dynamo's counting
``eager`` backend (seconds, and it counts compiled frames); the native kernel's
custom ops also go through ``aot_eager`` (functionalisation of the in-place op)
and inductor (its lowering), where the compiled step must equal the eager one
bit for bit. ``fullgraph=True`` raises on any graph break; the dynamo counters
are checked as well.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import helpers
import pytest
import torch
import torch.nn as nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import torch_adamp
from torch_adamp.engine import native

#: constructor options of each path; "fused-compile" forces the torch.compile back end of fused=True
PATHS: dict[str, dict[str, Any]] = {
    "single": {"foreach": False},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
    "default": {},
    "fused-compile": {"fused": True},
}
NATIVE_PATHS = ("fused", "default")


def make(kind: str, params: Any, **kw: Any) -> torch.optim.Optimizer:
    if kind == "adamp":
        return torch_adamp.AdamP(params, lr=torch.tensor(1e-2), weight_decay=1e-2, **kw)
    if kind == "adamp_corrected":  # issue 27: the correction computed from the tensor lr, in the graph or the op
        return torch_adamp.AdamP(
            params, lr=torch.tensor(1e-2), weight_decay=0.5, corrected_weight_decay=True, lr_max=2e-2, **kw
        )
    if kind == "sgdp_all":
        return torch_adamp.SGDP(
            params,
            lr=torch.tensor(1e-2),
            momentum=0.9,
            weight_decay=0.1,
            corrected_weight_decay="all",
            lr_max=2e-2,
            **kw,
        )
    if kind == "lionp":
        return torch_adamp.LionP(params, lr=torch.tensor(1e-3), weight_decay=0.1, **kw)
    return torch_adamp.SGDP(params, lr=torch.tensor(1e-2), momentum=0.9, nesterov=True, weight_decay=1e-3, **kw)


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, bias=False),  # scale-invariant: BatchNorm follows
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 8),
        nn.LayerNorm(8),
        nn.Linear(8, 3),
    )


def path_context(path: str, *opts: Any) -> Any:
    """The compile back end forced on ``opts`` for the path "fused-compile"."""
    return helpers.fused_backend("compile", *opts) if path == "fused-compile" else contextlib.nullcontext()


def train_pair(kind: str, path: str, backend: Any, steps: int = 5) -> tuple[nn.Module, nn.Module]:
    """The same model stepped eagerly and through ``torch.compile(opt.step, fullgraph=True)``."""
    eager_model, compiled_model = model(), model()
    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    eager_opt = make(kind, eager_model.parameters(), **PATHS[path])
    compiled_opt = make(kind, compiled_model.parameters(), **PATHS[path])
    step = torch.compile(compiled_opt.step, fullgraph=True, backend=backend)
    with path_context(path, eager_opt, compiled_opt):
        for i in range(steps):
            for m in (eager_model, compiled_model):
                m.zero_grad(set_to_none=True)
                m(x).square().mean().backward()
            eager_opt.step()
            step()
            if i == 2:  # an LR change through the tensor: data, not a recompilation
                for opt in (eager_opt, compiled_opt):
                    opt.param_groups[0]["lr"].fill_(3e-3)
    return eager_model, compiled_model


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("kind", ["adamp", "sgdp", "adamp_corrected", "sgdp_all", "lionp"])
def test_fullgraph_without_graph_breaks_or_recompiles(kind: str, path: str) -> None:
    counter = CompileCounterWithBackend("eager")
    eager_model, compiled_model = train_pair(kind, path, counter)
    assert not counters["graph_break"], dict(counters["graph_break"])
    # two graphs: the first step (which creates the state) and the steady state; none after the LR change
    assert counter.frame_count == 2
    for a, b in zip(eager_model.parameters(), compiled_model.parameters(), strict=True):
        if path in NATIVE_PATHS:
            assert torch.equal(a, b)  # the same kernel, called from the graph
        else:
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


# one inductor compile is enough (slow on CPU); aot_eager covers both ops' functionalisation
@pytest.mark.parametrize(
    ("kind", "backend"),
    [
        ("adamp", "aot_eager"),
        ("sgdp", "aot_eager"),
        ("adamp", "inductor"),
        ("lionp", "aot_eager"),
        ("adamp_corrected", "aot_eager"),
    ],
)
def test_native_custom_op_through_the_compiler(kind: str, backend: str) -> None:
    """The in-place custom op survives functionalisation and inductor: same bits as eager."""
    eager_model, compiled_model = train_pair(kind, "fused", backend, steps=4)
    assert not counters["graph_break"]
    for a, b in zip(eager_model.parameters(), compiled_model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_views_from_a_compiled_functional_step() -> None:
    """The functional API returns the per-parameter view codes from inside a compiled function too."""
    params = [torch.randn(6, 5), torch.randn(5)]
    p = params[0]
    g = torch.randn(6, 5)
    g -= (g * p).sum(1, keepdim=True) / (p * p).sum(1, keepdim=True) * p  # orthogonal per row: channel view
    grads = [g, torch.randn(5)]
    state = [[torch.zeros_like(t) for t in params] for _ in range(2)]
    steps = [torch.tensor(0.0) for _ in params]

    def step(params: list[torch.Tensor], views: list[Any]) -> None:
        torch_adamp.adamp(params, grads, state[0], state[1], steps, fused=True, lr=1e-3, beta1=0.9, beta2=0.999,
                          eps=1e-8, weight_decay=0.0, delta=0.1, wd_ratio=0.1, nesterov=False, views=views)  # fmt: skip

    views: list[Any] = [None, None]
    torch.compile(step, fullgraph=True, backend="eager")(params, views)
    assert [int(v) for v in views] == [1, 0]
    assert not counters["graph_break"]


def test_compiled_step_keeps_optimizer_state_shared() -> None:
    """State created by the compiled first step is the optimizer's state (checkpointing works)."""
    m = model()
    opt = make("adamp", m.parameters())
    step = torch.compile(opt.step, fullgraph=True, backend="eager")
    m(torch.randn(2, 3, 6, 6)).sum().backward()
    step()
    sd = copy.deepcopy(opt.state_dict())
    assert len(sd["state"]) == len(list(m.parameters()))
    assert all(float(s["step"]) == 1.0 for s in sd["state"].values())


def test_native_available_carries_torchs_constant_mark() -> None:
    """``engine.native.available`` is marked as ``torch.compiler.assume_constant_result`` marks a function
    (without importing dynamo at ``import torch_adamp``): the same attributes, the same values."""

    def probe() -> bool:
        return True

    marked = torch.compiler.assume_constant_result(probe)
    added = {k: v for k, v in vars(marked).items()}
    assert added, "torch no longer marks the function: update engine.native._assume_constant_result"
    assert {k: vars(native.available).get(k) for k in added} == added


def test_import_does_not_load_dynamo() -> None:
    import subprocess
    import sys

    code = "import sys, torch_adamp; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"
