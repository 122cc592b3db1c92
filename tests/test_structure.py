"""The package's shape: every module imports on its own, imports flow one way, and no module or
function outgrows what a reader can hold (docs/design.md, "Module map")."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "spec2vol_bids"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80  # statements, the docstring not counted


def _modules() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


IMPORT_EACH = """
import importlib, os, sys
# the libraries spec2vol uses, loaded once: each module is then imported in a forked copy of
# this interpreter that has loaded nothing of spec2vol_bids
import numpy, scipy.fft, pandas, torch, mne, nibabel, matplotlib, bids, nilearn.image
failed = 0
for module in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(module)
        except BaseException as exc:
            print(f"{module}: {type(exc).__name__}: {exc}", file=sys.stderr)
            os._exit(1)
        os._exit(0)
    failed += os.waitpid(pid, 0)[1] != 0
sys.exit(1 if failed else 0)
"""


def test_every_module_imports_alone_in_a_fresh_interpreter():
    """An import cycle shows when a module of the cycle is imported first: each is, alone."""
    modules = [m for m in _modules() if not m.endswith("__main__")]
    proc = subprocess.run([sys.executable, "-c", IMPORT_EACH, *modules], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


def test_no_module_level_import_cycles():
    graph = {}
    known = set(_modules())
    for module in known:
        path = PACKAGE.parent / (module.replace(".", "/") + ".py")
        if not path.exists():
            path = PACKAGE.parent / module.replace(".", "/") / "__init__.py"
        edges = set()
        for node in ast.parse(path.read_text()).body:  # module level only: lazy imports are not cycles
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # "from package import submodule" depends on the submodule, not on the package
                for alias in node.names:
                    target = f"{node.module}.{alias.name}"
                    target = target if target in known else node.module
                    if target in known and target != module:
                        edges.add(target)
            elif isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name in known}
        graph[module] = edges
    cycles = []

    def visit(node, stack):
        for nxt in graph[node]:
            if nxt in stack:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif len(stack) < 25:
                visit(nxt, stack + [nxt])

    for module in sorted(graph):
        visit(module, [module])
    assert not cycles, "\n".join(sorted(set(cycles))[:10])


def test_no_module_or_function_outgrows_a_reader():
    too_long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{path.relative_to(PACKAGE)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = node.body[0]
                docstring = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str)
                start = first.end_lineno + 1 if docstring else node.lineno
                if node.end_lineno - start + 1 > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}: "
                                    f"{node.end_lineno - start + 1} lines")
    assert not too_long, "\n".join(too_long)
