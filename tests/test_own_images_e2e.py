"""The README's "Use your own images" story, end to end (issue 17): its command,
read from README.md and run verbatim (the folder put in place of
``/path/to/images``) with ``dvc exp run`` in a fresh project holding the real
params.yaml, on ~100 real photographs (scikit-image's bundled samples, cropped
and flipped) plus one corrupt JPEG. Checks that every stage runs, DVC says
nothing about the Table 1 grid, the corrupt file is reported, the sizes chosen
by ``auto`` are in the reports, the metrics hold the label-free evaluation of
the held-out images, and the search command answers a query.

    python tests/test_own_images_e2e.py /path/to/images [project-dir]

runs the same command on any folder (a scratch project; prints the timings and
the label-free numbers), as the issue's 60 / 1,000 / 20,000-image checks did.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_pipeline  # noqa: E402
from photo_folder import CORRUPT_NAME, make_photo_folder  # noqa: E402

ROOT = tiny_pipeline.ROOT
PLACEHOLDER = "/path/to/images"
SECTION = "## Use your own images"


def readme_command(readme: Path = ROOT / "README.md") -> str:
    """The first ``dvc exp run`` command of the README's own-images section
    (indented code, backslash continuations joined)."""
    text = readme.read_text()
    section = text[text.index(SECTION):]
    section = section[:section.find("\n## ", len(SECTION))]
    lines = [line.strip() for line in section.splitlines() if line.startswith("    ")]
    start = next(i for i, line in enumerate(lines) if line.startswith("dvc exp run"))
    command = []
    for line in lines[start:]:
        command.append(line.rstrip("\\").strip())
        if not line.endswith("\\"):
            break
    command = " ".join(command)
    assert PLACEHOLDER in command, f"the README's command has no {PLACEHOLDER}: {command}"
    return command


def own_images_project(folder: Path) -> Path:
    """A fresh git + DVC project with the code, the pipelines and the real params.yaml, committed."""
    project = tiny_pipeline.make_project(folder)
    shutil.copy(ROOT / "params.yaml", project / "params.yaml")
    tiny_pipeline.git(project, "add", "-A")
    tiny_pipeline.git(project, "commit", "-q", "-m", "the project")
    return project


def run_readme_command(project: Path, images: Path, env: dict | None = None) -> tuple[subprocess.CompletedProcess, float]:
    command = readme_command().replace(PLACEHOLDER, str(images))
    start = time.perf_counter()
    result = subprocess.run(["bash", "-c", command], cwd=project, capture_output=True, text=True,
                            env=env or tiny_pipeline.environment(project))
    return result, time.perf_counter() - start


def chosen_sizes(project: Path) -> dict:
    """Every size ``auto`` chose, from the stages' reports."""
    reports = ["data/features/report.json", "data/graph/report.json", "data/anchors/report.json",
               "data/diffuse/report.json", "data/mine/purity.json", "data/finetune/summary.json",
               "reports/proxy_retrieval.json"]
    sizes = {}
    for path in reports:
        sizes.update(json.loads((project / path).read_text()).get("auto_sizes", {}))
    holdout = json.loads((project / "data/prepared/report.json").read_text()).get("holdout")
    if holdout:
        sizes["prepare.holdout"] = holdout
    return sizes


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("own")
    images = base / "photos"
    made = make_photo_folder(images, 100)
    project = own_images_project(base / "project")
    result, _ = run_readme_command(project, images)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return project, images, made, result


@pytest.mark.slow
def test_readme_command_runs_every_stage_quietly(run):
    project, _, _, result = run
    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    ran = [line.split("'")[1] for line in result.stdout.splitlines() if line.startswith("Running stage '")]
    assert sorted(ran) == sorted(stages)
    output = result.stdout + result.stderr
    assert "grid" not in output and "ablations" not in output, "DVC talks about the Table 1 grid"


