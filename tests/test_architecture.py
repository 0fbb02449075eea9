"""The package's shape: imports flow one way, and backend knowledge lives in one adapter.

Parsed from the source, imports inside functions included, so a cycle or a
private Keras attribute hidden in a function body is found too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "keras_l2"
ADAPTER = "keras_l2.backend"
# Keras, TensorFlow, JAX and PyTorch internals may only be touched by the adapter.
FRAMEWORKS = ("tensorflow", "jax", "torch")
MAX_LINES = 300


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


MODULES = _modules()


def _trees() -> dict[str, ast.AST]:
    return {name: ast.parse(path.read_text(), str(path)) for name, path in MODULES.items()}


def _imported(name: str, tree: ast.AST) -> set[str]:
    """The keras_l2 modules `name` imports, anywhere in its body."""
    found = set()
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "keras_l2"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "keras_l2":
                continue
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in MODULES else base)
    found.discard(name)
    return {module for module in found if module in MODULES}


def _graph() -> dict[str, set[str]]:
    return {name: _imported(name, tree) for name, tree in _trees().items()}


def test_the_import_graph_has_no_cycle():
    graph = _graph()
    done, on_path, cycles = set(), [], []

    def visit(node):
        if node in on_path:
            cycles.append(on_path[on_path.index(node):] + [node])
            return
        if node in done:
            return
        on_path.append(node)
        for target in sorted(graph[node]):
            visit(target)
        on_path.pop()
        done.add(node)

    for module in sorted(graph):
        visit(module)
    assert not cycles, "import cycles in keras_l2: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_cycle_check_finds_a_cycle():
    """The checker itself: a cycle through a function-level import is caught."""
    source = {"keras_l2.a": "def f():\n    from keras_l2 import b\n", "keras_l2.b": "from keras_l2.a import f\n"}
    saved = dict(MODULES)
    try:
        MODULES.update({name: PACKAGE / (name.rpartition(".")[2] + ".py") for name in source})
        graph = {name: _imported(name, ast.parse(text)) for name, text in source.items()}
    finally:
        MODULES.clear()
        MODULES.update(saved)
    assert graph == {"keras_l2.a": {"keras_l2.b"}, "keras_l2.b": {"keras_l2.a"}}


def _own_private_names(trees) -> set[str]:
    """Every `_name` keras_l2 defines itself: functions, classes, attributes, module globals."""
    names = set()
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
    return {name for name in names if name.startswith("_")}


def _private_uses(tree, own: set[str]) -> list[str]:
    uses = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            if node.attr not in own:
                uses.append(f"line {node.lineno}: .{node.attr}")
        # getattr(model, "_jax_state", None) and friends.
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in (
                "getattr", "hasattr", "setattr") and len(node.args) >= 2:
            key = node.args[1]
            if (isinstance(key, ast.Constant) and isinstance(key.value, str) and key.value.startswith("_")
                    and not key.value.startswith("__") and key.value not in own):
                uses.append(f"line {node.lineno}: {node.func.id}(..., {key.value!r})")
    return uses


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m != ADAPTER and not m.startswith(ADAPTER + ".")))
def test_no_backend_branch_or_framework_internal_outside_the_adapter(module):
    trees = _trees()
    tree = trees[module]
    own = _own_private_names(trees)
    problems = _private_uses(tree, own)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "backend" and isinstance(node.ctx, ast.Load):
            parent = node.value
            if isinstance(parent, ast.Attribute) and parent.attr == "backend":
                problems.append(f"line {node.lineno}: keras.backend.backend() (a backend branch)")
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names if alias.name.split(".")[0] in FRAMEWORKS]
            problems += [f"line {node.lineno}: import {name}" for name in names]
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in FRAMEWORKS:
            problems.append(f"line {node.lineno}: from {node.module} import ...")
    assert not problems, f"{module} reaches into a backend (move it to {ADAPTER}): {problems}"


def test_the_private_attribute_check_finds_one():
    tree = ast.parse("def f(model):\n    return model._flatten_layers()\n")
    assert _private_uses(tree, own=set()) == ["line 2: ._flatten_layers"]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_is_over_300_lines(module):
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{module} has {lines} lines (at most {MAX_LINES}): split it by concept"


def test_tests_import_their_helpers_one_way():
    """`from helpers import` beside `from tests.helpers import` loads two copies of the module."""
    tests = Path(__file__).resolve().parent
    other = [f"{path.name}:{number}" for path in sorted(tests.glob("*.py"))
             for number, line in enumerate(path.read_text().splitlines(), start=1)
             if line.strip().startswith(("from helpers import", "import helpers", "from mlflow_server import"))]
    assert not other, f"import helpers as `from tests.helpers import ...`: {other}"
