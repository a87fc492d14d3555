"""Every repository module a stage's command imports is among that stage's DVC ``deps``.

DVC reruns a stage only when one of its ``deps`` changed, so a module that the
stage imports (directly or through other modules) but that its ``deps`` do not
list lets DVC serve stale outputs after a code change. This test computes each
stage's import closure from the source (``ast``: every ``import``/``from``
statement of ``mom``/``stages`` modules, anywhere in a file, with the package
``__init__`` files that importing a module runs) starting at the module its
``cmd`` runs (``python -m stages.<name>``), and compares it with the stage's
``deps`` in ``dvc.yaml`` and ``ablations/dvc.yaml``. A dependency that is a
folder covers every file below it. ``foreach``/``matrix`` stages are checked
through their templated entry (code paths carry no template).

Run it directly to list what is missing, stage by stage:

    python tests/test_dvc_deps.py
"""
from __future__ import annotations

import ast
import re
import shutil
import sys
from pathlib import Path, PurePosixPath

import yaml

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = ("dvc.yaml", "ablations/dvc.yaml")
PACKAGES = ("mom", "stages")
STAGE_MODULE = re.compile(r"\bpython3?\s+-m\s+((?:mom|stages)(?:\.\w+)+)")


def module_file(root: Path, module: str) -> Path | None:
    """The file that defines ``module`` (``a/b.py`` or ``a/b/__init__.py``), if it is in the repository."""
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def with_parents(module: str) -> list[str]:
    """``a.b.c`` -> ``a``, ``a.b``, ``a.b.c``: importing a module runs its packages' ``__init__``."""
    parts = module.split(".")
    return [".".join(parts[:end]) for end in range(1, len(parts) + 1)]


def imported_modules(root: Path, module: str) -> set[str]:
    """Repository modules that ``module``'s source imports anywhere (top level or inside functions)."""
    path = module_file(root, module)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y / from .. import z
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            # `from a import b` imports the submodule a.b when b is one (else b is a name in a)
            found.update(f"{base}.{alias.name}" for alias in node.names
                         if module_file(root, f"{base}.{alias.name}") is not None)
    return {name for name in found if name.split(".")[0] in PACKAGES and module_file(root, name) is not None}


def import_closure(root: Path, start: str) -> set[str]:
    """Every repository module that running ``python -m start`` imports, ``start`` and its packages included."""
    pending, closure = with_parents(start), set()
    while pending:
        module = pending.pop()
        if module in closure or module_file(root, module) is None:
            continue
        closure.add(module)
        for name in imported_modules(root, module):
            pending.extend(with_parents(name))
    return closure


def stage_entries(root: Path, pipeline: str) -> dict[str, tuple[str, list[str], Path]]:
    """``{stage: (cmd, deps, working directory)}`` of one dvc.yaml; a ``foreach`` stage's
    fields are under ``do``, a ``matrix`` stage's beside ``matrix``."""
    path = root / pipeline
    stages = (yaml.safe_load(path.read_text()) or {}).get("stages", {})
    entries = {}
    for name, stage in stages.items():
        body = stage.get("do", stage) if "foreach" in stage else stage
        cmd = body.get("cmd", "")
        cmd = " ".join(cmd) if isinstance(cmd, list) else cmd
        workdir = (path.parent / body.get("wdir", ".")).resolve()
        entries[f"{pipeline}:{name}"] = (cmd, [str(dep) for dep in body.get("deps", [])], workdir)
    return entries


def covered(file: Path, deps: list[str], workdir: Path, root: Path) -> bool:
    """Whether a dependency names ``file`` or a folder above it (paths relative to ``workdir``)."""
    target = PurePosixPath(file.resolve().relative_to(root.resolve()).as_posix())
    for dep in deps:
        if "${" in dep:
            continue
        try:
            dep_path = PurePosixPath((workdir / dep).resolve().relative_to(root.resolve()).as_posix())
        except ValueError:  # outside the repository (a dataset folder)
            continue
        if target == dep_path or dep_path in target.parents:
            return True
    return False


