"""The house has layers and every import points down (docs/architecture.md, "Layers").

    bipe < models < data < tasks < evaluation < training < train.py, eval.py, bench/

Every module's imports are parsed, those inside functions included: a module may import its
own package and the packages below it, never one above; the project's modules form no circle;
the encoding library imports torch and the standard library only. An import inside a function
that reaches into the project must say why it is lazy (a `# lazy:` comment on or just above
it), so imports are not tucked into functions to hide a circle.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

LAYERS = ["bipe", "models", "data", "tasks", "evaluation", "training"]
ENTRY = ["train", "eval", "bench"]  # may import every layer
RANK = {name: i for i, name in enumerate(LAYERS)} | {name: len(LAYERS) for name in ENTRY}
PROJECT = set(RANK)
BIPE_ALLOWED = {"torch", "__future__"} | set(sys.stdlib_module_names)


def module_files() -> dict[str, Path]:
    files = {}
    for top in PROJECT:
        base = ROOT / top
        paths = [base.with_suffix(".py")] if base.with_suffix(".py").is_file() else \
            sorted(base.rglob("*.py"))
        for path in paths:
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            files[name] = path
    return files


FILES = module_files()


def imports(name: str, path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for every import statement of a module."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []

    def visit(node: ast.AST, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and getattr(child.test, "id", "") == "TYPE_CHECKING":
                continue  # annotations only: never imported at run time
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                out.extend((a.name, child.lineno, nested) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - child.level + 1]
                    module = ".".join(base + ([child.module] if child.module else []))
                else:
                    module = child.module or ""
                out.append((module, child.lineno, nested))
                for alias in child.names:  # `from pkg import submodule`
                    full = f"{module}.{alias.name}"
                    if full in FILES:
                        out.append((full, child.lineno, nested))
            visit(child, inner)

    visit(tree, False)
    return out


def project_target(module: str) -> str | None:
    """The project module an import names (the longest known prefix), or None."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in FILES:
            return candidate
    return None


def test_every_import_points_down():
    wrong = []
    for name, path in FILES.items():
        top = name.split(".")[0]
        for module, line, _ in imports(name, path):
            other = module.split(".")[0]
            if other in PROJECT and other != top and RANK[other] >= RANK[top]:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {module} "
                             f"({other} is not below {top})")
    assert not wrong, "\n".join(wrong)


def test_the_encoding_library_imports_torch_and_the_standard_library_only():
    wrong = [f"{path.relative_to(ROOT)}:{line} imports {module}"
             for name, path in FILES.items() if name.split(".")[0] == "bipe"
             for module, line, _ in imports(name, path)
             if module.split(".")[0] not in BIPE_ALLOWED | {"bipe"}]
    assert not wrong, "\n".join(wrong)


def test_the_project_has_no_import_cycle():
    graph = {name: sorted({t for m, _, _ in imports(name, path)
                           if (t := project_target(m)) and t != name})
             for name, path in FILES.items()}
    # A package imports its own submodules to re-export them; that is not a circle back up.
    for name in graph:
        graph[name] = [t for t in graph[name] if not t.startswith(name + ".")]
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := walk(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in graph:
        if node not in state and (cycle := walk(node)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_a_lazy_project_import_says_why():
    unexplained = []
    for name, path in FILES.items():
        lines = path.read_text().splitlines()
        for module, line, nested in imports(name, path):
            if not nested or module.split(".")[0] not in PROJECT:
                continue
            context = " ".join(lines[max(0, line - 6): line])
            if "lazy" not in context.lower():
                unexplained.append(f"{path.relative_to(ROOT)}:{line} imports {module} inside a "
                                   "function without a `# lazy: <why>` comment")
    assert not unexplained, "\n".join(unexplained)
