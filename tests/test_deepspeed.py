"""DeepSpeed ZeRO stages 1, 2 and 3: AdamP/SGDP exact on the flat partitions (torch_adamp.zero).

The multi-process scenarios live in ``_ds_workers.py``; they run once per
module in 2 spawned ranks (gloo, CPU, ``DS_ACCELERATOR=cpu``), and each test
below checks one of them. Skipped when deepspeed is not installed (the
``deepspeed`` extra; CI installs it).
"""

from __future__ import annotations

import copy
import importlib.util
import math
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import torch_adamp
from torch_adamp import SGDP, AdamP

# deepspeed is imported only in the spawned ranks and the example (importing it here would load its
# accelerator machinery into the test process)
if importlib.util.find_spec("deepspeed") is None:
    pytest.skip("needs deepspeed (in the clone: DS_BUILD_OPS=0 pip install -e '.[deepspeed]')", allow_module_level=True)
pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="needs torch.distributed with gloo",
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _ds_workers  # noqa: E402
from helpers import one_rank_zero_partition  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results() -> Iterator[dict[str, list[dict[str, Any]]]]:
    yield _ds_workers.launch(_ds_workers.ALL, timeout=300)


def scenario(results: dict[str, list[dict[str, Any]]], name: str) -> list[dict[str, Any]]:
    for rank, r in enumerate(results[name]):
        if "error" in r:
            pytest.fail(f"scenario {name} failed on rank {rank}:\n{r['error']}")
    return results[name]


@pytest.mark.parametrize("name", _ds_workers.VERSUS_REFERENCE)
def test_matches_the_unsharded_optimizer(results: dict[str, list[dict[str, Any]]], name: str) -> None:
    r0, r1 = scenario(results, name)
    assert len(r0["views"]) == _ds_workers.STEPS
    # every step: the decisions of both ranks equal those of the same optimizer on the whole model
    assert r0["views"] == r1["views"] == r0["ref_views"], (r0["views"], r0["ref_views"])
    assert {v for step in r0["views"] for v in step} == {0, 1, 2}  # no view, channel view, layer view all occur
    worst = max(r0["rel"].values())
    assert worst < 1e-5, r0["rel"]
    # exactly one collective issued by the optimizer per step (DeepSpeed steps each group separately: the
    # group of 1-D parameters needs none)
    for r in (r0, r1):
        assert r["collectives"] == [["all_reduce"]] * _ds_workers.STEPS
    # the partition boundary cuts a weight's row on each rank (stage 3 cuts every weight)
    assert r0["split_rows"] >= 1 and r1["split_rows"] >= 1


def test_without_the_collective_it_drifts(results: dict[str, list[dict[str, Any]]]) -> None:
    """Negative control: local sums only (what a naive port would do) give wrong decisions and parameters."""
    r0, r1 = scenario(results, "zero2_adamp_no_collective")
    assert r0["collectives"] == [[]] * _ds_workers.STEPS
    assert r0["views"] != r0["ref_views"] or r1["views"] != r0["ref_views"]
    assert max(r0["rel"].values()) > 1e-4


@pytest.mark.parametrize("name", ["zero2_adamp_checkpoint", "zero3_sgdp_checkpoint", "zero1_adamp_bf16_checkpoint"])
def test_checkpoint_resume_is_bitwise(results: dict[str, list[dict[str, Any]]], name: str) -> None:
    for r in scenario(results, name):
        assert all(r["equal"].values()), r["equal"]
        assert r["collectives"] == [["all_reduce"]] * 5
        assert all(step and any(v > 0 for v in step) for step in r["views"])


@pytest.mark.parametrize("name", ["zero2_adamp_bf16", "zero3_sgdp_bf16"])
def test_bf16_steps_the_fp32_master_exactly(results: dict[str, list[dict[str, Any]]], name: str) -> None:
    """bf16: each step of DeepSpeed's fp32 masters equals the optimizer on whole tensors fed the same gradient."""
    for r in scenario(results, name):
        assert r["worst_step_rel"] < 1e-6
        assert r["views"] == r["ref_views"]
        assert r["collectives"] == [["all_reduce"]] * _ds_workers.STEPS


def test_unknown_layout_is_refused(results: dict[str, list[dict[str, Any]]]) -> None:
    for r in scenario(results, "zero2_refusal"):
        msg = r["raised"]
        assert msg is not None, "a ZeRO partition without its layout was stepped silently"
        assert "parameter #0 (shape (996,))" in msg and "flat 1-D tensor" in msg and "scale_invariant=False" in msg


