"""The house rules of docs/architecture.md, enforced: one-way imports between the rooms
(import-linter contracts in pyproject.toml), no import cycle between modules, small modules and
functions, and a command line that answers --help without importing torch."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lorakit"
grimp = pytest.importorskip("grimp")
pytest.importorskip("importlinter")


def _lint(root: Path, cwd: Path):
    """import-linter's contracts from ``root``'s pyproject.toml, over the package found first on the path."""
    code = ("import sys; from importlinter.cli import lint_imports; "
            f"sys.exit(lint_imports(config_filename={str(root / 'pyproject.toml')!r}))")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=300,
                          env={"PYTHONPATH": str(cwd), "PATH": "/usr/bin:/bin", "HOME": str(cwd)})


def test_the_import_contracts_hold():
    proc = _lint(ROOT, ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "Contracts: 3 kept, 0 broken" in proc.stdout


def test_a_core_module_importing_training_or_quantization_breaks_the_contract(tmp_path):
    shutil.copytree(PACKAGE, tmp_path / "lorakit", ignore=shutil.ignore_patterns("__pycache__"))
    layers = tmp_path / "lorakit" / "core" / "layers.py"
    layers.write_text(layers.read_text() + "\n\ndef _oops():\n    from ..training import loop  # noqa\n"
                      "    from ..quant import bnb  # noqa\n")
    proc = _lint(ROOT, tmp_path)
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert "lorakit.core.layers -> lorakit.training.loop" in proc.stdout
    assert "lorakit.core.layers -> lorakit.quant.bnb" in proc.stdout


def _cycles(graph, modules: set[str]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.find_modules_directly_imported_by(v) & modules:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while True:
                w = stack.pop()
                on.discard(w)
                part.append(w)
                if w == v:
                    break
            if len(part) > 1:
                out.append(sorted(part))

    for m in sorted(modules):
        if m not in index:
            visit(m)
    return out


def test_no_import_cycle_anywhere():
    graph = grimp.build_graph("lorakit")
    modules = {m for m in graph.modules if m != "lorakit"}  # the root's lazy names are imported on first use
    assert _cycles(graph, modules) == []


def _python_files():
    return sorted(PACKAGE.rglob("*.py"))


def test_modules_stay_small():
    long = {str(p.relative_to(ROOT)): n for p in _python_files() if (n := len(p.read_text().splitlines())) > 450}
    assert not long, f"modules over 450 lines: {long}"


def test_functions_stay_short():
    long = []
    for p in _python_files():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 80:
                    long.append(f"{p.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, f"functions over 80 lines: {long}"


def test_no_private_name_is_imported_from_another_module():
    found = []
    for p in _python_files():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom):
                found += [f"{p.relative_to(ROOT)}: {node.module}.{a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
    assert not found, found


def test_help_and_usage_errors_do_not_import_torch():
    # every command's parser (train's is built from the config dataclasses), then a usage error
    code = ("import sys; from lorakit.cli import main; from lorakit.cli.main import build_parser; build_parser(); "
            "assert main(['train', '--lora.rr', '4']) == 2; "
            "print(sorted(m for m in ('torch', 'transformers', 'safetensors', 'yaml') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
