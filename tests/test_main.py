"""``python -m torch_adamp``: versions, the native kernels' status, find_scale_invariant on a model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import torch_adamp
from torch_adamp import _native
from torch_adamp.__main__ import MODELS, main


def run(argv: list[str]) -> list[str]:
    lines: list[str] = []
    assert main(argv, out=lines.append) == 0
    return "\n".join(lines).splitlines()


def views(lines: list[str]) -> dict[str, str]:
    """``{parameter: view}`` from the table that follows the ``find_scale_invariant(...)`` line."""
    start = next(i for i, line in enumerate(lines) if line.startswith("find_scale_invariant("))
    return {line.split()[0]: line.split()[1] for line in lines[start + 1 : -1]}


def test_versions_and_native_status() -> None:
    lines = run([])
    assert lines[0].startswith(f"torch-adamp {torch_adamp.__version__} (")
    assert lines[1] == f"torch {torch.__version__}"
    lib = _native.load()
    if lib is None:
        assert lines[2].startswith("native CPU kernels: unavailable") and str(_native.failure) in lines[2]
    else:
        assert lines[2].startswith("native CPU kernels: ") and lines[2].endswith(str(_native.library_path))
        assert ("loaded from the cache" in lines[2]) == (not _native.build_seconds)
    assert not any("find_scale_invariant" in line for line in lines)


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("convnet", {"0.weight": "channel", "3.weight": "channel", "8.weight": "none", "1.weight": "none"}),
        ("mlp-layernorm", {"0.weight": "layer", "3.weight": "none"}),
        ("mlp", {"0.weight": "none", "2.weight": "none"}),
    ],
)
def test_builtin_models(model: str, expected: dict[str, str]) -> None:
    lines = run(["--model", model])
    found = views(lines)
    assert {n: found[n] for n in expected} == expected
    assert set(found) == {n for n, _ in MODELS[model][0]().named_parameters()}
    counts = lines[-1].strip()
    assert counts == ", ".join(f"{list(found.values()).count(v)} {v}" for v in ("channel", "layer", "none"))


def test_a_model_from_a_dotted_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_models_for_main.py").write_text(
        "import torch.nn as nn\n"
        "class Zoo:\n"
        "    @staticmethod\n"
        "    def net():\n"
        "        return nn.Sequential(nn.Linear(5, 7, bias=False), nn.BatchNorm1d(7), nn.Linear(7, 2))\n"
        "def not_a_module():\n"
        "    return 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    lines = run(["--model", "my_models_for_main:Zoo.net", "--input-shape", "6,5"])
    assert "find_scale_invariant(my_models_for_main:Zoo.net, input 6x5):" in lines
    assert views(lines)["0.weight"] == "channel" and views(lines)["2.weight"] == "none"
    with pytest.raises(SystemExit) as e:
        main(["--model", "my_models_for_main:not_a_module", "--input-shape", "6,5"])
    assert e.value.code == 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "nosuch"], "unknown model 'nosuch'"),
        (["--model", "no_such_module_here:f", "--input-shape", "2"], "ModuleNotFoundError"),
        (["--model", "torch.nn:Identity"], "give --input-shape"),
        (["--model", "mlp", "--input-shape", "2,3"], "input of shape (2, 3)"),
        (["--model", "mlp", "--input-shape", "0,16"], "expected positive sizes"),
    ],
)
def test_bad_options_exit_2_with_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    printed: list[str] = []
    with pytest.raises(SystemExit) as e:
        main(argv, out=printed.append)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("python -m torch_adamp: error:") and "\n" not in err and message in err
    if "shape (2, 3)" not in message:
        assert printed == []  # a bad --model is reported before any output


def test_python_dash_m() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "torch_adamp", "--model", "mlp-layernorm"], capture_output=True, text=True, check=True
    )
    assert proc.stdout.startswith("torch-adamp ") and "0 channel, 1 layer, 4 none" in proc.stdout