def test_opt_out_is_plain_adamw(results: dict[str, list[dict[str, Any]]]) -> None:
    for r in scenario(results, "zero2_opt_out"):
        assert r["collectives"] == [[]] * 3
        assert r["rel"] < 1e-5


def test_example_runs() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src"), "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    cmd += [str(ROOT / "examples" / "deepspeed_zero.py"), "--steps", "3", "--stage", "2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    if proc.returncode != 0 and "terminate called without an active exception" in proc.stderr:
        # a rank aborted by std::terminate in the C++ runtime (seen once in ~20 runs, on a loaded 2-core machine,
        # nothing of the example's in the output): run it again once; any other failure, or a second, fails
        cmd[cmd.index("--master_port") + 1] = str(_free_port())
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "conv.weight: channel" in proc.stdout and "fc.weight: layer" in proc.stdout, proc.stdout


# ----------------------------------------------------------------------------------------
# single process: the refusal, without DeepSpeed's machinery
# ----------------------------------------------------------------------------------------


def _substituted(cls: type[torch.optim.Optimizer], **kw: Any) -> tuple[torch.optim.Optimizer, torch.Tensor]:
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    opt = cls(model.parameters(), lr=0.1, **kw)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).requires_grad_()
    flat.grad = torch.randn_like(flat)
    opt.param_groups[0]["params"] = [flat]  # what a flattening wrapper does
    return opt, flat


@pytest.mark.parametrize("cls", [AdamP, SGDP])
def test_a_flat_partition_without_layout_is_refused(cls: type[torch.optim.Optimizer]) -> None:
    opt, flat = _substituted(cls)
    before = flat.detach().clone()
    with pytest.raises(torch_adamp.distributed.FlatParameterError, match=r"parameter #0 \(shape \(21,\)\)"):
        opt.step()
    assert torch.equal(flat.detach(), before) and not opt.state  # nothing changed


@pytest.mark.parametrize("cls", [AdamP, SGDP])
def test_a_flat_partition_is_accepted_without_projection(cls: type[torch.optim.Optimizer]) -> None:
    opt, flat = _substituted(cls, scale_invariant=False)
    before = flat.detach().clone()
    opt.step()
    assert not torch.equal(flat.detach(), before)


def test_a_group_of_1d_parameters_needs_no_layout() -> None:
    """Nothing could be projected in a group of biases: a flat buffer of them is stepped elementwise."""
    model = nn.LayerNorm(5)
    opt = AdamP(model.parameters(), lr=0.1)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).requires_grad_()
    flat.grad = torch.randn_like(flat)
    opt.param_groups[0]["params"] = [flat]
    opt.step()


OPTIONS = [
    (AdamP, {"lr": 1e-2, "weight_decay": 1e-2}),
    (AdamP, {"lr": 1e-2, "weight_decay": 1e-2, "scale_invariant": "layer", "wd_ratio": 0.5, "maximize": True}),
    (AdamP, {"lr": 1e-2, "scale_invariant": "channel", "delta": 0.2, "capturable": True}),
    (SGDP, {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3}),
    (SGDP, {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3}),
    (SGDP, {"lr": 0.1, "momentum": 0.9, "project_momentum": False, "dampening": 0.1, "weight_decay": 1e-3}),
    # corrected_weight_decay (k = lr / lr_max = 0.25): the projected weights' decay, and every weight's
    (AdamP, {"lr": 1e-2, "weight_decay": 0.5, "corrected_weight_decay": True, "lr_max": 0.04}),
    (SGDP, {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-2, "corrected_weight_decay": "all", "lr_max": 0.4}),
]


