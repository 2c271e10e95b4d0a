"""The layering of docs/design.md ("Layout"): no import from a later layer, no cycle between packages.

Every ``.py`` under ``src/batchfit`` is parsed (never imported) and its imports collected:
absolute ``batchfit.x`` and relative ``from ..x import y``, resolved to absolute module names.
Imports inside functions count (a lazy import is still a dependency); imports under
``if TYPE_CHECKING:`` do not (they never run).
"""

from __future__ import annotations

import ast
import importlib.util
import types
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import NamedTuple

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "batchfit"

# Earlier layers first; a module may import from its own layer and the ones before it.
LAYERS: list[tuple[str, ...]] = [
    ("batchfit.errors",),
    ("batchfit.core",),
    ("batchfit.data", "batchfit.distributed", "batchfit.sharding"),
    ("batchfit.measure",),
    ("batchfit.train",),
    ("batchfit.report",),
    ("batchfit.workloads",),  # docs/design.md lists it after report.py and before config.py
    ("batchfit.text", "batchfit.streams", "batchfit.shards", "batchfit.callbacks"),  # the public namespaces
    ("batchfit.config", "batchfit.run", "batchfit.models", "batchfit.demo", "batchfit.bench"),
    ("batchfit.cli",),
]
# The top: the public API and ``python -m batchfit`` may import anything; nothing imports them.
EXEMPT = frozenset({"batchfit", "batchfit.__main__"})
STEP_MODULE = "batchfit.core.step"
# `batchfit bench`'s baselines are hand-written PyTorch loops (docs/design.md, "Performance targets"):
# they call .backward() themselves by definition. Nothing else may.
BASELINES = ("batchfit.bench",)
UNRESOLVED = "<a relative import above the top package>"


class Import(NamedTuple):
    """One imported module: what, on which line, and the statement as written."""

    target: str
    line: int
    statement: str


