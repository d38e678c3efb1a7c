"""dvc.yaml declares what each stage really reads: every featurestore module its script imports (directly or
through other modules, at any depth, including imports inside functions) and every params section it loads.
A stage whose code or params can change without DVC noticing would silently keep a stale output."""

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "featurestore"


def module_path(name: str) -> Path | None:
    """featurestore.a.b → featurestore/a/b.py or featurestore/a/b/__init__.py (None if not ours)."""
    if name != "featurestore" and not name.startswith("featurestore."):
        return None
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def lazy_homes(package: str) -> dict[str, str]:
    """A subpackage's lazily re-exported names (``_HOMES`` in its ``__init__``: name → module relative to it)."""
    init = module_path(package)
    if init is None or init.name != "__init__.py":
        return {}
    for node in ast.parse(init.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_HOMES" for t in node.targets):
            return ast.literal_eval(node.value)
    return {}


def resolve_relative(package: str, home: str) -> str:
    """``home`` (``"train"`` or ``".configs"``) relative to ``package``, as an absolute module name."""
    level = len(home) - len(home.lstrip(".")) + 1
    anchor = package.split(".")
    return ".".join(anchor[: len(anchor) - level + 1] + [home.lstrip(".")])


def imported_modules(path: Path) -> set[str]:
    """featurestore modules imported anywhere in ``path`` (relative imports resolved; a name that a subpackage
    re-exports lazily counts as an import of its home module). The package's own ``__init__`` is read for its
    top-level imports only: its lazy ``__getattr__`` imports serve notebooks."""
    tree = ast.parse(path.read_text())
    parts = path.relative_to(ROOT).with_suffix("").parts
    package = ".".join(parts[:-1])  # the package a relative import starts from (also for an __init__)
    nodes = tree.body if path == PACKAGE / "__init__.py" else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
            homes = lazy_homes(base)
            found |= {resolve_relative(base, homes[alias.name]) for alias in node.names if alias.name in homes}
    modules = set()
    for name in found:
        while name and module_path(name) is None:
            name = name.rpartition(".")[0]
        if name:
            modules.add(name)
            parent = name.rpartition(".")[0]
            while parent:  # importing a.b.c runs a/__init__ and a/b/__init__
                modules.add(parent)
                parent = parent.rpartition(".")[0]
    return modules


def closure(script: Path) -> set[Path]:
    """Files of every featurestore module the script imports, transitively."""
    todo, seen = [script], set()
    while todo:
        path = todo.pop()
        for name in imported_modules(path):
            target = module_path(name)
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return {p.relative_to(ROOT) for p in seen}


def params_sections(script: Path) -> set[str]:
    """The params sections a stage script reads: ``load_params("x")``, and ``store_settings("x", store)`` (which
    reads ``stores`` too, as ``store_entry`` does)."""
    text = script.read_text()
    sections = set(re.findall(r'load_params\("([^"]+)"\)', text)) | set(re.findall(r'store_settings\("([^"]+)"', text))
    return sections | ({"stores"} if re.search(r"\bstore_(settings|entry)\(", text) else set())


def stages() -> list[tuple[str, dict]]:
    return list(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items())


def declared(stage: dict) -> tuple[list[str], list[str]]:
    body = stage.get("do", stage)
    return [str(d) for d in body.get("deps", [])], [str(p) for p in body.get("params", [])]


@pytest.mark.parametrize("name, stage", stages(), ids=[name for name, _ in stages()])
def test_every_module_and_params_section_a_stage_reads_is_declared(name, stage):
    deps, params = declared(stage)
    script = ROOT / re.search(r"python (pipelines/\S+\.py)", stage.get("do", stage)["cmd"]).group(1)
    assert str(script.relative_to(ROOT)) in deps
    missing = sorted(str(module) for module in closure(script)
                     if not any(str(module) == d or str(module).startswith(d.rstrip("/") + "/") for d in deps))
    assert not missing, f"stage {name} imports modules it does not declare as deps: {missing}"
    undeclared = sorted(section for section in params_sections(script)
                        if not any(p == section or p.startswith(section + ".") for p in params))
    assert not undeclared, f"stage {name} reads params sections it does not declare: {undeclared}"


def test_the_closure_follows_imports_inside_functions_through_modules_and_lazy_re_exports():
    deps = closure(ROOT / "pipelines" / "export.py")
    assert Path("featurestore/deploy/export.py") in deps
    assert Path("featurestore/encode/fingerprint.py") in deps  # imported inside export.backbone_for
    assert not any(str(path).startswith("featurestore/extract") for path in deps)
    assert Path("featurestore/encode/backbones/efficientnet_lite.py") in deps  # through backbones/__init__
    heads = closure(ROOT / "pipelines" / "train_head.py")  # train_head is re-exported lazily by featurestore.heads
    assert {Path("featurestore/heads/train.py"), Path("featurestore/heads/streaming.py")} <= heads


def test_every_store_names_its_data_and_a_backbone_with_sections():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert "export" not in params  # every store is exported: data/export/<store>.onnx
    for name, entry in params["stores"].items():
        assert set(entry) >= {"data", "backbone"}, f"stores.{name} must name its data and backbone"
        for section in ("extract", "plateau", "finetune", "curve"):
            assert entry["backbone"] in params[section], f"params {section} has no entry for {entry['backbone']}"


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "pipelines").glob("*.py") if p.name != "_params.py"))
def test_every_stage_imports_the_featurestore_of_its_own_workspace(script):
    """A queued `dvc exp run` runs the stages in a temporary copy of the project: each stage script imports
    _params (which puts its project first on sys.path) before featurestore, so the copy's code runs, not the
    editable install's."""
    lines = (ROOT / "pipelines" / script).read_text().splitlines()
    first = {kind: next(i for i, line in enumerate(lines) if re.match(pattern, line))
             for kind, pattern in (("params", r"from _params import"), ("package", r"(from|import) featurestore"))}
    assert first["params"] < first["package"]


def test_a_stage_in_a_copy_of_the_project_imports_the_copys_package(tmp_path):
    copy = tmp_path / "project"
    (copy / "pipelines").mkdir(parents=True)
    shutil.copy(ROOT / "pipelines" / "_params.py", copy / "pipelines")
    (copy / "featurestore").mkdir()
    (copy / "featurestore" / "__init__.py").write_text("WHERE = 'the copy'\n")
    (copy / "pipelines" / "probe.py").write_text("import _params  # noqa: F401\nimport featurestore\n"
                                                 "print(featurestore.WHERE)\n")
    result = subprocess.run([sys.executable, str(copy / "pipelines" / "probe.py")], capture_output=True, text=True,
                            check=True, cwd=tmp_path)
    assert result.stdout.strip() == "the copy"


def test_the_lock_file_holds_only_the_stages_of_the_pipeline():
    """DVC keeps a lock entry of a stage dvc.yaml no longer has (30 of the 63 after the stores were renamed). Every
    stage that runs rewrites the whole lock file, so each stale entry slowed every stage of a head experiment."""
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        names = {stage.addressing.rpartition(":")[2] for stage in repo.index.stages}
    locked = set(yaml.safe_load((ROOT / "dvc.lock").read_text())["stages"])
    assert locked == names, f"stale: {sorted(locked - names)}, missing: {sorted(names - locked)}"
