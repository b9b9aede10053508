"""The layout is the architecture: layers import only downward, and no module imports itself back.

Every import is counted, including those made inside functions. Layers, from the bottom
(docs/ARCHITECTURE.md draws them): the checks and the native binding; the projection; the rule
protocol; the engine; sharded-parameter support and the statistics; the optimizer base class;
the optimizers (one module each) and Projected; the functional API and reference interop; the
package; its integrations and ``python -m torch_adamp``.
The ``torch-adamp`` command and the experiments are the package in reproduce/, which the library
never imports.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "torch_adamp"

#: the layer of each module or subpackage (first component under torch_adamp); imports go to lower layers,
#: or within the same subpackage (acyclic)
LAYERS = {
    "checks": 0,
    "_native": 0,
    "projection": 0.5,
    "rule": 1,
    "diagnostics": 1,
    "triton": 1.5,
    "engine": 2,
    "distributed": 3,
    "stats": 3.5,
    "zero": 3.5,
    "optimizer": 4,
    "optimizers": 5,
    "projected": 5,
    "functional": 6,
    "interop": 6,
    "__init__": 7,
    "integrations": 8,
    "__main__": 8,
}


_ALL: set[str] = set()


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Internal modules imported by ``path`` (anywhere in the file), as dotted names."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name == "torch_adamp" or a.name.startswith("torch_adamp."))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            elif node.module and (node.module == "torch_adamp" or node.module.startswith("torch_adamp.")):
                mod = node.module
            else:
                continue
            subs = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in _ALL]
            out.update(subs or [mod])  # "from . import rules" imports the module rules, not the package
    return out - {name}


MODULES = {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}
_ALL = set(MODULES)
GRAPH = {m: {i for i in _imports(p) if i in MODULES} for m, p in MODULES.items()}


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS["__init__"] if len(parts) == 1 else LAYERS[parts[1]]


def test_every_module_has_a_layer() -> None:
    assert all(m == "torch_adamp" or m.split(".")[1] in LAYERS for m in MODULES), sorted(MODULES)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down(module: str) -> None:
    for target in GRAPH[module]:
        parts = module.split(".")
        same_subpackage = len(parts) > 1 and (SRC / parts[1]).is_dir() and parts[:2] == target.split(".")[:2]
        up = _layer(target) >= _layer(module) and not same_subpackage
        assert not up, f"{module} (layer {_layer(module)}) imports {target} (layer {_layer(target)})"


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` as a path of module names, or ``None``."""
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> list[str] | None:
        state[m] = 1
        for t in sorted(graph[m]):
            if t == m.rsplit(".", 1)[0]:
                continue  # "from . import x" runs the parent package's __init__, which is already importing
            if state.get(t) == 1:
                return [*stack, m, t]
            if state.get(t) is None and (found := visit(t, [*stack, m])) is not None:
                return found
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m, [])) is not None:
            return found
    return None


def test_no_import_cycle() -> None:
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_cycles() -> None:
    assert find_cycle({"p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p.a"}}) == ["p.a", "p.b", "p.c", "p.a"]
    assert find_cycle({"p.a": {"p.b"}, "p.b": set()}) is None


def test_no_c_source_inside_python() -> None:
    for module, path in MODULES.items():
        text = path.read_text()
        assert "#include <" not in text, f"{module} holds C source; it belongs in csrc/"


def test_the_checker_sees_imports_inside_functions(tmp_path: Path) -> None:
    f = SRC / "engine" / "native.py"
    assert "torch_adamp._native" in _imports(f) and "torch_adamp.rule" in _imports(f)
    inner = ast.parse("def f():\n    from .adamp import AdamP\n")
    assert any(isinstance(n, ast.ImportFrom) for n in ast.walk(inner))  # ast.walk reaches function bodies


def _top_level_imports(path: Path) -> set[str]:
    """First components of every absolute import in ``path``, and of every string constant naming a module
    (what ``importlib.import_module("...")`` would take)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            parts = node.value.split(".")
            if all(part.isidentifier() for part in parts):
                names.add(parts[0])
    return names


REPRODUCE = SRC.parents[1] / "reproduce" / "src" / "torch_adamp_reproduce"


def test_the_command_and_the_experiments_live_in_reproduce() -> None:
    assert (REPRODUCE / "cli.py").is_file() and (REPRODUCE / "data").is_dir()
    assert not [m for m in MODULES if m.split(".")[1:2] in (["experiments"], ["cli"])]
    assert not [f for f in SRC.glob("data/*") if f.is_file()]  # (a stale __pycache__ folder may stay behind)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_the_library_never_imports_the_reproduce_package(module: str) -> None:
    # the torch-adamp command, its experiments and data (reproduce/) sit on top of the library, never under it
    assert "torch_adamp_reproduce" not in _top_level_imports(MODULES[module])


def test_the_reproduce_check_sees_imports(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("import importlib\ndef g():\n    from torch_adamp_reproduce.cli import main\n")
    assert "torch_adamp_reproduce" in _top_level_imports(f)
    f.write_text('import importlib\nimportlib.import_module("torch_adamp_reproduce.tasks")\n')
    assert "torch_adamp_reproduce" in _top_level_imports(f)
