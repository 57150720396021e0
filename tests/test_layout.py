"""The code's layout: no import circle in the product (deferred imports counted), modules that
import on their own, and no module over ~400 lines without a reason stated at its top."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

from tests import REPO

PACKAGES = ("engine", "pipeline", "transforms", "configs", "benchmarks")
MAX_LINES = 400


def product_modules() -> dict[str, str]:
    """{dotted module name: path} of every product module."""
    out = {"run_pipeline": os.path.join(REPO, "run_pipeline.py")}
    for pkg in PACKAGES:
        for folder, _, files in os.walk(os.path.join(REPO, pkg)):
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(folder, f)
                    name = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                    out[name[:-len(".__init__")] if name.endswith(".__init__") else name] = path
    return out


def import_graph(modules: dict[str, str]) -> dict[str, set]:
    """Every import between product modules, at module level or inside a function."""
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for t in targets:
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t != name:
                    deps.add(t)
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set]):
    """One import circle as a list of modules, or None."""
    state, stack = {}, []

    def visit(v):
        state[v] = "open"
        stack.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == "open":
                return stack[stack.index(w):] + [w]
            if w not in state:
                found = visit(w)
                if found:
                    return found
        state[v] = "done"
        stack.pop()
        return None

    for v in sorted(graph):
        if v not in state:
            found = visit(v)
            if found:
                return found
    return None


def test_no_import_circle():
    modules = product_modules()
    assert "engine.weights" in modules and "benchmarks.throughput" in modules
    cycle = find_cycle(import_graph(modules))
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("module", ["engine.weights", "engine.loaders.converted", "engine.checkpoint",
                                    "benchmarks.profile_step"])
def test_module_imports_on_its_own(module):
    proc = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_long_modules_say_why():
    for name, path in product_modules().items():
        text = open(path, encoding="utf-8").read()
        if text.count("\n") > MAX_LINES:
            doc = ast.get_docstring(ast.parse(text)) or ""
            assert f"over {MAX_LINES} lines" in doc, f"{name} has {text.count(chr(10))} lines and no reason at its top"