@pytest.mark.parametrize(("cls", "kw"), OPTIONS)
def test_options_on_a_one_rank_partition(
    cls: type[torch.optim.Optimizer], kw: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every option through the ZeRO path, on one rank holding the whole partition (the sum is the identity)."""
    from torch_adamp import zero

    monkeypatch.setattr(zero, "_all_reduce", lambda t, group: None)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.Flatten(), nn.Linear(5 * 4, 7), nn.LayerNorm(7))
    ref_model = copy.deepcopy(model)
    opt = cls(model.parameters(), **kw)
    ref = cls(ref_model.parameters(), **kw, foreach=True, track_stats=True)
    params = list(model.parameters())
    flat = one_rank_zero_partition(params)
    opt.param_groups[0]["params"] = [flat]
    seen: set[str] = set()
    for _ in range(4):
        grads = [torch.randn_like(p) for p in params]
        for i, (p, g) in enumerate(zip(ref_model.parameters(), grads, strict=True)):
            w = p.detach().reshape(p.shape[0], -1) if i == 0 else p.detach().reshape(1, -1)
            if i in (0, 4):  # conv: orthogonal to every row (channel view); linear: to the whole weight (layer)
                g2 = g.reshape(w.shape)
                g = (g2 - (g2 * w).sum(1, keepdim=True) / w.square().sum(1, keepdim=True) * w).reshape(p.shape)
            p.grad = g
        flat.grad = torch.cat([p.grad.reshape(-1) for p in ref_model.parameters()])
        ref.step()
        opt.step()
        stats = ref.stats()
        want = {f"param{i}": stats[f"group0.param{i}/view"] for i in (0, 4)}
        got = zero.last_views(opt)
        assert {k: torch_adamp.projection.VIEW_NAMES[int(v)] for k, v in want.items()} == got
        seen.update(got.values())
    assert seen & {"channel", "layer"}, seen  # the projection fired
    got_params = torch.cat([p.detach().reshape(-1) for p in ref_model.parameters()])
    torch.testing.assert_close(flat.detach(), got_params, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("what", ["caution", "grad_scaler"])
def test_what_a_partition_cannot_take_is_refused_before_any_change(what: str) -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    opt = AdamP(model.parameters(), lr=0.1, **({what: True} if what != "grad_scaler" else {}))
    params = list(model.parameters())
    flat = one_rank_zero_partition(params)
    flat.grad = torch.randn_like(flat)
    opt.param_groups[0]["params"] = [flat]
    if what == "grad_scaler":  # what torch.amp.GradScaler.step sets on an optimizer with the protocol
        opt.grad_scale, opt.found_inf = torch.tensor(2.0**8), torch.tensor(0.0)  # type: ignore[attr-defined]
    before = flat.detach().clone()
    with pytest.raises(NotImplementedError, match="GradScaler" if what == "grad_scaler" else what):
        opt.step()
    assert torch.equal(flat.detach(), before) and not opt.state


@pytest.mark.parametrize(("cls", "kw"), [OPTIONS[0], OPTIONS[1], OPTIONS[3]])
def test_track_stats_on_a_partition_in_the_one_collective(
    cls: type[torch.optim.Optimizer], kw: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hardening round 3, item 5: ``track_stats=True`` on a ZeRO partition (refused before) gives, per weight,
    the view, norms and angle the unsharded optimizer reports, from one more column of row sums in the step's
    one collective (still one per step)."""
    from torch_adamp import zero

    calls: list[int] = []
    monkeypatch.setattr(zero, "_all_reduce", lambda t, group: calls.append(t.numel()))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.Flatten(), nn.Linear(5 * 4, 7), nn.LayerNorm(7))
    ref_model = copy.deepcopy(model)
    opt = cls(model.parameters(), **kw, track_stats=True)
    ref = cls(ref_model.parameters(), **kw, foreach=True, track_stats=True)
    params = list(model.parameters())
    flat = one_rank_zero_partition(params)
    opt.param_groups[0]["params"] = [flat]
    for step in range(3):
        for i, p in enumerate(ref_model.parameters()):
            g = torch.randn_like(p)
            if i in (0, 4):  # conv: orthogonal to every row (channel view); linear: to the whole weight (layer)
                w = p.detach().reshape(p.shape[0], -1) if i == 0 else p.detach().reshape(1, -1)
                g2 = g.reshape(w.shape)
                g = (g2 - (g2 * w).sum(1, keepdim=True) / w.square().sum(1, keepdim=True) * w).reshape(p.shape)
            p.grad = g
        flat.grad = torch.cat([p.grad.reshape(-1) for p in ref_model.parameters()])  # type: ignore[union-attr]
        ref.step()
        opt.step()
        assert len(calls) == step + 1  # one collective per step, the statistics inside it
        got, want = opt.stats(), ref.stats()
        for i in (0, 4):  # the weights (ndim >= 2): the partition's statistics cover them
            assert got[f"param{i}/view"] == want[f"group0.param{i}/view"]
            for key in ("weight_norm", "lr_over_norm_sq"):
                assert math.isclose(got[f"param{i}/{key}"], want[f"group0.param{i}/{key}"], rel_tol=1e-5)
            assert math.isclose(got[f"param{i}/angular_update"], want[f"group0.param{i}/angular_update"], rel_tol=1e-3)
        assert 0 < got["projected_fraction"] <= 1
