"""Every script in examples/ runs, at tiny size (the integrations skip cleanly when their package is missing)."""

from __future__ import annotations

import importlib.util
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import helpers
import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name: str) -> ModuleType:
    return helpers.example(name)


def required_here() -> set[str]:
    """Modules that must import in this run (``$TORCH_ADAMP_REQUIRE``, comma-separated: CI names those its
    setup installed, so that a broken install fails instead of skipping)."""
    return {m.strip() for m in os.environ.get("TORCH_ADAMP_REQUIRE", "").split(",") if m.strip()}


def require(module: str) -> None:
    """Skip when ``module`` is missing *or fails to import* (e.g. timm with a torchvision built for another torch),
    unless ``$TORCH_ADAMP_REQUIRE`` names it: then the import error fails the test."""
    if module in required_here():
        importlib.import_module(module)
        return
    try:
        importlib.import_module(module)
    except Exception as e:  # ImportError, or RuntimeError from a mismatched compiled extension
        pytest.skip(f"{module} is not usable here: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")


def finite(values: list[float]) -> bool:
    return bool(values) and all(math.isfinite(v) for v in values)


@pytest.fixture(autouse=True)
def _restore_threads() -> object:
    """The examples set torch's thread count (--threads, default 1); give the next test the one it had."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


NAMES = [
    "amp_gradscaler",
    "compile_step",
    "custom_rule",
    "hf_trainer",
    "lightning_cli",
    "lightning_module",
    "plain_loop_scheduler",
    "projected_optimizer",
    "timm_model",
    "torchtitan_llama",
]


@pytest.mark.parametrize("name", NAMES)
def test_example_is_a_script_with_main(name: str) -> None:
    # the tests below call main(argv); `python examples/<name>.py` calls main()
    text = (EXAMPLES / f"{name}.py").read_text()
    assert "def main(argv: list[str] | None = None)" in text
    assert 'if __name__ == "__main__":\n    main()' in text


def test_custom_rule_runs_on_every_path(capsys: pytest.CaptureFixture[str]) -> None:
    """The worked example of the extension point: a third projected optimizer, defined outside the package,
    steps on the default, foreach, per-tensor, fused-request and compiled paths and through GradScaler, with
    the same numbers (the script asserts it) and the convs before BatchNorm projected."""
    load("custom_rule").main(["--steps", "6"])
    out = capsys.readouterr().out
    for path in ("default", "foreach", "fused", "compiled", "grad-scaler"):
        assert re.search(rf"{path}: largest relative difference", out), out
    assert "RMSpropP ran on every path" in out


def test_custom_rule_uses_only_the_public_api() -> None:
    """The example imports nothing private of torch_adamp: the package, ``torch_adamp.rule``, ``checks``."""
    import ast

    tree = ast.parse((EXAMPLES / "custom_rule.py").read_text())
    modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    ours = {m for m in modules if m.startswith("torch_adamp")}
    assert ours <= {"torch_adamp", "torch_adamp.rule", "torch_adamp.checks"}, ours


def test_projected_optimizer_keeps_the_norm() -> None:
    require("torch_adamp_reproduce")  # its model and data: the package in reproduce/ (scripts/setup.sh installs it)
    plain, projected = load("projected_optimizer").main(["--steps", "60"])
    assert projected < plain


@pytest.mark.parametrize("optimizer", ["adamp", "sgdp"])
def test_plain_loop_scheduler(optimizer: str) -> None:
    ex = load("plain_loop_scheduler")
    out = ex.main(["--optimizer", optimizer, "--steps", "4", "--batch-size", "8", "--image-size", "8", "--width", "4",
                   "--log-every", "2"])  # fmt: skip
    assert finite(out["losses"]) and len(out["losses"]) == 4
    stats = out["stats"]
    # the conv weights (followed by BatchNorm) are found scale-invariant and projected per channel; the classifier not
    assert stats["conv1.weight/view"] == 1 and stats["conv2.weight/view"] == 1
    assert stats["fc.weight/view"] == 0
    assert 0 < stats["projected_fraction"] < 1
    by_name = {n: g for g in out["groups"] for n in g["param_names"]}
    assert by_name["bn1.weight"]["weight_decay"] == 0 and by_name["fc.bias"]["weight_decay"] == 0


@pytest.mark.parametrize(
    ("mode", "fp32_state", "param_dtype", "state_dtype"),
    [
        ("amp", "1", torch.float32, torch.float32),
        ("bf16-params", "1", torch.bfloat16, torch.float32),
        ("bf16-params", "0", torch.bfloat16, torch.bfloat16),
    ],
)
def test_amp_gradscaler(mode: str, fp32_state: str, param_dtype: torch.dtype, state_dtype: torch.dtype) -> None:
    ex = load("amp_gradscaler")
    out = ex.main(["--mode", mode, "--fp32-state", fp32_state, "--device", "cpu", "--steps", "3", "--batch-size", "4",
                   "--image-size", "8"])  # fmt: skip
    assert finite(out["losses"])
    assert out["param_dtype"] == param_dtype and out["state_dtype"] == state_dtype


def test_amp_gradscaler_learns() -> None:
    # the task is learnable: the loss falls well below chance level's 2.30 and held-out accuracy rises
    ex = load("amp_gradscaler")
    out = ex.main(["--mode", "amp", "--device", "cpu", "--steps", "40", "--image-size", "8"])
    assert out["losses"][0] > 2.0 and sum(out["losses"][-5:]) / 5 < 1.8, out["losses"]
    assert out["accuracy"] > 0.35 and out["skipped"] == 0


def test_compile_step_fullgraph() -> None:
    # backend="eager": dynamo captures the whole step (fullgraph=True raises on any graph break)
    # without the minutes inductor needs on a small CPU
    ex = load("compile_step")
    out = ex.main(["--backend", "eager", "--device", "cpu", "--steps", "3", "--batch-size", "4", "--image-size", "8"])
    assert math.isfinite(out["loss"])
    assert out["max_diff"] < 1e-5


def test_compile_step_fused_cpu() -> None:
    try:  # only where the CPU kernel builds: elsewhere fused=True compiles with inductor (minutes on a small CPU)
        from torch_adamp import _native

        if _native.load() is None:
            pytest.skip("the fused CPU kernel does not build here (no C compiler?)")
    except (ImportError, AttributeError) as e:
        pytest.skip(f"no fused CPU kernel in this version: {e}")
    ex = load("compile_step")
    out = ex.main(["--fused", "--device", "cpu", "--steps", "3", "--batch-size", "4", "--image-size", "8"])
    assert math.isfinite(out["loss"])
    assert out["max_diff"] < 1e-5


def test_timm_model_help_without_timm() -> None:
    # --help is parsed before timm is imported; without timm (or torchvision) the script says so in one line
    script = str(EXAMPLES / "timm_model.py")
    p = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.startswith("usage: timm_model.py"), p.stderr
    assert "tadamp" in p.stdout


def test_timm_model_without_timm_says_what_to_install() -> None:
    """Where timm does not import (no torchvision, or one built for another torch), the example exits with one
    message naming the command for this torch, not a traceback."""
    try:
        importlib.import_module("timm")
    except Exception:
        pass
    else:
        pytest.skip("timm imports here: the example runs (test_timm_model)")
    script = str(EXAMPLES / "timm_model.py")
    p = subprocess.run([sys.executable, script, "--steps", "1"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    series = f"0.{int(torch.__version__.split('.')[1]) + 15}.*"
    assert "scripts/setup.sh timm" in p.stderr and f"torchvision=={series}" in p.stderr, p.stderr


def test_timm_model() -> None:
    require("timm")
    ex = load("timm_model")
    out = ex.main(["--model", "resnet18", "--device", "cpu", "--steps", "2", "--batch-size", "2", "--image-size", "32"])
    assert finite(out["losses"])
    assert out["stats"]["projected_fraction"] > 0  # resnet convs are followed by BatchNorm


@pytest.mark.parametrize("groups", ["param_groups", "trainer"])
def test_hf_trainer(groups: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``Trainer(optimizer_cls_and_kwargs=(AdamP, kwargs))``: the Trainer builds our AdamP, with the groups of
    ``param_groups`` passed as ``"params"`` or with its own decay / no-decay groups."""
    require("transformers")
    require("accelerate")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ex = load("hf_trainer")
    out = ex.main(["--steps", "2", "--batch-size", "2", "--hidden", "16", "--layers", "1", "--seq-len", "8",
                   "--vocab", "32", "--output-dir", str(tmp_path),
                   *(["--trainer-groups"] if groups == "trainer" else [])])  # fmt: skip
    assert math.isfinite(out["training_loss"])
    assert "projected_fraction" in out["stats"]
    # two groups, decay 0.01 on the weights and none on the 1-D parameters, from either grouping
    assert sorted(g["weight_decay"] for g in out["groups"]) == [0.0, 0.01], out["groups"]
    assert all(g["params"] > 0 for g in out["groups"])


