"""The ``torch-adamp`` command: ``toy``, ``compare``, ``reproduce`` and ``bench``.

Provided by this package (``reproduce/`` of the repository), not by the library:
``bash scripts/setup.sh`` installs it, or ``pip install -e reproduce`` from a
clone. matplotlib and tqdm (its dependencies; pycocotools too, for the
detection task) are imported only when a subcommand runs. Errors are one
line on stderr and a non-zero exit status (2 for bad options or missing data).
"""

from __future__ import annotations

import argparse
import json
import runpy
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch

from torch_adamp import __version__

from . import compare, fashion_mnist, toy
from .progress import MissingDependency, progress_bar, require

BENCH_HELP = "step-time benchmark of AdamP/SGDP against torch.optim (runs benchmarks/step_time.py of a clone)"


class UsageError(Exception):
    """A bad option or a missing input: reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# -- option types ----------------------------------------------------------------------
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return value

    return parse


def _nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _nonneg_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def _momentum(text: str) -> float:
    value = _nonneg_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"expected a momentum in [0, 1), got {text!r}")
    return value


def _momentum_list(text: str) -> list[float]:
    values = [_momentum(t) for t in text.split(",") if t.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected momenta like 0.9,0.99, got {text!r}")
    return values


def _optimizer_list(text: str) -> list[str]:
    names = [t.strip().lower() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in compare.CHOICES]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown optimizer(s) {', '.join(bad) or repr(text)}; choose among {','.join(compare.CHOICES)}"
        )
    # checked here, before any training: a missing package would otherwise stop the run after the optimizers
    # listed before it
    missing = compare.missing_packages(names)
    if missing:
        raise argparse.ArgumentTypeError(
            "; ".join(f"{n} needs {why}" for n, why in missing.items()) + ". They come with the library's "
            "'wrapped' extra: bash scripts/setup.sh wrapped (or: pip install -e '.[wrapped]' in the clone)"
        )
    return list(dict.fromkeys(names))


# -- the parser --------------------------------------------------------------------------
def _common(p: argparse.ArgumentParser, out: str, threads_help: str) -> None:
    p.add_argument("--out", default=out, metavar="DIR", help=f"output folder (default: {out})")
    p.add_argument("--threads", type=_positive_int, default=1, metavar="N", help=threads_help)
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``torch-adamp`` (exposed for the tests and the docs)."""
    parser = _Parser(
        prog="torch-adamp",
        description="AdamP and SGDP (Heo et al., ICLR 2021): the paper's toy problems, a small "
        "Fashion-MNIST comparison with torch.optim, and a step-time benchmark.",
    )
    parser.add_argument("--version", action="version", version=f"torch-adamp {__version__} (torch {torch.__version__})")
    sub = parser.add_subparsers(dest="command", metavar="{toy,compare,reproduce,bench}", parser_class=_Parser)

    p = sub.add_parser(
        "toy",
        help="the paper's 2D and 3D toy problems: weight norm with and without projection",
        description="2D toy: ||w/|w| - w*/|w*| ||^2 with GD, GD + momentum and GD + momentum + projection "
        "(SGDP); 3D toy: Rosenbrock on a hemisphere with momentum GD, + weight decay, + projection. "
        "Prints the final loss and weight norm; writes toy2d_trajectories.png, toy2d_norms.png, "
        "toy3d_path.png, toy3d_radius.png and toy_results.json.",
    )
    p.add_argument("--steps", type=_positive_int, default=500, metavar="N", help="steps of the 2D toy (default: 500)")
    p.add_argument("--lr", type=_nonneg_float, default=0.01, help="learning rate of the 2D toy (default: 0.01)")
    p.add_argument(
        "--momenta",
        type=_momentum_list,
        default=[0.9, 0.95, 0.99],
        metavar="B1,B2,...",
        help="momenta of the 2D toy (default: 0.9,0.95,0.99)",
    )
    p.add_argument(
        "--steps-3d", type=_positive_int, default=200, metavar="N", help="iterations of the 3D toy (default: 200)"
    )
    _common(p, "results/toy", "CPU threads for torch (default: 1)")

    d = compare.Config()
    p = sub.add_parser(
        "compare",
        help="SGD vs SGDP and AdamW vs AdamP on a small BatchNorm CNN (Fashion-MNIST)",
        description="Trains a conv-BN-ReLU CNN (no conv bias, so the conv weights are scale-invariant) on "
        "Fashion-MNIST with each optimizer and seed; prints test accuracy, the final norm of the conv weights "
        "and the mean effective step size lr/|w|^2 (mean +- std over seeds); writes results.json, "
        "accuracy.png, weight_norm.png, effective_step.png, effective_step_ratio.png and compare.png. "
        "Baselines are torch.optim.SGD (nesterov) and torch.optim.AdamW; SGDP and AdamP get the same "
        "hyperparameters. Results are written after every finished run (Ctrl-C keeps them). Data: the 14x14 "
        "subset shipped with the package, or the full set (--data-dir, $" + fashion_mnist.ENV_VAR + ", or "
        "Debian's dataset-fashion-mnist); never downloads.",
    )

    def opt(flag: str, kind: Callable[[str], Any], default: Any, metavar: str, text: str, *aliases: str) -> None:
        p.add_argument(flag, *aliases, type=kind, default=default, metavar=metavar, help=f"{text} (default: {default})")

    opt("--epochs", _positive_int, d.epochs, "N", "epochs per run")
    opt("--seeds", _positive_int, d.seeds, "N", "seeds per optimizer")
    opt("--first-seed", _nonneg_int, d.first_seed, "S", "first seed; the runs use S, S+1, ...")
    opt("--image-size", _int_at_least(4), d.image_size, "PX", "image side, 4..28; above 14 needs the full set")
    opt("--train-size", _int_at_least(10), d.train_size, "N", "training images, the first N/10 per class", "--subset")
    opt("--test-size", _positive_int, d.test_size, "N", "test images, the first N/10 per class")
    opt("--batch-size", _int_at_least(2), d.batch_size, "N", "batch size")
    opt("--width", _positive_int, d.width, "C", "channels of the first conv layer (then 2C, 4C)")
    p.add_argument(
        "--optimizers",
        type=_optimizer_list,
        default=list(d.optimizers),
        metavar="LIST",
        help=f"comma-separated, among {','.join(compare.CHOICES)} (NAME+p: torch_adamp.Projected(NAME); "
        f"default: {','.join(compare.OPTIMIZERS)})",
    )
    opt("--sgd-lr", _nonneg_float, d.sgd_lr, "LR", "SGD/SGDP learning rate")
    opt("--momentum", _momentum, d.momentum, "M", "SGD/SGDP momentum (nesterov)")
    opt("--sgd-weight-decay", _nonneg_float, d.sgd_weight_decay, "WD", "SGD/SGDP weight decay")
    opt("--adam-lr", _nonneg_float, d.adam_lr, "LR", "AdamW/AdamP learning rate")
    opt("--adam-weight-decay", _nonneg_float, d.adam_weight_decay, "WD", "AdamW/AdamP decoupled weight decay")
    p.add_argument(
        "--schedule",
        choices=("cosine", "constant"),
        default=d.schedule,
        help=f"learning-rate schedule over the run (default: {d.schedule})",
    )
    p.add_argument(
        "--data-dir",
        metavar="DIR",
        default=None,
        help=f"folder with the full Fashion-MNIST idx files (default: ${fashion_mnist.ENV_VAR}, then "
        f"{fashion_mnist.DEBIAN_DIR}, then the 14x14 subset shipped with the package: 20000 + 5000 images)",
    )
    threads = (
        "CPU threads for torch (default: 1; this model gains little from more, and more is slow on a busy machine)"
    )
    _common(p, "results/compare", threads)

    _add_reproduce(sub)

    # main() hands everything after "bench" to the main() of benchmarks/step_time.py, --help included
    sub.add_parser("bench", help=BENCH_HELP, description=BENCH_HELP, add_help=False)
    return parser


