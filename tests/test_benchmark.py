"""The step-time benchmark runs and prints its table (no timing assertions: this machine is shared)."""

from __future__ import annotations

import importlib.util
import math
import runpy
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from torch_adamp import projection

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "step_time.py"


def _load() -> Any:
    spec = importlib.util.spec_from_file_location("step_time", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["step_time"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


benchmark = _load()


def test_parameter_sets_have_the_real_shapes() -> None:
    for key, (tensors, numel) in {"resnet50": (161, 25_557_032), "vit_b16": (152, 86_567_656)}.items():
        shapes = benchmark.SETS[key].shapes()
        assert len(shapes) == tensors
        assert sum(math.prod(s) for s in shapes) == numel
    assert benchmark.resnet50_shapes()[0] == (64, 3, 7, 7)
    assert benchmark.resnet50_shapes()[-2:] == [(1000, 2048), (1000,)]
    assert (2304, 768) in benchmark.vit_b16_shapes()  # fused qkv projection
    assert benchmark.small_shapes() == [(64, 64)] * 1000


def test_gradients_produce_the_intended_decisions() -> None:
    params, _ = benchmark.make_tensors(benchmark.SETS["resnet50"], scale=8)
    dec = benchmark.decisions(params)
    convs = sum(1 for p in params if p.dim() == 4)
    assert dec["channel"] == convs  # every conv weight is scale-invariant per channel
    params, _ = benchmark.make_tensors(benchmark.SETS["small"], scale=8)
    dec = benchmark.decisions(params)
    assert dec["channel"] > 0 and dec["layer"] > 0 and dec["none"] > 0
    assert all(projection.projectable(p) for p in params)


def test_bytes_moved_lower_bound() -> None:
    params = [torch.zeros(10, 10), torch.zeros(10)]
    assert benchmark.bytes_moved(params, "adam", projected=False) == 28 * 110
    assert benchmark.bytes_moved(params, "adam", projected=True) == 28 * 110  # staged in the cache
    assert benchmark.bytes_moved(params, "sgd", projected=True) == 20 * 110 + 8 * 100
    big = [torch.zeros(1024, 1024), torch.zeros(1024)]  # above STAGE_BYTES: + the copy of w (speculation)
    n = 1024 * 1024 + 1024
    assert benchmark.bytes_moved(big, "adam", projected=True) == 28 * n + 4 * 1024 * 1024


def test_tiny_run_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--quick", "--sets", "resnet50", "--scale", "32", "--repeats", "2", "--warmup", "1", "--no-targets"]
    assert benchmark.main(args) == 0
    out = capsys.readouterr().out
    for needle in (
        "native kernels:",
        "streaming bandwidth",
        "resnet50: ResNet-50 parameter shapes",
        "torch AdamW(foreach=True)",
        "torch AdamW(fused=True)",
        "torch SGD(momentum=0.9, fused=True)",
        "AdamP(foreach=False)",
        "AdamP(foreach=True)",
        "AdamP(fused=True)",
        "AdamP() default = fused",
        "SGDP(momentum=0.9, fused=True)",
        "lower bound",
        "state MiB",
        "peak temp MiB",
        "targets (median ratios",
    ):
        assert needle in out, needle
    if benchmark._reference() is not None:
        assert "adamp.AdamP 0.3.0 (reference)" in out


def test_paths_and_families_can_be_selected(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--quick", "--sets", "small", "--scale", "32", "--families", "sgd", "--paths", "torch,foreach"]
    assert benchmark.main([*args, "--no-memory", "--no-targets"]) == 0
    out = capsys.readouterr().out
    assert "SGDP(momentum=0.9, foreach=True)" in out
    assert "AdamP(" not in out and "SGDP(momentum=0.9, fused=True)" not in out and "adamp.SGDP" not in out
    with pytest.raises(SystemExit):
        benchmark.main(["--paths", "nonsense"])


def test_script_exit_status_says_whether_the_targets_were_met(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--quick", "--sets", "small", "--scale", "32", "--families", "adam", "--paths", "torch,fused"]
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *args, "--no-memory"])
    module = runpy.run_path(str(SCRIPT), run_name="not_main")
    monkeypatch.setitem(module["main"].__globals__, "TARGETS", (("adam", "fused", "fused", 1e9),))
    assert module["main"]([*args, "--no-memory"]) == 0
    assert "(<= 1000000000.0: met)" in capsys.readouterr().out
    monkeypatch.setitem(module["main"].__globals__, "TARGETS", (("adam", "fused", "fused", 0.0),))
    assert module["main"]([*args, "--no-memory"]) == 1  # a target not met: exit status 1
    assert "NOT met" in capsys.readouterr().out
    assert module["main"]([*args, "--no-memory", "--no-targets"]) == 0
    assert module["main"]([*args, "--no-memory"], check_targets=False) == 0  # torch-adamp bench: no verdict


def test_script_runs_as_main(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--quick", "--sets", "small", "--scale", "32", "--families", "adam", "--paths", "fused"]
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *args, "--no-memory", "--no-targets"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    assert exit_info.value.code == 0
    assert "AdamP(fused=True)" in capsys.readouterr().out