@pytest.mark.filterwarnings("ignore:.*LeafSpec.*")  # lightning's own use of a deprecated torch API
def test_lightning_module() -> None:
    require("lightning")
    ex = load("lightning_module")
    out = ex.main(["--steps", "2", "--batch-size", "4", "--image-size", "8", "--accelerator", "cpu"])
    assert math.isfinite(out["train_loss"])
    assert 0 < out["projected_fraction"] < 1


LIGHTNING_CLI_TINY = ["--trainer.max_steps", "3", "--data.n", "64", "--data.batch_size", "16", "--data.image_size", "8"]


@pytest.mark.filterwarnings("ignore:.*LeafSpec.*")
@pytest.mark.parametrize(
    ("argv", "class_name"),
    [
        ([], "torch_adamp.optimizers.adamp.AdamP"),  # the script's default: AdamP with statistics
        (["--optimizer", "torch_adamp.AdamP", "--optimizer.lr", "1e-3", "--optimizer.weight_decay", "0.05",
          "--optimizer.track_stats", "true"], "torch_adamp.optimizers.adamp.AdamP"),
        (["--optimizer", "torch_adamp.integrations.lightning.SGDP", "--optimizer.lr", "0.1",
          "--optimizer.momentum", "0.9", "--optimizer.nesterov", "true", "--optimizer.track_stats", "true"],
         "torch_adamp.integrations.lightning.SGDP"),
    ],
)  # fmt: skip
def test_lightning_cli(argv: list[str], class_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """LightningCLI builds our optimizers from ``--optimizer CLASS --optimizer.ARG VALUE`` (the README's route)."""
    require("lightning")
    require("jsonargparse")
    import torch_adamp

    monkeypatch.chdir(tmp_path)  # Lightning's default root folder
    out = load("lightning_cli").main(["fit", *LIGHTNING_CLI_TINY, *argv])
    opt = out["optimizer"]
    assert f"{type(opt).__module__}.{type(opt).__name__}" == class_name
    assert isinstance(opt, (torch_adamp.AdamP, torch_adamp.SGDP))
    if "--optimizer.lr" in argv:  # no scheduler: the group's lr is the one given
        assert opt.param_groups[0]["lr"] == float(argv[argv.index("--optimizer.lr") + 1])
    assert math.isfinite(out["metrics"]["train_loss"])
    assert out["metrics"]["projected_fraction"] > 0  # the convs before BatchNorm


def test_torchtitan_llama() -> None:
    """torchtitan's debug Llama 3 trained by our AdamP through torchtitan's optimizer and scheduler containers on
    the CPU, and its flat checkpoint state loaded into a fresh container, which takes the same next step."""
    require("torchtitan")
    require("torchtitan.models.llama3")  # imports triton
    from torch_adamp import AdamP
    from torch_adamp.integrations.torchtitan import OptimizersContainer

    out = load("torchtitan_llama").main(["--steps", "6", "--batch-size", "2", "--seq-len", "16"])
    assert type(out["optimizers"]) is OptimizersContainer and type(out["optimizers"].optimizers[0]) is AdamP
    assert finite(out["losses"]) and out["losses"][-1] < out["losses"][0]
    assert out["resumed_identically"]


def test_docs_quickstart_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """The "Five minutes" code of docs/index.md runs as written and prints its diagnostics."""
    text = (EXAMPLES.parent / "docs" / "index.md").read_text()
    code = re.search(r"## Five minutes\n\n```python\n(.*?)```", text, re.S)
    assert code is not None
    exec(compile(code.group(1), "docs/index.md", "exec"), {})
    out = capsys.readouterr().out
    assert "step 100:" in out and "conv: view 1" in out


def test_readme_quickstart_runs_and_prints_the_loss(capsys: pytest.CaptureFixture[str]) -> None:
    """The README's Quickstart runs as written and prints a finite loss per step."""
    text = (EXAMPLES.parent / "README.md").read_text()
    code = re.search(r"## Quickstart\n\n```python\n(.*?)```", text, re.S)
    assert code is not None
    exec(compile(code.group(1), "README.md", "exec"), {})
    losses = [float(v) for v in re.findall(r"step \d: loss ([-0-9.einf]+)", capsys.readouterr().out)]
    assert len(losses) == 3 and finite(losses)


def test_no_page_installs_the_package_from_an_index() -> None:
    """The package is on no index yet: no page, example or message says ``pip install torch-adamp[...]`` (the
    clone's ``pip install -e .`` / ``scripts/setup.sh`` are the routes). The changelog keeps its history."""
    root = EXAMPLES.parent
    pattern = re.compile(r"pip install\s+(?:-\S+\s+)*[\"']?torch[-_]adamp(?:-reproduce)?(?:\[|[\"'\s`]|$)", re.M)
    files = [root / "README.md", root / "reproduce" / "README.md", *sorted((root / "docs").rglob("*.md"))]
    files += [*sorted(EXAMPLES.glob("*.py")), *sorted((root / "src").rglob("*.py"))]
    files += [*sorted((root / "reproduce" / "src").rglob("*.py")), *sorted((root / "tests").glob("*.py"))]
    files += [*sorted((root / "scripts").glob("*.sh")), root / ".ci" / "run"]
    found = [
        f"{path.relative_to(root)}: {m.group(0)!r}"
        for path in files
        if path.name != "test_examples.py" and path.name != "changelog.md"
        for m in pattern.finditer(path.read_text())
    ]
    assert not found, found