def _add_reproduce(sub: Any) -> None:
    from . import tasks

    listing = "\n".join(f"  {t.name:<15} {t.help} (default {t.seeds} seeds)" for t in tasks.TASKS.values())
    p = sub.add_parser(
        "reproduce",
        help="one small offline task per family of the paper's benchmarks, baseline vs projected twin",
        description="Trains each task's baseline (torch.optim.SGD / AdamW) and projected twin (SGDP / AdamP, "
        "same hyperparameters) over several seeds; prints mean +- std of its metrics, the paired gain with its "
        "standard error, the norm of the scale-invariant weights and the mean effective step lr/|w|^2, beside "
        "the paper's figure; writes OUT/TASK/results.json and PNGs, OUT/summary.md and OUT/summary.json. "
        "Offline: the data ships with the package. Tasks:\n" + listing,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("tasks", nargs="*", metavar="TASK", help="tasks to run (default: all, in the order above)")
    p.add_argument(
        "--seeds", type=_positive_int, default=None, metavar="N", help="seeds per optimizer (default: per task)"
    )
    p.add_argument("--first-seed", type=_nonneg_int, default=0, metavar="S", help="first seed (default: 0)")
    p.add_argument("--epochs", type=_positive_int, default=None, metavar="N", help="epochs per run (default: per task)")
    _common(p, "results/reproduce", "CPU threads for torch (default: 1)")


# -- subcommands -------------------------------------------------------------------------
def _prepare(args: argparse.Namespace) -> Path:
    require("matplotlib")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create the output folder {out}: {e.strerror}") from None
    return out


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON in one step (a temporary file renamed), so that ``path`` is never half written."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


def run_toy(args: argparse.Namespace, log: Callable[[str], None] = print) -> int:
    from . import plots

    out = _prepare(args)
    total = args.steps * len(args.momenta) * 2 + args.steps + args.steps_3d * len(toy.METHODS_3D)
    with progress_bar(total=total, unit="step", desc="toy", quiet=args.quiet) as bar:
        r2 = toy.run_2d(args.momenta, steps=args.steps, lr=args.lr, on_step=bar.update)
        r3 = toy.run_3d(steps=args.steps_3d, on_step=bar.update)
    log(toy.format_table_2d(r2, steps=args.steps, lr=args.lr))
    log("")
    log(toy.format_table_3d(r3, steps=args.steps_3d))
    (out / "toy_results.json").write_text(json.dumps(toy.summary(r2, r3), indent=2) + "\n")
    paths = plots.toy_2d(r2, out, args.lr) + plots.toy_3d(r3, out)
    log("")
    log(f"wrote {out / 'toy_results.json'} and " + ", ".join(p.name for p in paths))
    return 0


def run_compare(args: argparse.Namespace, log: Callable[[str], None] = print) -> int:
    from . import plots

    out = _prepare(args)
    cfg = compare.Config(
        epochs=args.epochs,
        seeds=args.seeds,
        first_seed=args.first_seed,
        image_size=args.image_size,
        train_size=args.train_size,
        test_size=args.test_size,
        batch_size=args.batch_size,
        width=args.width,
        optimizers=tuple(args.optimizers),
        sgd_lr=args.sgd_lr,
        momentum=args.momentum,
        sgd_weight_decay=args.sgd_weight_decay,
        adam_lr=args.adam_lr,
        adam_weight_decay=args.adam_weight_decay,
        schedule=args.schedule,
        data_dir=args.data_dir,
        threads=args.threads,
    )
    start = time.perf_counter()
    path = out / "results.json"
    kept: dict[str, Any] = {}

    def write(partial: dict[str, Any]) -> None:  # after every finished run: Ctrl-C keeps them
        kept.update(partial)
        _write_json(path, partial)

    try:
        results = compare.run(cfg, quiet=args.quiet, log=log, on_run=write)
    except fashion_mnist.DataError as e:
        raise UsageError(str(e)) from None
    except KeyboardInterrupt:
        if not kept:
            log(f"interrupted before the first run finished; nothing written to {path}")
        else:
            n, planned = len(kept["runs"]), kept["runs_planned"]
            finished = ", ".join(f"{compare.LABELS[r['optimizer']]} seed {r['seed']}" for r in kept["runs"])
            log(f"interrupted: kept the {n} of {planned} runs that finished ({finished}) in {path}")
            log(compare.format_table(kept["summary"]))
        raise
    log("")
    log(compare.format_table(results["summary"]))
    _write_json(path, results)
    paths = plots.compare_plots(results, out)
    log("")
    log(f"{time.perf_counter() - start:.0f} s; wrote {out / 'results.json'} and " + ", ".join(p.name for p in paths))
    return 0


def benchmark_script() -> Path:
    """``benchmarks/step_time.py`` of the clone this package runs from (in no wheel; the clone's root is
    three folders above this file: reproduce/src/torch_adamp_reproduce/cli.py)."""
    return Path(__file__).resolve().parents[3] / "benchmarks" / "step_time.py"


def run_bench(args: argparse.Namespace, log: Callable[[str], None] = print) -> int:
    script = benchmark_script()
    if not script.is_file():
        if any(a in ("-h", "--help") for a in args.args):
            log(f"usage: torch-adamp bench [ARGS ...]\n\n{BENCH_HELP}.")
        raise UsageError(
            "the step-time benchmark is part of the source repository, not of the installed package: "
            "clone the repository and run 'python benchmarks/step_time.py' (or torch-adamp bench from the clone)"
        )
    namespace = runpy.run_path(str(script), run_name="torch_adamp_bench")
    rc = namespace["main"](list(args.args), prog="torch-adamp bench", check_targets=False)
    return int(rc or 0)


def run_reproduce(args: argparse.Namespace, log: Callable[[str], None] = print) -> int:
    from . import tasks

    names = list(dict.fromkeys(args.tasks)) or list(tasks.TASKS)
    unknown = [n for n in names if n not in tasks.TASKS]
    if unknown:
        raise UsageError(f"unknown task(s) {', '.join(unknown)}; choose among {', '.join(tasks.TASKS)}")
    if "detection" in names:
        require("pycocotools")  # the COCO AP of the detection task
    out = _prepare(args)
    start = time.perf_counter()
    results = {}
    for name in names:
        try:
            results[name] = tasks.run_task(
                name,
                epochs=args.epochs,
                seeds=args.seeds,
                first_seed=args.first_seed,
                out=out / name,
                quiet=args.quiet,
                log=log,
            )
        except fashion_mnist.DataError as e:
            raise UsageError(str(e)) from None
        log("")
    log(tasks.markdown_table(results))
    # summary.md and summary.json cover every task with results in OUT: this run's, and those an earlier
    # run left in OUT/TASK/results.json (a run of one task no longer drops the others from the summary)
    earlier = _earlier_results(out, skip=set(results))
    merged = {n: results[n] if n in results else earlier[n] for n in tasks.TASKS if n in results or n in earlier}
    (out / "summary.md").write_text(tasks.markdown_table(merged) + "\n")
    summary = {
        n: {k: r[k] for k in ("title", "data", "hyperparameters", "summary", "paper", "wall_seconds") if k in r}
        for n, r in merged.items()
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    kept = f" (with {', '.join(earlier)} from earlier runs in {out})" if earlier else ""
    log(f"\n{time.perf_counter() - start:.0f} s in all; wrote {out / 'summary.md'} and {out / 'summary.json'}{kept}")
    return 0


def _earlier_results(out: Path, skip: set[str]) -> dict[str, dict[str, Any]]:
    """The results.json of every task under ``out`` but those in ``skip``, where it is complete enough for the
    summary table (a file of an older layout, or half written, is left out)."""
    from . import tasks

    found: dict[str, dict[str, Any]] = {}
    for name in tasks.TASKS:
        path = out / name / "results.json"
        if name in skip or not path.is_file():
            continue
        try:
            res = json.loads(path.read_text())
            tasks.markdown_table({name: res})  # every key the table reads is there
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            continue
        found[name] = res
    return found


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "toy": run_toy,
    "compare": run_compare,
    "bench": run_bench,
    "reproduce": run_reproduce,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``torch-adamp``; returns the exit status."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # everything after "bench" belongs to the benchmark, --help included
        args = argparse.Namespace(command="bench", args=argv[1:])
    else:
        args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command](args)
    except (UsageError, MissingDependency) as e:
        print(f"torch-adamp {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"torch-adamp {args.command}: interrupted", file=sys.stderr)
        return 130


def _entry() -> Any:  # pragma: no cover - for ``python -m torch_adamp_reproduce.cli``
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    _entry()
