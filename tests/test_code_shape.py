"""The shape of the server's code (issue 17): no module in service/ over 500 lines unless
a `# long:` line near its top says why, no function over 60 lines (from `def` to its
last line, docstring included), no function over 8 parameters (`self`/`cls` aside).
Read from the source with `ast`; each rule is also shown to find what it must."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60
MAX_PARAMETERS = 8


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


def sources() -> list[Path]:
    return sorted((ROOT / "service").rglob("*.py"))


def long_modules(paths: list[Path]) -> list[str]:
    found = []
    for path in paths:
        text = path.read_text()
        lines = text.count("\n")
        head = text.splitlines()[:5]
        if lines > MAX_MODULE_LINES and not any(line.startswith("# long:") for line in head):
            found.append(f"{rel(path)}: {lines} lines")
    return found


def functions(path: Path) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    tree = ast.parse(path.read_text(), str(path))
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def parameters(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    a = node.args
    names = [*a.posonlyargs, *a.args, *a.kwonlyargs]
    count = len(names) + (a.vararg is not None) + (a.kwarg is not None)
    return count - (bool(a.args) and a.args[0].arg in ("self", "cls"))


def long_functions(paths: list[Path]) -> list[str]:
    return [
        f"{rel(path)}:{node.lineno} {node.name}: {lines} lines"
        for path in paths
        for node in functions(path)
        if (lines := (node.end_lineno or node.lineno) - node.lineno + 1) > MAX_FUNCTION_LINES
    ]


def wide_functions(paths: list[Path]) -> list[str]:
    return [
        f"{rel(path)}:{node.lineno} {node.name}: {n} parameters"
        for path in paths
        for node in functions(path)
        if (n := parameters(node)) > MAX_PARAMETERS
    ]


def test_no_module_is_over_500_lines_without_a_reason() -> None:
    assert long_modules(sources()) == []


def test_no_function_is_over_60_lines() -> None:
    assert long_functions(sources()) == []


def test_no_function_takes_more_than_8_parameters() -> None:
    assert wide_functions(sources()) == []


@pytest.fixture
def bad_module(tmp_path: Path) -> Path:
    params = ", ".join(f"a{i}" for i in range(9))
    body = "\n".join(f"    x{i} = {i}" for i in range(61))
    filler = "\n" * 450
    path = tmp_path / "bad.py"
    path.write_text(f"def wide({params}):\n    pass\n\n\ndef tall():\n{body}\n{filler}")
    return path


def test_the_rules_find_what_they_must(bad_module: Path) -> None:
    assert long_modules([bad_module]) == ["bad.py: 516 lines"]
    assert long_functions([bad_module]) == ["bad.py:5 tall: 62 lines"]
    assert wide_functions([bad_module]) == ["bad.py:1 wide: 9 parameters"]
    bad_module.write_text("# long: a reason\n" + bad_module.read_text())
    assert long_modules([bad_module]) == []
