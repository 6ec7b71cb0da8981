"""The layout holds: dependencies point one way (``strategies`` and ``tasks`` import nothing from ``app``, and
``strategies`` no model library), the README's architecture table names files that exist, and no source file
grows past ~400 lines without saying why at its top."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("app", "strategies", "tasks", "deploy")
MAX_LINES = 400
LONG_FILE_MARKER = "Why this file is long:"


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", ["strategies", "tasks"])
def test_core_packages_import_nothing_from_app(package):
    offenders = {str(p.relative_to(REPO)): sorted(m for m in imported_modules(p) if m == "app" or m.startswith("app."))
                 for p in sorted((REPO / package).rglob("*.py"))}
    assert {p: m for p, m in offenders.items() if m} == {}


def test_importing_the_strategy_loads_neither_transformers_nor_app():
    # A fresh interpreter: what importing every strategies module really pulls in, imports of imports included.
    modules = sorted(f"strategies.{p.stem}" for p in (REPO / "strategies").glob("*.py") if p.stem != "__init__")
    code = (f"import sys\nfor m in {modules!r}: __import__(m)\n"
            "print(sorted({n.split('.')[0] for n in sys.modules} & {'transformers', 'app'}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr
    assert len(modules) >= 6  # the check covered the package (coldfusion, discovery, fusion, records, ...)


def test_every_path_in_the_readme_architecture_table_exists():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Architecture", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| concept")]
    paths = [p for row in rows for p in re.findall(r"`([\w./-]+\.(?:py|yaml)|[\w-]+/(?:[\w-]+/)*)`", row)]
    assert len(rows) >= 10 and len(paths) >= len(rows)  # every row names at least one file or folder
    assert [p for p in paths if not (REPO / p).exists()] == []


def test_long_source_files_say_why():
    long_files = []
    for folder in SOURCE_DIRS:
        for path in sorted((REPO / folder).rglob("*.py")):
            text = path.read_text()
            if text.count("\n") > MAX_LINES and LONG_FILE_MARKER not in "\n".join(text.splitlines()[:40]):
                long_files.append(f"{path.relative_to(REPO)} ({text.count(chr(10))} lines)")
    assert long_files == []


def test_every_package_is_in_the_wheel():
    # pyproject.toml lists its packages by hand (conf/ ships as app.conf): a new subpackage must be added there,
    # or a plain `pip install .` (CI's test_install, every user without a checkout) would lack it.
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for folder in SOURCE_DIRS
             for p in (REPO / folder).rglob("__init__.py")}
    assert found - listed == set()
