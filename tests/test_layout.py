"""The package's shape: the public `codi.train` stays a function, no import cycles, small modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from test_train import quick_args

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "codi"
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80


def test_codi_train_is_callable_twice(tiny_gpt2, train_file, tmp_path):
    import codi
    import codi.training  # importing the submodule must not rebind `codi.train`

    for run in ("a", "b"):
        result = codi.train(*quick_args(tiny_gpt2, train_file, tmp_path / run, "--max_steps", "1"))
        assert result.trainer.state.global_step == 1
    assert callable(codi.train)


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(("codi", *path.relative_to(PACKAGE).with_suffix("").parts))
        modules[name.removesuffix(".__init__")] = path
    return modules


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Package modules that `name` imports anywhere (functions included), read from the source."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        found.update(t for t in targets if t in modules and t not in (name, "codi"))
    return found


def test_package_imports_form_no_cycle():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    state: dict[str, str] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for child in sorted(graph[node]):
            if state.get(child) == "open":
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(child) :] + [child]))
            if child not in state:
                visit(child, stack + [child])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_modules_and_functions_are_small():
    too_long = []
    for name, path in _modules().items():
        source = path.read_text()
        lines = len(source.splitlines())
        if lines > MAX_MODULE_LINES:
            too_long.append(f"{name}: {lines} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{name}.{node.name}: {length} lines")
    assert not too_long, too_long
