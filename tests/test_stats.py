"""track_stats / stats(): values against hand computations, keys, state_dict, and no work when off."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

import torch_adamp
from torch_adamp import SGDP, AdamP

PATHS = {"single": {"foreach": False}, "foreach": {"foreach": True}, "default": {}}  # default: native kernel on CPU
METRICS = ("view", "weight_norm", "angular_update", "lr_over_norm_sq")


def _angle(a: Tensor, b: Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return math.acos(min(1.0, (a @ b / (a.norm() * b.norm())).item()))


@pytest.mark.parametrize("path", sorted(PATHS))
def test_stats_match_hand_computed_values(path: str) -> None:
    """One SGDP step on w (2x3, forced channel view), v (2x2, never projected) and a bias."""
    w0 = torch.tensor([[1.0, 2.0, -1.0], [0.5, -0.5, 3.0]], dtype=torch.float64)
    v0 = torch.tensor([[2.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    b0 = torch.tensor([0.3, -0.4], dtype=torch.float64)
    gw = torch.tensor([[0.2, -0.1, 0.4], [1.0, 0.3, -0.2]], dtype=torch.float64)
    gv = torch.tensor([[0.5, 0.5], [-1.0, 0.0]], dtype=torch.float64)
    gb = torch.tensor([0.1, 0.2], dtype=torch.float64)
    w, v, b = nn.Parameter(w0.clone()), nn.Parameter(v0.clone()), nn.Parameter(b0.clone())
    opt = SGDP(
        [
            {"params": [("enc.w", w)], "scale_invariant": "channel"},
            {"params": [("enc.v", v), ("enc.b", b)], "scale_invariant": False, "lr": 0.2},
        ],
        lr=0.1,
        weight_decay=0.1,
        wd_ratio=0.5,
        eps=1e-8,
        track_stats=True,
        **PATHS[path],
    )
    w.grad, v.grad, b.grad = gw.clone(), gv.clone(), gb.clone()
    opt.step()

    # by hand: project each row of gw off the row of w0, decay by lr*wd*wd_ratio, step
    wn = w0 / (w0.norm(dim=1, keepdim=True) + 1e-8)
    d = gw - wn * (wn * gw).sum(dim=1, keepdim=True)
    w1 = w0 * (1 - 0.1 * 0.1 * 0.5) - 0.1 * d
    v1 = v0 * (1 - 0.2 * 0.1) - 0.2 * gv
    b1 = b0 * (1 - 0.2 * 0.1) - 0.2 * gb
    for got, want in ((w, w1), (v, v1), (b, b1)):
        torch.testing.assert_close(got.detach(), want, rtol=1e-14, atol=1e-15)
    expected = {}
    for name, view, old, new, lr in (("enc.w", 1, w0, w1, 0.1), ("enc.v", 0, v0, v1, 0.2), ("enc.b", 0, b0, b1, 0.2)):
        expected |= {
            f"{name}/view": float(view),
            f"{name}/weight_norm": new.norm().item(),
            f"{name}/angular_update": _angle(old, new),
            f"{name}/lr_over_norm_sq": lr / old.norm().item() ** 2,
        }
    expected |= {"projected_fraction": 0.5, "projected_numel_fraction": 6 / 10}
    stats = opt.stats()
    assert list(stats) == list(expected)  # stable order: parameter order, then the fractions
    assert all(type(x) is float for x in stats.values())
    for key, want in expected.items():
        assert stats[key] == pytest.approx(want, rel=1e-9, abs=1e-12), key


@pytest.mark.parametrize("path", sorted(PATHS))
def test_stats_follow_training_of_a_real_model(path: str) -> None:
    """AdamP "auto" on conv+BN: views as decided, angles and norms as measured from parameter snapshots."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 36, 4))
    opt = AdamP(model.named_parameters(), lr=0.01, weight_decay=0.01, track_stats=True, **PATHS[path])
    keys = None
    for _ in range(4):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.zero_grad()
        model(torch.randn(8, 3, 8, 8)).logsumexp(dim=1).mean().backward()
        opt.step()
        stats = opt.stats()
        keys = keys or list(stats)
        assert list(stats) == keys
        for n, p in model.named_parameters():
            assert stats[f"{n}/weight_norm"] == pytest.approx(p.detach().double().norm().item(), rel=1e-6)
            if before[n].any():
                assert stats[f"{n}/angular_update"] == pytest.approx(_angle(before[n], p.detach()), rel=1e-3, abs=1e-6)
            else:  # zero-initialised BatchNorm bias: no angle at the first step
                assert math.isnan(stats[f"{n}/angular_update"])
            norm0 = before[n].double().norm().item()
            assert stats[f"{n}/lr_over_norm_sq"] == (pytest.approx(0.01 / norm0**2) if norm0 else math.inf)
        assert stats["0.weight/view"] == 1.0  # the head's view varies: the cosine test is noisy there
        assert stats["projected_fraction"] == (1 + (stats["3.weight/view"] > 0)) / 2


