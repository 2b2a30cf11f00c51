"""The layers' import rules, read from the source (every `import` and `from ... import`,
including those inside functions and under `TYPE_CHECKING`):

- `wire` (the codec both sides speak) imports nothing of optserve's;
- `clients` imports nothing from `service`;
- `service.sessions` (the application layer) imports no web framework and nothing of
  `service.api`; `service.store` nothing of either layer above it;
- `service.core` (the optimizers, schedules and numerics) imports nothing from the
  clients, the API, the store or a web or store library;
- the modules of `service.core` import one another without a cycle at run time (a
  package's `__init__` re-exporting its modules counts as importing them; imports under
  `TYPE_CHECKING` do not, as they never run: a recursive type such as `sequential`'s
  list of schedules names its union that way).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(package: str) -> Iterator[tuple[str, Path]]:
    for path in sorted((ROOT / package.replace(".", "/")).rglob("*.py")):
        yield module_name(path), path


def imports(name: str, path: Path, *, typing_only: bool = True) -> set[str]:
    """Every module `path` (module `name`) imports, absolute, relative ones resolved;
    without `typing_only`, not those under `if TYPE_CHECKING:` (they never run). `from
    pkg import mod` imports the module `pkg.mod` when there is one, else `pkg`."""
    found: set[str] = set()
    is_package = path.name == "__init__.py"
    known = {n for n, _ in modules(name.split(".")[0])}
    stack: list[ast.AST] = [ast.parse(path.read_text(), str(path))]
    while stack:
        node = stack.pop()
        if not typing_only and isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join([*base, node.module] if node.module else base)
            else:
                prefix = node.module or ""
            for alias in node.names:
                sub = f"{prefix}.{alias.name}"
                found.add(sub if sub in known else prefix)
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def offending(package: str, banned: tuple[str, ...]) -> list[str]:
    bad = []
    for name, path in modules(package):
        for target in sorted(imports(name, path)):
            if any(target == b or target.startswith(b + ".") for b in banned):
                bad.append(f"{name} imports {target}")
    return bad


@pytest.mark.parametrize(
    ("package", "banned"),
    [
        ("wire", ("service", "clients")),
        ("clients", ("service",)),
        ("service.sessions", ("fastapi", "starlette", "uvicorn", "service.api")),
        ("service.store", ("fastapi", "starlette", "service.api", "service.sessions")),
        (
            "service.core",
            (
                "clients",
                "service.api",
                "service.store",
                "service.sessions",
                "fastapi",
                "starlette",
                "redis",
                "httpx",
            ),
        ),
    ],
)
def test_a_layer_imports_only_what_it_may(package: str, banned: tuple[str, ...]) -> None:
    assert offending(package, banned) == []


def test_the_rules_see_an_import_where_there_is_one() -> None:
    """The walk finds what it must: the server's codec wraps `wire`, and the API
    imports the core (a rule that sees nothing would pass any code)."""
    assert offending("service.core", ("wire",))
    assert offending("service.api", ("service.core",))
    assert offending("service.api", ("service.sessions",))


def test_service_core_has_no_import_cycle() -> None:
    graph = {name: set() for name, _ in modules("service.core")}
    for name, path in modules("service.core"):
        runtime = imports(name, path, typing_only=False)
        graph[name] = {t for t in runtime if t in graph and t != name}
    cycles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*path[path.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []
