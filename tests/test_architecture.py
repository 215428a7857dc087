"""The house rules of the package layout (docs/architecture.md), checked on the source itself.

- No import circle among fwsvd's modules, counting imports inside functions too (a lazy import
  that only hides a circle is still one).
- No module imports another module's underscored names: what two modules share is public.
- No module imports the package itself (``from fwsvd import …`` inside fwsvd would run
  ``fwsvd/__init__.py``, which imports everything).
- Every package says what it is for in one docstring line.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import fwsvd

PACKAGE = Path(fwsvd.__file__).resolve().parent


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ["fwsvd", *path.relative_to(PACKAGE).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, str, int]]:
    """``(imported module, imported name, line)`` for every fwsvd import in the file, at any depth."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == "fwsvd":
                module = node.module
            else:
                continue
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                found.append((sub, "", node.lineno) if sub in modules else (module, alias.name, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, "", node.lineno) for a in node.names if a.name.split(".")[0] == "fwsvd"]
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        for module, _, _ in _imports(name, path, modules):
            if module in modules and module != name:
                graph[name].add(module)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle():
    assert _cycles(_graph()) == []


def test_the_walker_sees_a_circle():
    # The check can fail: a made-up pair that import each other is one circle.
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]


def test_no_module_imports_anothers_private_names():
    modules = _modules()
    private = [
        f"{name}:{line} imports {module}.{imported}"
        for name, path in modules.items()
        for module, imported, line in _imports(name, path, modules)
        if imported.startswith("_") and not imported.startswith("__") and module != name
    ]
    assert private == []


def test_no_module_imports_the_package_itself():
    modules = _modules()
    offenders = [
        f"{name}:{line}"
        for name, path in modules.items()
        if name != "fwsvd"
        for module, imported, line in _imports(name, path, modules)
        if module == "fwsvd"
    ]
    assert offenders == []


def test_every_package_says_what_it_is_for():
    for init in PACKAGE.rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")))
        assert doc and doc.strip(), f"{init.relative_to(PACKAGE)} has no docstring"


def test_public_names_unchanged():
    assert sorted(fwsvd.__all__) == sorted([
        "METHODS", "CalibrationConfig", "CompressConfig", "CompressionReport", "DataError", "FwsvdError", "LoadedModel",
        "LowRankLinear", "Method", "ModelError", "Statistics", "calibrate", "collect_statistics", "compress", "correct_causal",
        "count_parameters", "evaluate_zeroshot", "get_method", "inspect", "load", "load_model", "quantize_factors", "save",
    ])
    assert all(hasattr(fwsvd, name) for name in fwsvd.__all__)
