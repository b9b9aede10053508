"""The ``torch-adamp`` command: help, errors, and every subcommand at a tiny size."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
import torch

import torch_adamp
from torch_adamp_reproduce import cli, compare, fashion_mnist
from torch_adamp_reproduce.progress import progress_bar

TINY_COMPARE = [
    "compare",
    "--epochs=1",
    "--seeds=1",
    "--image-size=8",
    "--train-size=200",
    "--test-size=50",
    "--batch-size=20",
    "--width=4",
]


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """Fresh-machine data sources, and torch's thread count restored afterwards."""
    monkeypatch.delenv(fashion_mnist.ENV_VAR, raising=False)
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "no-debian")
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "error" in lines[0]
    return lines[0]


# -- help --------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [["--help"], ["toy", "--help"], ["compare", "--help"]])
def test_help(argv, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: torch-adamp")
    assert "--quiet" in out or argv == ["--help"]


def test_no_subcommand_prints_help(capsys) -> None:
    assert cli.main([]) == 2
    assert "toy" in capsys.readouterr().out


def test_entry_point_runs_as_a_program() -> None:
    code = "import sys; from torch_adamp_reproduce.cli import main; sys.exit(main())"
    p = subprocess.run([sys.executable, "-c", code, "compare", "--epochs", "0"], capture_output=True, text=True)
    assert p.returncode == 2
    _one_error_line(p.stderr)


def test_library_import_does_not_load_the_cli_dependencies() -> None:
    code = (
        "import sys, torch; before = set(sys.modules); import torch_adamp; "
        "print(sorted(m for m in set(sys.modules) - before if m.split('.')[0] in ('matplotlib', 'tqdm')))"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.stdout.strip() == "[]", p.stdout + p.stderr


# -- errors ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv",
    [
        ["compare", "--epochs", "0"],
        ["compare", "--seeds", "x"],
        ["compare", "--optimizers", "sgd,lamb"],
        ["compare", "--momentum", "1.5"],
        ["compare", "--schedule", "step"],
        ["compare", "--bogus"],
        ["toy", "--momenta", "0.9,2"],
        ["toy", "--steps", "-3"],
        ["frobnicate"],
    ],
)
def test_bad_options_give_one_line_and_exit_2(argv, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    _one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--data-dir", "/nonexistent/fashion-mnist"], "does not exist"),
        (["--image-size", "20"], "full 28x28"),
        (["--train-size", "50000"], "between 1 and 20000"),
    ],
)
def test_data_errors_give_one_line_and_exit_2(extra, message, tmp_path, capsys) -> None:
    assert cli.main([*TINY_COMPARE, "--quiet", "--out", str(tmp_path / "o"), *extra]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert message in line


def test_missing_cli_dependency_is_one_line(monkeypatch, tmp_path, capsys) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # importlib.util.find_spec -> None: "not installed"
    assert cli.main(["toy", "--quiet", "--out", str(tmp_path)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "torch-adamp-reproduce" in line and "pip install matplotlib" in line


# -- subcommands at a tiny size ------------------------------------------------------------
def test_toy_writes_its_files(tmp_path, capsys) -> None:
    out = tmp_path / "toy"
    assert cli.main(["toy", "--steps", "30", "--steps-3d", "20", "--out", str(out), "--threads", "1"]) == 0
    captured = capsys.readouterr()
    assert "GD + momentum + projection" in captured.out and "3D toy" in captured.out
    assert "step" in captured.err  # the progress bar
    for name in ["toy2d_trajectories.png", "toy2d_norms.png", "toy3d_path.png", "toy3d_radius.png"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    data = json.loads((out / "toy_results.json").read_text())
    assert set(data["toy2d"]) == {"0.9", "0.95", "0.99"}
    assert set(data["toy3d"]) == {"momentum", "weight_decay", "projection"}


def test_compare_writes_its_files(tmp_path, capsys) -> None:
    out = tmp_path / "cmp"
    assert cli.main([*TINY_COMPARE, "--out", str(out), "--threads", "1"]) == 0
    captured = capsys.readouterr()
    for label in ["SGD ", "SGDP", "AdamW", "AdamP", "+-"]:
        assert label in captured.out
    assert "shipped" in captured.out
    assert "SGDP seed 0" in captured.err  # the progress bar
    for name in ["accuracy.png", "weight_norm.png", "effective_step.png", "effective_step_ratio.png", "compare.png"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    results = json.loads((out / "results.json").read_text())
    assert results["threads"] == 1 and results["config"]["threads"] == 1
    assert set(results["summary"]) == {"sgd", "sgdp", "adamw", "adamp"}


def test_compare_quiet_threads_and_optimizer_list(tmp_path, capsys) -> None:
    out = tmp_path / "cmp"
    argv = [*TINY_COMPARE, "--out", str(out), "--quiet", "--threads", "2", "--optimizers", "adamw,adamp"]
    argv += ["--train-size", "40"]  # two steps: two threads may be slow on a busy machine
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert torch.get_num_threads() == 2
    results = json.loads((out / "results.json").read_text())
    assert results["threads"] == 2
    assert list(results["summary"]) == ["adamw", "adamp"]


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"torch-adamp {torch_adamp.__version__} (torch {torch.__version__})"


def _interrupt_after(monkeypatch, finished: int) -> list[tuple[str, int]]:
    """Make the compare run raise KeyboardInterrupt (as Ctrl-C does) in the run after ``finished`` runs."""
    calls: list[tuple[str, int]] = []
    real = compare.train_one

    def train_one(name, seed, *args, **kwargs):
        calls.append((name, seed))
        if len(calls) > finished:
            raise KeyboardInterrupt
        return real(name, seed, *args, **kwargs)

    monkeypatch.setattr(compare, "train_one", train_one)
    return calls


def test_interrupted_compare_keeps_the_finished_runs(monkeypatch, tmp_path, capsys) -> None:
    calls = _interrupt_after(monkeypatch, 2)
    out = tmp_path / "cmp"
    assert cli.main([*TINY_COMPARE, "--seeds=2", "--quiet", "--out", str(out)]) == 130
    captured = capsys.readouterr()
    assert len(calls) == 3
    assert "kept the 2 of 8 runs that finished (SGD seed 0, SGDP seed 0)" in captured.out
    assert "interrupted" in captured.err
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] is False and results["runs_planned"] == 8
    assert [(r["optimizer"], r["seed"]) for r in results["runs"]] == [("sgd", 0), ("sgdp", 0)]
    assert list(results["summary"]) == ["sgd", "sgdp"]
    assert results["summary"]["sgdp"]["test_accuracy_mean"] == results["runs"][1]["test_accuracy"]
    assert sorted(p.name for p in out.iterdir()) == ["results.json"]  # no half-written file, no plots


def test_compare_interrupted_before_any_run_writes_nothing(monkeypatch, tmp_path, capsys) -> None:
    _interrupt_after(monkeypatch, 0)
    out = tmp_path / "cmp"
    assert cli.main([*TINY_COMPARE, "--quiet", "--out", str(out)]) == 130
    assert "nothing written" in capsys.readouterr().out
    assert list(out.iterdir()) == []


def test_completed_compare_results_are_marked_complete(tmp_path, capsys) -> None:
    out = tmp_path / "cmp"
    assert cli.main([*TINY_COMPARE, "--quiet", "--optimizers", "sgdp", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] is True and results["runs_planned"] == len(results["runs"]) == 1


def test_plot_titles_count_epochs_and_seeds() -> None:
    from torch_adamp_reproduce import plots

    cfg = {"image_size": 8, "train_size": 200, "epochs": 1}
    assert plots._what({"config": cfg, "runs": [{"seed": 0}]}) == "8x8, 200 images, 1 epoch, 1 seed"
    cfg["epochs"] = 2
    assert plots._what({"config": cfg, "runs": [{"seed": 0}, {"seed": 1}]}) == "8x8, 200 images, 2 epochs, 2 seeds"


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_progress_is_plain_lines_off_a_terminal() -> None:
    stream = _Stream(tty=False)
    with progress_bar(total=6, unit="step", file=stream, interval=0.0) as bar:
        for desc in ["A", "B"]:
            bar.set_description(desc)
            for _ in range(3):
                bar.update(1)
                bar.set_postfix(loss="0.5", refresh=False)
    text = stream.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert lines[0] == "A: 0/6 step (0%), 0 s"
    assert lines[-1] == "B: 6/6 step (100%), 0 s, loss=0.5"
    assert len(lines) == 8  # a line per description and per update (interval 0)


def test_progress_lines_are_rate_limited() -> None:
    stream = _Stream(tty=False)
    with progress_bar(total=10_000, unit="step", file=stream, desc="run") as bar:  # interval 10 s
        for _ in range(9_999):
            bar.update(1)
    assert stream.getvalue().splitlines() == ["run: 9999/10000 step (100%), 0 s"]  # the final state only


def test_progress_is_a_tqdm_bar_on_a_terminal() -> None:
    stream = _Stream(tty=True)
    with progress_bar(total=3, unit="step", file=stream, desc="run") as bar:
        bar.update(3)
    assert type(bar).__module__.startswith("tqdm")
    assert "\r" in stream.getvalue()


def test_compare_progress_in_a_log_file(tmp_path) -> None:
    # stderr redirected to a file, as `torch-adamp compare 2> log` does: lines, no carriage-return frames
    log = tmp_path / "log"
    code = "import sys; from torch_adamp_reproduce.cli import main; sys.exit(main())"
    with log.open("w") as err:
        p = subprocess.run([sys.executable, "-c", code, *TINY_COMPARE, "--out", str(tmp_path / "o")],
                           stdout=subprocess.DEVNULL, stderr=err, timeout=300)  # fmt: skip
    assert p.returncode == 0
    text = log.read_text()
    assert "\r" not in text
    assert "SGD seed 0: 0/40 step (0%)" in text and "AdamP seed 0: " in text
    assert text.splitlines()[-1].startswith("AdamP seed 0: 40/40 step (100%)")


@pytest.mark.parametrize(
    ("names", "module", "package"),
    [("sgd,lion", "lion_pytorch", "lion-pytorch"), ("adamw8bit+p,adamw", "torchao.optim", "torchao")],
)
def test_wrapped_optimizer_without_its_package_is_refused_before_training(names, module, package, monkeypatch, capsys):
    """--optimizers lion / adamw8bit without lion-pytorch / torchao: one line at argument parsing, naming the
    package and the extra that brings it, before anything is trained."""
    monkeypatch.setitem(sys.modules, module, None)  # import raises ModuleNotFoundError
    monkeypatch.setattr(compare, "train_one", lambda *a, **k: pytest.fail("trained before the check"))
    with pytest.raises(SystemExit) as e:
        cli.main([*TINY_COMPARE, "--optimizers", names])
    assert e.value.code == 2
    line = _one_error_line(capsys.readouterr().err)
    assert package in line and "wrapped" in line and "not installed" in line


# -- bench ---------------------------------------------------------------------------------
def test_bench_help_states_each_default_once(capsys) -> None:
    with pytest.raises(SystemExit) as e:  # the benchmark's own argparse exits after --help
        cli.main(["bench", "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps the lines
    assert out.startswith("usage: torch-adamp bench") and "(default: 15; with --quick: 5)" in out
    assert "(default: None)" not in out and "(default 1)" not in out and out.count("(default: 1)") == 1


def test_bench_outside_a_clone_says_where_the_benchmark_is(monkeypatch, capsys, tmp_path) -> None:
    monkeypatch.setattr(cli, "benchmark_script", lambda: tmp_path / "missing.py")
    assert cli.main(["bench", "--repeats", "3"]) == 2
    assert "benchmarks/step_time.py" in _one_error_line(capsys.readouterr().err)


def test_bench_forwards_its_arguments_without_targets(monkeypatch, tmp_path) -> None:
    script = tmp_path / "step_time.py"
    log = tmp_path / "calls.txt"
    script.write_text(
        "def main(argv, prog, check_targets):\n"
        f"    open({str(log)!r}, 'a').write(repr((argv, prog, check_targets)) + chr(10))\n"
        "    return 0\n"
    )
    monkeypatch.setattr(cli, "benchmark_script", lambda: script)
    assert cli.main(["bench", "--help"]) == 0
    assert cli.main(["bench", "--repeats", "3", "--quick"]) == 0
    calls = log.read_text().splitlines()
    assert calls == [
        repr((["--help"], "torch-adamp bench", False)),
        repr((["--repeats", "3", "--quick"], "torch-adamp bench", False)),
    ]


def test_bench_runs_the_repository_script() -> None:
    assert cli.benchmark_script().is_file()  # tests run from a clone
