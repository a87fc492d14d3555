"""The whole pipeline through ``dvc repro`` in a throw-away git + DVC project:
a few hundred Fashion-MNIST images at 64 px, one epoch, every stage of dvc.yaml
and none of the Table 1 grid (ablations/dvc.yaml, also in the project)."""
import pytest
import yaml

import tiny_pipeline as tiny
from mom import artifacts, networks
from mom.training_log import read_training_log

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


@pytest.fixture
def project(tmp_path):
    return tiny.make_project(tmp_path, SMALL)


def dvc(project, *args):
    return tiny.dvc(project, *args)


@pytest.mark.slow
@pytest.mark.skipif(not tiny.HAVE_FASHION,
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
    assert "new_classes.finetuned.recall_at_1" in shown and "val_recall_at_1" not in shown  # headline only
    assert "Running stage" not in dvc(project, "repro"), "a second repro has nothing to do"
