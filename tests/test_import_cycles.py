"""No import cycles inside megatron_tasp: the graph of module-level imports (read with ``ast``, never
executed) must be acyclic.

Edges: ``import a.b`` and ``from a.b import c`` point to ``a.b``, and to ``a.b.c`` when that is a module;
relative imports are resolved against the importing module's package (``from . import x`` points to the
sibling module x). Module-level statements are checked, and a second test adds the imports inside
functions (a lazy import that closes a cycle hides a layering fault); ``if TYPE_CHECKING:`` blocks are
skipped. A package's ``__init__`` is its own node;
importing a submodule runs the parent's ``__init__`` first, but that parent edge is not a cycle hazard and
is left out.
"""

from __future__ import annotations

import ast
import pkgutil
from pathlib import Path

import megatron_tasp

ROOT = Path(megatron_tasp.__file__).resolve().parent


def _modules() -> dict[str, tuple[Path, bool]]:
    """name -> (file, is_package) for every module under megatron_tasp."""
    found = {"megatron_tasp": (ROOT / "__init__.py", True)}
    for info in pkgutil.walk_packages([str(ROOT)], prefix="megatron_tasp."):
        base = ROOT.joinpath(*info.name.split(".")[1:])
        path = base / "__init__.py" if info.ispkg else base.with_suffix(".py")
        if path.exists():
            found[info.name] = (path, info.ispkg)
    return found


def _top_level(body: list[ast.stmt]):
    """Module-level import statements, descending into if/try/with blocks but not TYPE_CHECKING ones."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            test = ast.unparse(node.test)
            if "TYPE_CHECKING" not in test:
                yield from _top_level(node.body)
            yield from _top_level(node.orelse)
        elif isinstance(node, ast.Try):
            for part in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                yield from _top_level(part)
        elif isinstance(node, ast.With):
            yield from _top_level(node.body)


def _anywhere(body: list[ast.stmt]):
    """Every import statement, inside functions too (a late import still closes a cycle), except under
    ``if TYPE_CHECKING:``."""
    for node in _top_level(body):
        yield node
    for node in ast.walk(ast.Module(body=body, type_ignores=[])):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)):
                    yield inner


def _edges(name: str, path: Path, is_pkg: bool, modules: dict, late: bool = False) -> set[str]:
    package = name if is_pkg else name.rpartition(".")[0]
    out: set[str] = set()
    body = ast.parse(path.read_text(encoding="utf-8")).body
    for node in (_anywhere(body) if late else _top_level(body)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for t in targets:
            if t in modules and t != name:
                out.add(t)
    return out


def import_graph(late: bool = False) -> dict[str, set[str]]:
    """Module -> the megatron_tasp modules its module-level code imports (``late``: imports inside
    functions count too)."""
    modules = _modules()
    return {name: _edges(name, path, is_pkg, modules, late) for name, (path, is_pkg) in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_graph_sees_the_engine():
    graph = import_graph()
    assert "megatron_tasp.engine.exchange" in graph["megatron_tasp.engine.compiled"]
    assert "megatron_tasp.tuning" in graph["megatron_tasp.engine.plan"]
    assert "megatron_tasp.kernels.experimental.te" in graph["megatron_tasp.kernels.experimental"]


def test_finder_reports_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles_in_megatron_tasp():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_import_cycles_even_through_late_imports():
    """Imports inside functions (lazy ones) must not close a cycle either: the layers stay one-way."""
    cycle = find_cycle(import_graph(late=True))
    assert cycle is None, "import cycle through a late import: " + " -> ".join(cycle)
