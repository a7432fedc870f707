"""The package's shape, checked: no import cycles, no module over 400 lines, SQL only in store/,
and a run's admission (its status heard, then its job queued) in one scheduler method."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "critique_local"
MAX_MODULE_LINES = 400
SQL_STARTS = ("SELECT ", "INSERT ", "UPDATE ", "DELETE ", "CREATE TABLE", "ALTER TABLE", "PRAGMA ")
DATABASE_MODULES = ("sqlite3", "aiosqlite")


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports, anywhere in it: an import deferred into a function
    still ties the two modules together (it only hides the cycle from the interpreter).
    ``if TYPE_CHECKING:`` blocks never run and do not count."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        skipped = {id(n) for top in tree.body if isinstance(top, ast.If) and "TYPE_CHECKING" in ast.unparse(top.test)
                   for n in ast.walk(top)}
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    deps.add(target)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for dep in sorted(graph.get(node, ())):
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in on_stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_package_has_no_import_cycle() -> None:
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_cycles() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_is_over_400_lines() -> None:
    long = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert long == {}, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_sql_lives_only_in_store() -> None:
    found = []
    for name, path in _modules().items():
        if name.startswith("critique_local.store"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and node.value.lstrip().upper().startswith(SQL_STARTS):
                found.append(f"{name}:{node.lineno}")
    assert found == [], f"SQL outside critique_local/store: {found}"


def test_only_the_store_opens_a_database() -> None:
    found = []
    for name, path in _modules().items():
        if name.startswith("critique_local.store"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            imported = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [f"{name}:{node.lineno} {m}" for m in imported if m.split(".")[0] in DATABASE_MODULES]
    assert found == [], f"database drivers used outside critique_local/store: {found}"


def _receiver(node: ast.expr) -> str:
    if isinstance(node, ast.Subscript):  # app[SCHEDULER]
        return _receiver(node.slice)
    return node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""


def _callers(method: str, receivers: tuple[str, ...]) -> dict[str, list[str]]:
    """Module -> the functions in it that call ``<receiver>.<method>(...)``, where the receiver
    (a name, or an attribute's last name) is one of ``receivers``."""
    out: dict[str, list[str]] = {}
    for name, path in _modules().items():
        for func in ast.walk(ast.parse(path.read_text())):
            if isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef) and any(
                    isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == method
                    and _receiver(n.func.value) in receivers for n in ast.walk(func)):
                out.setdefault(name, []).append(func.name)
    return out


def test_a_run_is_queued_only_through_the_scheduler() -> None:
    """Created, chained, forked or admitted follow-up: every queued turn reaches the scheduler by
    ``Scheduler.enqueue`` (clients hear the status, then the job waits), and a run's status is
    announced only there and by ``runs.turn.transition`` (every other change of state)."""
    submits = _callers("_submit", ("self", "scheduler", "run_scheduler", "SCHEDULER"))
    assert submits == {"critique_local.runs.scheduler": ["enqueue", "recover"]}
    assert _callers("submit", ("self", "scheduler", "run_scheduler", "SCHEDULER")) == {}
    statuses = _callers("status", ("hub",))
    assert statuses == {"critique_local.runs.scheduler": ["enqueue"], "critique_local.runs.turn": ["transition"]}