# ----------------------------------------------------------------------------- the checker
def module_name(path: Path, root: Path) -> str:
    """``root/batchfit/core/step.py`` -> ``batchfit.core.step``; a package's ``__init__.py`` is the package."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


class _ImportCollector(ast.NodeVisitor):
    """Imports anywhere in a module (functions included), except in ``if TYPE_CHECKING:`` bodies."""

    def __init__(self, module: str, is_package: bool, known: set[str]) -> None:
        self.package = module if is_package else module.rpartition(".")[0]
        self.known = known
        self.imports: list[Import] = []

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            for child in node.orelse:  # the `else:` branch does run
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                self.imports.append(Import(alias.name, node.lineno, ast.unparse(node)))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.package.split(".")
            if node.level - 1 >= len(base):  # a broken import: reported as in no layer
                self.imports.append(Import(UNRESOLVED, node.lineno, ast.unparse(node)))
                return
            base = base[: len(base) - (node.level - 1)]
            origin = ".".join(base + ([node.module] if node.module else []))
        else:
            origin = node.module or ""
        if not (origin == PACKAGE or origin.startswith(PACKAGE + ".")):
            return
        for alias in node.names:
            # `from . import distributed` imports the module batchfit.distributed, not batchfit.
            submodule = f"{origin}.{alias.name}"
            target = submodule if submodule in self.known else origin
            found = Import(target, node.lineno, ast.unparse(node))
            if found not in self.imports:  # `from .x import a, b`: one import of .x
                self.imports.append(found)


def collect_imports(root: Path, package: str = PACKAGE) -> dict[str, list[Import]]:
    """``{module: its imports of package modules}`` for every ``.py`` under ``root/package``."""
    files = sorted((root / package).rglob("*.py"))
    known = {module_name(path, root) for path in files}
    graph: dict[str, list[Import]] = {}
    for path in files:
        name = module_name(path, root)
        collector = _ImportCollector(name, path.name == "__init__.py", known)
        collector.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        graph[name] = collector.imports
    return graph


def layer_of(module: str, layers: list[tuple[str, ...]] = LAYERS) -> int | None:
    """Index of the layer whose entry is ``module`` or a package above it; None when in none."""
    for index, names in enumerate(layers):
        if any(module == name or module.startswith(name + ".") for name in names):
            return index
    return None


def _describe(index: int | None, layers: list[tuple[str, ...]]) -> str:
    return "no layer" if index is None else f"layer {index} ({', '.join(layers[index])})"


def layer_violations(graph: Mapping[str, Iterable[Import]], layers: list[tuple[str, ...]] = LAYERS,
                     exempt: frozenset[str] = EXEMPT) -> list[str]:
    """One message per module in no layer and per import from a later layer (or from the top)."""
    problems = []
    for module, imports in sorted(graph.items()):
        if module in exempt:
            continue
        own = layer_of(module, layers)
        if own is None:
            problems.append(f"{module} is in no layer of docs/design.md: add it to a layer (LAYERS in this test)")
            continue
        for imp in imports:
            if imp.target in exempt:
                problems.append(f"{module} line {imp.line}: `{imp.statement}` imports {imp.target}, the top "
                                f"(the public API), from {_describe(own, layers)}")
                continue
            theirs = layer_of(imp.target, layers)
            where = f"{module} line {imp.line}: `{imp.statement}`"
            if imp.target == UNRESOLVED:
                problems.append(f"{where} goes above the top package")
            elif theirs is None:
                problems.append(f"{where} imports {imp.target}, which is in no layer (missing or misplaced?)")
            elif theirs > own:
                problems.append(f"{where} imports {imp.target} from {_describe(theirs, layers)}, "
                                f"later than its own {_describe(own, layers)}")
    return problems


def package_of(module: str) -> str:
    """``batchfit.core.step`` -> ``batchfit.core``; a top-level module is its own package."""
    return ".".join(module.split(".")[:2])


def package_graph(graph: Mapping[str, Iterable[Import]]) -> dict[str, dict[str, tuple[str, Import]]]:
    """``{package: {imported package: (module, one import that makes the edge)}}``, no self-edges."""
    edges: dict[str, dict[str, tuple[str, Import]]] = {}
    for module, imports in sorted(graph.items()):
        source = package_of(module)
        edges.setdefault(source, {})
        for imp in imports:
            target = package_of(imp.target)
            if target != source:
                edges[source].setdefault(target, (module, imp))
    return edges


def package_cycles(graph: Mapping[str, Iterable[Import]]) -> list[list[str]]:
    """Cycles (``[a, b, ..., a]``) between packages: the shortest through each package of every
    strongly connected group (Tarjan), without repeats."""
    edges = package_graph(graph)
    nodes = sorted(set(edges) | {t for targets in edges.values() for t in targets})
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, {})):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in nodes:
        if node not in index:
            connect(node)

    cycles: list[list[str]] = []
    seen: set[tuple[str, ...]] = set()
    for group in groups:
        members = set(group)
        for start in group:  # the shortest cycle through each member, so every edge of a knot shows
            cycle = _shortest_cycle(start, members, edges)
            key = _rotated(cycle[:-1])
            if key not in seen:
                seen.add(key)
                cycles.append(cycle)
    return cycles


def _shortest_cycle(start: str, members: set[str], edges: Mapping[str, Mapping[str, object]]) -> list[str]:
    """Breadth-first from ``start`` inside ``members`` back to ``start``: ``[start, ..., start]``."""
    paths = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for nxt in sorted(edges.get(node, {})):
            if nxt == start:
                return paths[node] + [start]
            if nxt in members and nxt not in paths:
                paths[nxt] = paths[node] + [nxt]
                queue.append(nxt)
    raise AssertionError(f"{start} is in a strongly connected group but on no cycle")


def _rotated(cycle: list[str]) -> tuple[str, ...]:
    first = cycle.index(min(cycle))
    return tuple(cycle[first:] + cycle[:first])


def format_cycle(cycle: list[str], graph: Mapping[str, Iterable[Import]]) -> str:
    edges = package_graph(graph)
    lines = [" -> ".join(cycle)]
    for source, target in zip(cycle, cycle[1:]):
        module, imp = edges[source][target]
        lines.append(f"    {source} -> {target}: {module} line {imp.line}: `{imp.statement}`")
    return "\n".join(lines)


def backward_calls(root: Path, package: str = PACKAGE) -> dict[str, list[int]]:
    """``{module: lines}`` of every call ``<something>.backward(...)`` (code only, not comments or docstrings)."""
    found: dict[str, list[int]] = {}
    for path in sorted((root / package).rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        lines = [node.lineno for node in ast.walk(tree)
                 if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                 and node.func.attr == "backward"]
        if lines:
            found[module_name(path, root)] = sorted(lines)
    return found


# ----------------------------------------------------------------------------- the package itself
@pytest.fixture(scope="module")
def graph() -> dict[str, list[Import]]:
    assert (SRC / PACKAGE / "__init__.py").is_file(), f"no package at {SRC / PACKAGE}"
    return collect_imports(SRC)


def test_layers_no_import_from_later_layer(graph):
    problems = layer_violations(graph)
    assert not problems, "imports against the layering of docs/design.md:\n" + "\n".join(problems)


def test_layers_no_cycle_between_packages(graph):
    cycles = package_cycles(graph)
    assert not cycles, "import cycles between packages:\n" + "\n".join(format_cycle(c, graph) for c in cycles)


def test_layers_one_module_calls_backward():
    found = {module: lines for module, lines in backward_calls(SRC).items()
             if not any(module == b or module.startswith(b + ".") for b in BASELINES)}
    listing = "; ".join(f"{module} (lines {', '.join(map(str, lines))})" for module, lines in found.items())
    assert list(found) == [STEP_MODULE], (
        f"`.backward(` must be called only in {STEP_MODULE} (THE step, used by the trainer and every probe); "
        f"found in: {listing or 'no module'}")


def test_measure_package_imports_cleanly():
    import batchfit as bf
    import batchfit.measure.lr
    from batchfit.measure.lr import scale_lr

    assert scale_lr(0.1, 32, 64) == pytest.approx(0.2)
    assert batchfit.measure.lr.scale_lr is scale_lr
    assert isinstance(bf.measure, types.ModuleType)
    assert callable(bf.tune) and not isinstance(bf.tune, types.ModuleType), (
        f"bf.tune must be the function, got {bf.tune!r}")
    assert importlib.util.find_spec("batchfit.tune") is None, "a module batchfit.tune would shadow bf.tune()"


# ----------------------------------------------------------------------------- the checker can fail
def test_layer_violations_fake_graph_reports_import_from_later_layer():
    graph = {
        "batchfit.core.step": [Import("batchfit.errors", 1, "from ..errors import expected"),
                               Import("batchfit.train.trainer", 7, "from ..train.trainer import Trainer")],
        "batchfit.measure.noise": [Import("batchfit.core.step", 2, "from ..core.step import StepRunner")],
        "batchfit.config": [Import("batchfit.models", 3, "from .models import BUILTIN")],  # same layer: fine
        "batchfit.data.sources": [Import("batchfit", 4, "from .. import tune")],
        "batchfit.extras": [],
        "batchfit": [Import("batchfit.cli", 5, "from .cli import main")],  # exempt
    }
    problems = layer_violations(graph)
    assert len(problems) == 3, problems
    step, data, extras = problems  # sorted by module
    assert step.startswith("batchfit.core.step line 7:") and "batchfit.train.trainer" in step
    assert "`from ..train.trainer import Trainer`" in step and "layer 4 (batchfit.train)" in step
    assert data.startswith("batchfit.data.sources line 4:") and "the top" in data
    assert extras.startswith("batchfit.extras is in no layer")


def test_package_cycles_fake_graph_reports_cycle_within_one_layer():
    graph = {
        "batchfit.data.batcher": [Import("batchfit.distributed", 9, "from .. import distributed"),
                                  Import("batchfit.data.order", 10, "from .order import epoch_order")],
        "batchfit.data.order": [],
        "batchfit.distributed": [Import("batchfit.data.sources", 3, "from .data.sources import Batch")],
        "batchfit.errors": [],
    }
    assert layer_violations(graph) == []  # same layer: only the cycle check sees it
    cycles = package_cycles(graph)
    assert cycles == [["batchfit.data", "batchfit.distributed", "batchfit.data"]]
    message = format_cycle(cycles[0], graph)
    assert "batchfit.data.batcher line 9: `from .. import distributed`" in message
    assert "batchfit.distributed line 3" in message


def test_package_cycles_fake_graph_without_cycle_reports_nothing():
    graph = {"batchfit.train.trainer": [Import("batchfit.measure.lr", 1, "from ..measure.lr import scale_lr")],
             "batchfit.measure.lr": [Import("batchfit.errors", 1, "from ..errors import expected")]}
    assert package_cycles(graph) == []


def test_collect_imports_fake_package_resolves_relative_lazy_and_skips_type_checking(tmp_path):
    pkg = tmp_path / "batchfit"
    (pkg / "core").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .core.step import run\n")
    (pkg / "distributed.py").write_text("")
    (pkg / "core" / "__init__.py").write_text("from . import step\n")
    (pkg / "core" / "step.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "import os\n"
        "from .. import distributed\n"
        "if TYPE_CHECKING:\n"
        "    from ..train.trainer import Trainer\n"
        "else:\n"
        "    import batchfit.errors as errors\n"
        "def run(loss):\n"
        "    from ..measure.noise import squared_grad_norm  # lazy: counts\n"
        "    loss.backward()\n"
        "    '''x.backward( in a docstring does not count'''\n"
    )
    graph = collect_imports(tmp_path)
    assert [i.target for i in graph["batchfit.core.step"]] == [
        "batchfit.distributed", "batchfit.errors", "batchfit.measure.noise"]
    assert [i.target for i in graph["batchfit.core"]] == ["batchfit.core.step"]
    assert [i.target for i in graph["batchfit"]] == ["batchfit.core.step"]
    problems = layer_violations(graph)
    assert len(problems) == 2 and all(p.startswith("batchfit.core.step line") for p in problems), problems
    assert "batchfit.distributed" in problems[0] and "batchfit.measure.noise" in problems[1]
    assert backward_calls(tmp_path) == {"batchfit.core.step": [10]}