@pytest.mark.slow
def test_corrupt_file_is_reported_and_held_out_images_never_train(run):
    project, _, made, _ = run
    report = json.loads((project / "data/prepared/report.json").read_text())
    assert [entry["path"] for entry in report["rejected"]] == [CORRUPT_NAME]
    counts = {split: report["splits"][split]["count"] for split in ("train", "new_images")}
    assert counts["train"] + counts["new_images"] == made["images"]
    assert report["holdout"]["count"] == 20 and report["holdout"]["of"] == made["images"] + 1, \
        "auto: n/5 of the 101 files held out (the corrupt one among them or not)"
    from mom.imagestore import ImageStore
    train = set(ImageStore.open(project / "data/prepared/train").origins)
    held_out = set(ImageStore.open(project / "data/prepared/new_images").origins)
    assert not train & held_out


@pytest.mark.slow
def test_auto_sizes_fit_the_collection_and_are_reported(run):
    project, _, _, _ = run
    sizes = chosen_sizes(project)
    assert sizes["extract.scales"]["value"] == [224], "photographs: 224 px"
    assert sizes["proxy_retrieval.scales"]["value"] == [224] and sizes["finetune.image_size"]["value"] == [224]
    assert {name: sizes[name]["value"] for name in ("graph.k", "diffuse.k", "mine.k_neg", "mine.k_pos")} == {
        "graph.k": 16, "diffuse.k": 27, "mine.k_neg": 27, "mine.k_pos": 8}, "81 training images"
    assert sizes["finetune.batch_size"]["value"] >= 2


@pytest.mark.slow
def test_metrics_hold_the_label_free_evaluation(run):
    project, _, _, _ = run
    metrics = json.loads((project / "metrics/evaluate.json").read_text())
    label_free = metrics["label_free"]["new_images"]
    for version in ("initial", "finetuned"):
        assert 0 <= label_free[version]["manifold_agreement_at_9"] <= 1
    assert 0 <= label_free["neighbours_kept_at_9"] <= 1
    assert set(metrics["proxy_map"]) == {"new_images"}
    assert set(metrics["proxy_map"]["new_images"]["strong"]) == {"initial", "finetuned"}
    assert metrics["evaluations"] == ("ran: label-free new_images, proxy; not run: R@K/NMI new_images (unlabeled), "
                                      "new_classes (no images), retrieval (no ground truth)")
    assert (project / "plots/recall_at_k.png").read_bytes()[:4] == b"\x89PNG"
    assert [path.name for path in (project / "plots/recall_at_k").iterdir()] == ["no_labels.json"]
    assert "new_images" not in metrics and "new_classes" not in metrics


@pytest.mark.slow
def test_search_answers_a_query_file(run, tmp_path):
    project, images, _, _ = run
    query = sorted((images / "astronaut").iterdir())[0]
    sheet = tmp_path / "sheet.png"
    result = subprocess.run([sys.executable, "-m", "stages.search", "--query", str(query), "--k", "3", "--json",
                             "--sheet", str(sheet)], cwd=project, capture_output=True, text=True,
                            env=tiny_pipeline.environment(project))
    assert result.returncode == 0, result.stderr[-3000:]
    answer = json.loads(result.stdout)["queries"][0]
    assert len(answer["finetuned"]) == 3 and len(answer["initial"]) == 3
    assert answer["finetuned"][0]["similarity"] > 0.9, "the query file itself is in the collection"
    assert sheet.read_bytes()[:4] == b"\x89PNG"


def main(images: Path, project_dir: Path) -> None:
    """Run the README's command on ``images`` in a scratch project; print timings and numbers."""
    if project_dir.exists():
        shutil.rmtree(project_dir)
    project = own_images_project(project_dir)
    result, seconds = run_readme_command(project, images, env={**tiny_pipeline.environment(project),
                                                               "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2",
                                                               "OPENBLAS_NUM_THREADS": "2"})
    print(result.stdout[-3000:], result.stderr[-6000:], sep="\n")
    print(f"exit status {result.returncode}, {seconds:.0f} s")
    if result.returncode == 0:
        seconds_per_stage = {line.split(": ")[0].split()[-1]: float(re.findall(r"finished in ([\d.]+) s", line)[0])
                             for line in result.stderr.splitlines() if "finished in" in line}
        print(json.dumps({"sizes": {name: entry["value"] if isinstance(entry, dict) and "value" in entry else entry
                                    for name, entry in chosen_sizes(project).items()},
                          "stage_seconds": seconds_per_stage,
                          "metrics": json.loads((project / "metrics/evaluate.json").read_text())}, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2] if len(sys.argv) > 2 else "/tmp/own-images-project"))