def missing_deps(root: Path = ROOT, pipelines=PIPELINES) -> dict[str, list[str]]:
    """``{pipeline:stage: [module files its imports reach that its deps do not cover]}``, stages with gaps only."""
    gaps = {}
    for pipeline in pipelines:
        for stage, (cmd, deps, workdir) in stage_entries(root, pipeline).items():
            for start in STAGE_MODULE.findall(cmd):
                files = sorted({module_file(root, module) for module in import_closure(root, start)})
                missing = [file.relative_to(root).as_posix() for file in files
                           if not covered(file, deps, workdir, root)]
                if missing:
                    gaps[stage] = missing
    return gaps


# ----------------------------------------------------------------- tests


def test_every_stage_runs_a_repository_module():
    for pipeline in PIPELINES:
        for stage, (cmd, _, _) in stage_entries(ROOT, pipeline).items():
            modules = STAGE_MODULE.findall(cmd)
            assert modules and all(module_file(ROOT, m) for m in modules), f"{stage}: no stage module in {cmd!r}"


def test_deps_cover_every_imported_module():
    gaps = missing_deps()
    report = "; ".join(f"{stage} lacks {', '.join(files)}" for stage, files in gaps.items())
    assert not gaps, f"add to deps in dvc.yaml / ablations/dvc.yaml: {report}"


def test_closure_follows_imports_through_modules_and_packages(tmp_path):
    for name, text in {
        "stages/__init__.py": "",
        "stages/run.py": "from mom import helper\nimport click\n",
        "mom/__init__.py": "",
        "mom/helper.py": "def f():\n    from mom.sub.deep import g\n",
        "mom/sub/__init__.py": "from . import sibling\n",
        "mom/sub/deep.py": "from ..errors import E\n",
        "mom/sub/sibling.py": "",
        "mom/errors.py": "",
        "mom/unused.py": "",
    }.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert import_closure(tmp_path, "stages.run") == {
        "stages", "stages.run", "mom", "mom.helper", "mom.sub", "mom.sub.deep", "mom.sub.sibling", "mom.errors"}


def test_a_removed_deps_entry_is_reported(tmp_path):
    """The check itself: on a copy of the repository's code and pipelines, dropping
    one needed entry (a file, then a folder) makes exactly that module missing."""
    for folder in PACKAGES:
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for pipeline in PIPELINES:
        (tmp_path / pipeline).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / pipeline, tmp_path / pipeline)
    assert missing_deps(tmp_path) == missing_deps(ROOT)
    before = missing_deps(tmp_path)

    def drop(pipeline: str, stage: str, entry: str) -> None:
        path = tmp_path / pipeline
        data = yaml.safe_load(path.read_text())
        body = data["stages"][stage]
        body = body.get("do", body) if "foreach" in body else body
        body["deps"].remove(entry)
        path.write_text(yaml.safe_dump(data, sort_keys=False))

    drop("dvc.yaml", "graph", "mom/graph.py")
    assert "mom/graph.py" in missing_deps(tmp_path)["dvc.yaml:graph"]
    assert "mom/graph.py" not in before.get("dvc.yaml:graph", [])
    drop("dvc.yaml", "prepare", "mom/datasets")
    assert "mom/datasets/fashion_mnist.py" in missing_deps(tmp_path)["dvc.yaml:prepare"]
    drop("ablations/dvc.yaml", "grid_diffuse", "mom/diffusion.py")
    assert "mom/diffusion.py" in missing_deps(tmp_path)["ablations/dvc.yaml:grid_diffuse"]


if __name__ == "__main__":
    gaps = missing_deps()
    for stage, files in gaps.items():
        print(f"{stage}: {' '.join(files)}")
    sys.exit(1 if gaps else 0)
