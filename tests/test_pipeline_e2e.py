"""The whole pipeline through ``dvc repro`` in a throw-away git + DVC project:
a few hundred Fashion-MNIST images at 64 px, one epoch, every stage of dvc.yaml
and none of the Table 1 grid (ablations/dvc.yaml, also in the project)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mom import artifacts, networks
from mom.training_log import read_training_log

ROOT = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist")

# Small params on top of params.yaml: the structure is the real one.
SMALL = {
    "prepare": {"per_class": 40, "val_per_class": 10, "new_images_per_class": 20},
    "graph": {"k": 10},
    "diffuse": {"k": 40, "block_size": 32},
    "mine": {"k_pos": 15, "k_neg": 40, "positive_cap": 15, "negative_cap": 15},
    "finetune": {"epochs": 1, "batch_size_embed": 128, "threads": 1},
    "whiten": {"method": "pca", "dim": 64},  # 200 training items: keep the leading components
    "evaluate": {"kmeans_n_init": 2},
    "proxy_retrieval": {"objects": 50, "views_in_database": 2},
}


def dvc(project, *args):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(project), "DVC_NO_ANALYTICS": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result.stdout


@pytest.fixture
def project(tmp_path):
    for folder in ("mom", "stages"):
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    (tmp_path / "ablations").mkdir()
    shutil.copy(ROOT / "ablations" / "dvc.yaml", tmp_path / "ablations" / "dvc.yaml")
    for name in (".dvcignore", ".gitignore"):  # the grid hidden from the main pipeline; checkpoints out of git
        shutil.copy(ROOT / name, tmp_path / name)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in SMALL.items():
        if section in params:  # stages that are not wired yet are skipped
            params[section].update(values)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    dvc(tmp_path, "init", "-q")
    shutil.copy(ROOT / ".dvc" / "config", tmp_path / ".dvc" / "config")
    return tmp_path


@pytest.mark.slow
@pytest.mark.skipif(not (FASHION / "train-images-idx3-ubyte.gz").is_file(),
                    reason="Debian package dataset-fashion-mnist not installed (scripts/setup.sh installs it)")
def test_dvc_repro_runs_every_stage_end_to_end(project):
    output = dvc(project, "repro")
    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    ran = [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")]
    assert sorted(ran) == sorted(stages), f"a bare dvc repro runs exactly the main stages, ran {ran}"
    grid = yaml.safe_load((project / "ablations" / "dvc.yaml").read_text())["stages"]
    assert not set(grid) & set(stages) and not (project / "data" / "grid").exists()

    report = artifacts.load_json(project / "reports" / "evaluate.json")
    headline = artifacts.load_json(project / "metrics" / "evaluate.json")
    for split, items in (("new_images", 100), ("new_classes", 200)):
        assert report[split]["items"] == items and report[split]["classes"] == 5
        for version in ("initial", "start", "finetuned"):
            assert set(report[split][version]) == {"recall_at_1", "recall_at_2", "recall_at_4", "recall_at_8", "nmi", "f1"}
            assert 0.2 <= report[split][version]["recall_at_1"] <= 1.0
        assert set(headline[split]) == {"initial", "finetuned"}
        assert headline[split]["finetuned"] == {key: report[split]["finetuned"][key]
                                                for key in ("recall_at_1", "recall_at_8", "nmi", "f1")}
    assert set(headline["proxy_map"]) == {"new_images", "new_classes"}
    assert report["whitening"]["method"] == "pca"
    net, extra = networks.load_checkpoint(project / "data" / "finetune" / "model.pt")
    assert net.dim == 1280 and net.head is None and extra["embedding"]["scales"] == [64]  # no head: the default
    log = read_training_log(project / "data" / "finetune" / "live")
    assert [row["epoch"] for row in log] == [0, 1]
    for figure in ("recall_at_k.png", "training.png"):
        assert (project / "plots" / figure).stat().st_size > 0
    assert not list((project / "checkpoints" / "finetune").glob("*.pt"))

    shown = dvc(project, "metrics", "show")
    assert "new_classes.finetuned.recall_at_1" in shown and "val_recall_at_1" in shown
    assert "Running stage" not in dvc(project, "repro"), "a second repro has nothing to do"