def test_keys_without_names_and_params_without_gradients() -> None:
    a, b, c = (nn.Parameter(torch.randn(3, 3)) for _ in range(3))
    opt = AdamP([{"params": [a]}, {"params": [b, c], "track_stats": False}], track_stats=True)
    a.grad, b.grad = torch.randn(3, 3), torch.randn(3, 3)
    assert opt.stats() == {}
    opt.step()
    assert sorted(opt.stats()) == sorted(
        [f"group0.param0/{m}" for m in METRICS] + ["projected_fraction", "projected_numel_fraction"]
    )
    a.grad = None  # no gradient at the last step: not reported
    opt.step()
    assert opt.stats() == {}


def test_stats_stay_out_of_the_state_dict() -> None:
    def run(track: bool) -> dict[str, Any]:
        torch.manual_seed(0)
        model = nn.Linear(4, 3)
        opt = AdamP(model.parameters(), weight_decay=0.1, track_stats=track)
        for _ in range(2):
            opt.zero_grad()
            model(torch.randn(5, 4)).square().sum().backward()
            opt.step()
        return opt.state_dict()

    on, off = run(True), run(False)
    assert on["state"].keys() == off["state"].keys()
    for k in on["state"]:
        assert on["state"][k].keys() == {"step", "exp_avg", "exp_avg_sq"}
        for name, t in on["state"][k].items():
            assert torch.equal(t, off["state"][k][name])


def test_lr_is_the_one_of_the_step_and_may_be_a_tensor() -> None:
    w = nn.Parameter(torch.randn(4, 4))
    opt = SGDP([w], lr=torch.tensor(0.1), momentum=0.9, track_stats=True)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    w0 = w.detach().clone()
    w.grad = torch.randn(4, 4)
    opt.step()
    sched.step()  # changes lr after the step: stats still describe the step
    assert opt.stats()["group0.param0/lr_over_norm_sq"] == pytest.approx(0.1 / w0.norm().item() ** 2)


def test_zero_weight_and_half_precision() -> None:
    z = nn.Parameter(torch.zeros(3, 3))
    h = nn.Parameter(torch.randn(8, 8).bfloat16())
    h0 = h.detach().clone()
    opt = AdamP([z, h], lr=0.01, track_stats=True)
    z.grad, h.grad = torch.randn(3, 3), torch.randn(8, 8).bfloat16()
    opt.step()
    s = opt.stats()
    assert math.isnan(s["group0.param0/angular_update"]) and s["group0.param0/lr_over_norm_sq"] == math.inf
    assert s["group0.param1/weight_norm"] == pytest.approx(h.detach().float().norm().item(), rel=1e-6)
    assert s["group0.param1/angular_update"] == pytest.approx(_angle(h0, h.detach()), rel=1e-3)


def test_tracking_can_be_turned_on_and_off_per_step() -> None:
    w = nn.Parameter(torch.randn(3, 3))
    opt = AdamP([w])
    w.grad = torch.randn(3, 3)
    opt.step()
    assert opt.stats() == {}
    opt.param_groups[0]["track_stats"] = True
    opt.step()
    assert opt.stats()
    opt.param_groups[0]["track_stats"] = False
    opt.step()
    assert opt.stats() == {}


# -- no extra work when off ------------------------------------------------------------------


class CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = str(func)
        if not name.startswith("profiler."):  # Optimizer.step's record_function markers
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def _functional_step(opt: torch.optim.Optimizer) -> None:
    """What ``opt.step()`` computes, called as the plain functional ``adamp()`` / ``sgdp()``."""
    for g in opt.param_groups:
        params = [p for p in g["params"] if p.grad is not None]
        grads = [p.grad for p in params]
        st = [opt.state[p] for p in params]
        common = dict(foreach=g["foreach"], fused=g["fused"], lr=g["lr"], weight_decay=g["weight_decay"], eps=g["eps"])
        common |= dict(delta=g["delta"], wd_ratio=g["wd_ratio"], nesterov=g["nesterov"], maximize=g["maximize"])
        common |= dict(scale_invariant=g["scale_invariant"])
        if isinstance(opt, AdamP):
            exp_avg, exp_avg_sq, step = ([s[k] for s in st] for k in ("exp_avg", "exp_avg_sq", "step"))
            beta1, beta2 = g["betas"]
            torch_adamp.adamp(
                params, grads, exp_avg, exp_avg_sq, step, capturable=g["capturable"], beta1=beta1, beta2=beta2, **common
            )
        else:
            torch_adamp.sgdp(
                params,
                grads,
                [s["momentum"] for s in st],
                momentum=g["momentum"],
                dampening=g["dampening"],
                project_momentum=g["project_momentum"],
                **common,
            )


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("cls", [AdamP, SGDP])
def test_step_without_stats_issues_exactly_the_ops_of_the_functional_call(cls: type, path: str) -> None:
    counts = {}
    for how in ("step", "functional", "tracked"):
        torch.manual_seed(0)
        params = [nn.Parameter(torch.randn(s)) for s in ((8, 3, 3, 3), (10, 5), (7,))]
        opt = cls(params, lr=0.1, weight_decay=0.01, track_stats=how == "tracked", **PATHS[path])
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()  # creates the state
        with torch.no_grad(), CountOps() as c:
            _functional_step(opt) if how == "functional" else opt.step()
        counts[how] = c.ops
    assert counts["step"] == counts["functional"]
    extra = counts["tracked"] - counts["step"]
    assert extra and counts["step"] - counts["tracked"] == Counter()
    assert "aten._local_scalar_dense.default" not in extra  # no host sync during the step: only in stats()


# -- the example: TensorBoard (optional) and CSV -------------------------------------------------


def _log_stats_example() -> Any:
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "log_stats.py"
    spec = importlib.util.spec_from_file_location("log_stats_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = ["--steps", "3", "--log-every", "1", "--width", "4", "--samples", "32"]


def test_log_stats_example_writes_csv(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import csv
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    out = tmp_path / "stats.csv"
    stats = _log_stats_example().main([*TINY, "--csv", str(out), "--logdir", str(tmp_path / "runs")])
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert list(rows[0]) == ["step", "loss", *list(stats)[1:]]
    assert rows[-1]["0.weight/view"] == "1.0" and float(rows[-1]["projected_fraction"]) == pytest.approx(2 / 3)
    assert not (tmp_path / "runs").exists()


def test_log_stats_example_writes_tensorboard_events(tmp_path: Any) -> None:
    pytest.importorskip("tensorboard")
    _log_stats_example().main([*TINY, "--logdir", str(tmp_path / "runs"), "--projection", "off"])
    events = list((tmp_path / "runs").rglob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)


def test_stats_are_updated_by_a_compiled_step() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8, bias=False), nn.LayerNorm(8), nn.Linear(8, 2))
    opt = AdamP(model.named_parameters(), track_stats=True)
    step = torch.compile(opt.step, fullgraph=True, backend="eager")
    x = torch.randn(16, 4)
    for _ in range(3):
        model(x).pow(2).mean().backward()
        before = model[0].weight.detach().clone()
        step()
        opt.zero_grad()
        stats = opt.stats()
        assert stats["0.weight/weight_norm"] == pytest.approx(model[0].weight.norm().item(), rel=1e-6)
        assert stats["0.weight/lr_over_norm_sq"] == pytest.approx(1e-3 / before.norm().item() ** 2, rel=1e-5)
