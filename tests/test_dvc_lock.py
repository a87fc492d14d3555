"""The committed dvc.lock (the reference run of the default main job) is not
stale in what it ran: every stage of dvc.yaml is in it, with the command DVC
renders today from dvc.yaml and params.yaml and the params values of
params.yaml. (Its hashes of code and data are not compared: a code change that
alters no result leaves the reference run valid, and the data is not here.)

Before the reference run is committed there is nothing to check and the test
says so; tests/test_dvc_workflow.py checks the same function on a lock that a
real run of the tiny pipeline wrote."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PARAMS_FILE = "params.yaml"

pytest.importorskip("dvc.repo", reason="dvc not installed (requirements.txt pins it)")


def lock_mismatches(project: Path) -> list[str]:
    """What differs between ``project``'s dvc.lock and what dvc.yaml + params.yaml
    would run now (an empty list: the lock is current in commands and params)."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo
    from dvc.utils.serialize import load_yaml

    locked = (load_yaml(str(project / "dvc.lock")) or {}).get("stages", {})  # DVC's YAML 1.2 reading: 1e-06 a float
    problems = []
    with Repo(str(project)) as repo:
        pipeline = (project / "dvc.yaml").resolve()
        stages = {stage.name: stage for stage in repo.index.stages if Path(stage.dvcfile.path).resolve() == pipeline}
        for name, stage in stages.items():
            entry = locked.get(name)
            if entry is None:
                problems.append(f"{name}: not in dvc.lock")
                continue
            if entry.get("cmd") != stage.cmd:
                problems.append(f"{name}: command differs: dvc.lock has {entry.get('cmd')!r}, dvc.yaml renders {stage.cmd!r}")
            for dep in stage.deps:
                if isinstance(dep, ParamsDependency):
                    file = Path(dep.def_path).name if dep.def_path else PARAMS_FILE
                    now, then = flat(dep.read_params()), flat(entry.get("params", {}).get(file, {}))
                    for key in sorted(set(now) | set(then)):
                        if now.get(key) != then.get(key):
                            problems.append(f"{name}: param {key}: dvc.lock has {then.get(key)!r}, {file} has {now.get(key)!r}")
    problems += [f"{name}: in dvc.lock, not in dvc.yaml" for name in locked if name not in stages]
    return problems


def flat(params: dict, prefix: str = "") -> dict:
    """``{"mine": {"k_pos": 50}}`` -> ``{"mine.k_pos": 50}`` (a section or single keys, as dvc.yaml lists them)."""
    found = {}
    for key, value in params.items():
        if isinstance(value, dict):
            found.update(flat(value, f"{prefix}{key}."))
        else:
            found[f"{prefix}{key}"] = value
    return found


def committed(project: Path, path: str) -> bool:
    result = subprocess.run(["git", "ls-files", "--error-unmatch", path], cwd=project, capture_output=True)
    return result.returncode == 0


def test_the_committed_reference_lock_matches_dvc_yaml_and_params():
    if not committed(ROOT, "dvc.lock"):
        pytest.skip("no dvc.lock committed yet: run the default main job (bash scripts/repro.sh) and commit "
                    "the reference run (README: Share a run)")
    problems = lock_mismatches(ROOT)
    assert not problems, ("dvc.lock is stale (rerun `bash scripts/repro.sh` and commit the run): "
                          + "; ".join(problems))
