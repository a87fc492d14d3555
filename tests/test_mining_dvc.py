"""DVC wiring of the mining stages: params rendered into the commands, and what reruns on a change."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from banana import banana_features
from mom import artifacts
from mom.imagestore import write_image_store

ROOT = Path(__file__).resolve().parents[1]
MINING_STAGES = ("graph", "anchors", "diffuse", "mine")


def dvc(project, *args):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(project), "DVC_NO_ANALYTICS": "1"}
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.fixture
def project(tmp_path):
    """A throw-away DVC project with the real mining stages, their params and small inputs."""
    shutil.copytree(ROOT / "mom", tmp_path / "mom", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "stages", tmp_path / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    pipeline = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(
        {"stages": {name: pipeline["stages"][name] for name in MINING_STAGES}}, sort_keys=False))
    params = {name: params[name] for name in MINING_STAGES}
    params["diffuse"]["k"] = params["mine"]["k_neg"] = 100  # the real defaults may exceed this small collection
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    dvc(tmp_path, "init", "-q")
    shutil.copy(ROOT / ".dvc" / "config", tmp_path / ".dvc" / "config")
    features, curve, _ = banana_features(n_per_curve=100, n_curves=3)
    artifacts.save_npy(tmp_path / "data/features/train.npy", features)
    write_image_store(tmp_path / "data/prepared/train", (np.zeros((2, 2), np.uint8) for _ in curve),
                      {"source": ["banana"] * 300, "split": ["train"] * 300,
                       "origin": [str(i) for i in range(300)], "label": curve.tolist()})
    return tmp_path


def set_param(project, section, key, value):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params[section][key] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def ran(output):
    return {name for name in MINING_STAGES if f"Running stage '{name}'" in output}


@pytest.mark.slow
def test_param_changes_rerun_only_downstream_stages(project):
    assert ran(dvc(project, "repro")) == set(MINING_STAGES)
    assert (project / "data/mine/pools.parquet").is_file()
    assert ran(dvc(project, "repro")) == set()
    set_param(project, "mine", "k_pos", 20)
    assert ran(dvc(project, "repro")) == {"mine"}
    set_param(project, "anchors", "strategy", "stationary")
    set_param(project, "anchors", "count", 20)
    assert "graph" not in ran(dvc(project, "repro"))
    # their reports are plain cache: false outputs (committed with the run), not DVC metrics
    for report in ("data/graph/report.json", "data/diffuse/report.json", "data/mine/purity.json"):
        assert (project / report).is_file(), report
