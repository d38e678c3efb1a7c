"""The package's shape: the import contracts hold, the top level stays small, every subpackage only re-exports,
nothing outside the package reaches a private name inside it, and every name the README shows imports."""

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "featurestore"
OUTSIDE = [*sorted((ROOT / "tests").glob("*.py")), *sorted((ROOT / "benchmarks").glob("*.py")),
           *sorted((ROOT / "pipelines").glob("*.py"))]


def test_the_import_contracts_hold_layers_and_no_cycles():
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint), "--config", str(ROOT / "pyproject.toml")], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "2 kept, 0 broken" in result.stdout


def test_the_top_level_holds_at_most_ten_files_and_every_module_says_what_it_is_for():
    assert len([p for p in PACKAGE.iterdir() if p.suffix == ".py"]) <= 10
    for path in PACKAGE.rglob("*.py"):
        assert ast.get_docstring(ast.parse(path.read_text())), f"{path.relative_to(ROOT)} has no module docstring"


@pytest.mark.parametrize("init", sorted(PACKAGE.glob("*/**/__init__.py")), ids=lambda p: str(p.parent.name))
def test_every_subpackage_init_only_re_exports_with_all(init):
    tree = ast.parse(init.read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):  # the docstring
            continue
        assert isinstance(node, ast.ImportFrom | ast.Assign), f"{init}: {ast.dump(node)[:80]} is not a re-export"
        if isinstance(node, ast.Assign):
            names |= {target.id for target in node.targets}
    assert "__all__" in names
    module = importlib.import_module(".".join(init.relative_to(ROOT).parent.parts))
    for name in module.__all__:
        assert getattr(module, name) is not None


def private_references(path: Path) -> list[str]:
    """``featurestore…`` names starting with one underscore that ``path`` imports or reads as attributes."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("featurestore"):
            parts = node.module.split(".") + [alias.name for alias in node.names]
            found += [f"{node.module}: {part}" for part in parts if part.startswith("_") and not part.startswith("__")]
    return found


@pytest.mark.parametrize("path", OUTSIDE, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_nothing_outside_the_package_reaches_a_private_name_inside_it(path):
    assert not private_references(path)


def readme_references() -> list[str]:
    """Every ``from featurestore… import a, b`` in the README's and the docs/ pages' code, and every dotted
    ``featurestore.x.Name``."""
    text = "\n".join(path.read_text() for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
    found = []
    for module, names in re.findall(r"from (featurestore[\w.]*) import ([\w, ]+)", text):
        found += [f"{module}:{name.strip()}" for name in names.split(",") if name.strip()]
    for dotted in re.findall(r"`(featurestore(?:\.\w+)+)", text):
        module, _, name = dotted.rpartition(".")
        found.append(f"{module}:{name}")
    return sorted(set(found))


@pytest.mark.parametrize("reference", readme_references())
def test_every_name_the_readme_shows_imports(reference):
    module, name = reference.split(":")
    try:
        target = importlib.import_module(module)
    except ModuleNotFoundError:
        pytest.fail(f"the README names {module}.{name}, but there is no module {module}")
    assert hasattr(target, name) or importlib.util.find_spec(f"{module}.{name}"), f"{module} has no {name}"


def test_the_readme_references_are_found():
    references = readme_references()
    assert "featurestore:FeatureStore" in references and "featurestore:extract_features" in references
