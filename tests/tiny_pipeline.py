"""The one harness for end-to-end tests: a throw-away git + DVC copy of the
project with small params (:data:`TINY`: 70 Fashion-MNIST training images, or
the caller's), ``dvc`` in it, and the rendered stage commands of its
``dvc.yaml`` for tests that run the real stage commands as subprocesses (no
network, kill-and-rerun, corrupt inputs)."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist")
HAVE_FASHION = (FASHION / "train-images-idx3-ubyte.gz").is_file()

# Small params on top of params.yaml (the structure is the real one).
TINY = {
    "prepare": {"per_class": 14, "val_per_class": 4, "new_images_per_class": 4},  # PCA head init: >= 64 items
    "extract": {"batch_size": 64, "threads": 1},
    "graph": {"k": 8, "threads": 1},
    "diffuse": {"k": 20, "block_size": 16, "threads": 1},
    "mine": {"k_pos": 8, "k_neg": 20, "positive_cap": 8, "negative_cap": 8},
    "finetune": {"epochs": 1, "batch_size_embed": 64, "threads": 1},
    "whiten": {"method": "pca", "dim": 32},
    "evaluate": {"kmeans_n_init": 1},
    "proxy_retrieval": {"objects": 20, "views_in_database": 1, "threads": 1},
}
MINING_STAGES = ("prepare", "extract", "graph", "anchors", "diffuse", "mine")
# The main pipeline (a bare ``dvc repro``) and the Table 1 grid (``dvc repro ablations/dvc.yaml``).
PIPELINES = ("dvc.yaml", "ablations/dvc.yaml")


# Files of the project's DVC set-up: the grid hidden from the main pipeline (.dvcignore),
# the script that shows it for one command and the one that runs its cells at once;
# .gitignore keeps checkpoints out of git.
PROJECT_FILES = (".dvcignore", ".gitignore", "scripts/with_grid.sh", "scripts/grid.py")


def make_project(folder: Path, params: dict | None = None) -> Path:
    """Copy mom/, stages/, the pipelines (dvc.yaml, ablations/dvc.yaml), the
    project's DVC set-up and small params (``params``, default :data:`TINY`) into
    ``folder`` (a git + DVC project)."""
    for name in ("mom", "stages"):
        shutil.copytree(ROOT / name, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
    for relative in (*PIPELINES, *PROJECT_FILES):
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / relative, folder / relative)
    write_tiny_params(folder / "params.yaml", TINY if params is None else params)
    subprocess.run(["git", "init", "-q"], cwd=folder, check=True)
    dvc(folder, "init", "-q")  # keeps the copied .dvcignore
    shutil.copy(ROOT / ".dvc" / "config", folder / ".dvc" / "config")
    return folder


def write_tiny_params(path: Path, values: dict = TINY) -> None:
    """params.yaml with ``values`` (section -> key -> value) set the way `dvc exp
    run -S` sets them (the file keeps the real one's form: block lists, comments)."""
    from dvc.utils.hydra import apply_overrides

    shutil.copy(ROOT / "params.yaml", path)
    sections = yaml.safe_load(path.read_text())
    apply_overrides(str(path), [f"{section}.{key}={json.dumps(value)}" for section, entries in values.items()
                                if section in sections for key, value in entries.items()])


def environment(project: Path, **extra: str) -> dict:
    """Subprocess environment: the project's code first, one thread each (the
    machine is shared), no analytics."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "PYTHONPATH": str(project), "DVC_NO_ANALYTICS": "1", "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", **extra}


def dvc(project: Path, *args: str, env: dict | None = None) -> str:
    return dvc_run(project, *args, env=env).stdout


def dvc_run(project: Path, *args: str, env: dict | None = None, grid: bool = False) -> subprocess.CompletedProcess:
    """``dvc args`` in ``project`` (stdout and stderr); ``grid``: with the Table 1
    grid visible, through scripts/with_grid.sh as scripts/repro.sh runs it."""
    command = [sys.executable, "-m", "dvc", *args]
    if grid:
        command = ["bash", "scripts/with_grid.sh", *command]
    result = subprocess.run(command, cwd=project, env=env or environment(project), capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


def dvc_grid(project: Path, *args: str) -> str:
    """``dvc args`` with the Table 1 grid (ablations/dvc.yaml) visible."""
    return dvc_run(project, *args, grid=True).stdout


# The default pipeline: these stages and everything upstream of them (the
# Table 1 grid of matrix stages, ablations/dvc.yaml, is not part of it).
DEFAULT_TARGETS = ("evaluate", "proxy_retrieval")


def stage_commands(project: Path, targets: tuple[str, ...] = DEFAULT_TARGETS) -> dict[str, list[str]]:
    """The command line of ``targets`` and their upstream stages as DVC renders
    it from dvc.yaml and params.yaml (read from ``dvc repro --dry``, which runs
    nothing), in run order, as argv lists whose ``python`` is this interpreter."""
    output = dvc(project, "repro", "--dry", "--force", *targets)
    commands, stage = {}, None
    for line in output.splitlines():
        if line.startswith("Running stage '"):
            stage = line.split("'")[1]
        elif line.startswith("> ") and stage:
            argv = shlex.split(line[2:])
            commands[stage] = [sys.executable if argv[0] == "python" else argv[0], *argv[1:]]
            stage = None
    return commands


def stage_outputs(project: Path) -> dict[str, list[str]]:
    """Each stage's declared outputs (outs, metrics, plots) from dvc.yaml."""
    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    declared = {}
    for name, stage in stages.items():
        paths = []
        for key in ("outs", "metrics", "plots"):
            for entry in stage.get(key, []):
                paths.append(next(iter(entry)) if isinstance(entry, dict) else entry)
        declared[name] = paths
    return declared


def output_files(project: Path, paths: list[str]) -> dict[str, bytes]:
    """Every file of the given outputs (relative path -> bytes), with the
    ``.tmp-`` files of atomic writes in progress: inside folder outputs, and
    ``.tmp-<name>-*`` beside file outputs."""
    found = {}
    for path in paths:
        target = project / path
        if target.is_dir():
            files = sorted(p for p in target.rglob("*") if p.is_file())
        else:
            files = [target] if target.is_file() else []
            files += sorted(target.parent.glob(f".tmp-{target.name}-*")) if target.parent.is_dir() else []
        for file in files:
            found[file.relative_to(project).as_posix()] = file.read_bytes()
    return found


def run_stage(project: Path, argv: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, cwd=project, env=env or environment(project), capture_output=True, text=True)
    assert result.returncode == 0, f"{argv[:3]} failed:\n{result.stderr[-4000:]}"
    return result


# What to commit after a run (README, "Share a run"): DVC's lock, the .gitignore files DVC
# writes beside its outputs and the small cache: false outputs (metrics, plot data, reports).
RUN_FILES = ("dvc.lock", "data", "metrics", "plots", "reports")


def git(folder: Path, *args: str) -> str:
    command = ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid", *args]
    return subprocess.run(command, cwd=folder, check=True, capture_output=True, text=True).stdout


def commit_run(project: Path, message: str) -> None:
    """``git add`` what the README says to commit after a run, then commit."""
    git(project, "add", *[path for path in RUN_FILES if (project / path).exists()])
    git(project, "commit", "-q", "-m", message)
