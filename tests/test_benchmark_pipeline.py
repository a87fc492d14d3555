"""benchmarks/pipeline.py runs the repository's real mining stages (their dvc.yaml definitions) in its workspace."""
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import pipeline  # noqa: E402

SMALL = {"anchors.strategy": "stationary", "anchors.count": 10, "diffuse.k": 50, "mine.k_neg": 50}


@pytest.fixture
def workspace(tmp_path):
    pipeline.make_workspace(tmp_path, 600, "giant", SMALL, cache_type="")
    return tmp_path


def test_workspace_stages_are_the_repository_stages(workspace):
    repository = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    stages = yaml.safe_load((workspace / "dvc.yaml").read_text())["stages"]
    assert list(stages) == list(pipeline.MINING_STAGES)
    for name, definition in stages.items():
        assert definition == repository[name]  # commands, deps, params and outs as the repository has them
        assert f"python -m stages.{name} ${{{name}}}" in definition["cmd"]
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    defaults = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section in pipeline.MINING_STAGES:
        changed = {key for key in defaults[section] if params[section][key] != defaults[section][key]}
        assert changed == {key.split(".")[1] for key in SMALL if key.startswith(section + ".")}
    for package in ("mom", "stages"):  # the stages' code deps, this checkout's
        assert (workspace / package / "diffusion.py").is_file() if package == "mom" else \
            (workspace / package / "diffuse.py").is_file()


@pytest.mark.slow
def test_repro_runs_every_stage_then_nothing_and_k_neg_touches_only_mine(workspace):
    results = pipeline.run_stages(workspace)
    assert set(results) == set(pipeline.MINING_STAGES)
    for name, info in results.items():
        assert info["stage_seconds"] >= 0 and info["peak_rss_gib"] > 0, name  # the stage logged its time
        assert all(size is not None for size in info["outputs_mib"].values()), name
    assert (workspace / "data/mine/pools.parquet").is_file()
    after = pipeline.second_repro_and_status(workspace)
    assert after["second_repro"]["up_to_date"]
    assert after["k_neg_change_stale_stages"] == ["mine"]
