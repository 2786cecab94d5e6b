"""The layer contracts: who may import whom.

The library's contracts live in pyproject.toml ([tool.importlinter]) and are checked here by
import-linter itself, so `python -m pytest` alone keeps them. Pages are scripts, not a package,
so their rule is checked from their source.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGE_SCRIPTS = sorted((ROOT / "pages").glob("*.py")) + [ROOT / "streamlit_app.py"]
PAGE_MAY_IMPORT = {"streamlit", "app", "lorita"}


def _top_level_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("script", PAGE_SCRIPTS, ids=lambda p: p.name)
def test_pages_import_only_app_lorita_and_streamlit(script: Path):
    outside = {
        name
        for name in _top_level_imports(script) - PAGE_MAY_IMPORT
        if name not in sys.stdlib_module_names and name != "__future__"
    }
    assert not outside, f"{script.name} imports {sorted(outside)}: move that work into app/"


def test_import_contracts_hold():
    """lorita never imports app/streamlit/plotly, the run store never imports the engine, and
    the library's modules import each other without a cycle."""
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True, no_logo=True))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout, out.stdout[-4000:]


def test_library_imports_without_posix_only_modules():
    """`import lorita` must work on Windows: no top-level fcntl / resource / termios."""
    posix_only = {"fcntl", "resource", "termios", "pwd", "grp"}
    for path in sorted((ROOT / "lorita").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in tree.body:  # module level only: a guarded import inside a function is fine
            if isinstance(node, ast.Import):
                mods = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                mods = {node.module.split(".")[0]}
            else:
                continue
            assert not mods & posix_only, f"{path.relative_to(ROOT)} imports {mods & posix_only}"
