"""DVC the way its users work, on the tiny main pipeline (one run shared by the
tests of this module, which run in order):

- a run is committed with the README's ``git add`` (dvc.lock, DVC's .gitignore
  files, the small metrics, plot data and reports) and nothing is left over;
  the lock it wrote passes the committed-lock check (tests/test_dvc_lock.py);
- through a local remote, a fresh clone's ``dvc pull --with-deps graph`` then
  ``dvc repro`` reruns only stages after graph (those whose cached outputs it
  did not pull; evaluate and proxy_retrieval, whose small outputs came with
  git, only if their inputs' bytes changed), and ``dvc metrics diff --all``
  prints the committed values beside the new ones;
- ``dvc exp run -S`` changes one line of params.yaml, says nothing about the
  Table 1 grid, and ``dvc exp show`` lists at most 25 metrics;
- ``dvc plots diff`` of two experiments draws both in every data plot.
"""
from __future__ import annotations

import json
import re

import pytest
import yaml

import tiny_pipeline
from test_dvc_lock import lock_mismatches
from tiny_pipeline import commit_run, dvc, dvc_run, git

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not tiny_pipeline.HAVE_FASHION, reason="dataset-fashion-mnist not installed")]

PIPELINE = yaml.safe_load((tiny_pipeline.ROOT / "dvc.yaml").read_text())["stages"]
UP_TO_GRAPH = ("prepare", "extract", "graph")
AFTER_GRAPH = [name for name in PIPELINE if name not in UP_TO_GRAPH]


def cached(entry) -> bool:
    return not isinstance(entry, dict) or next(iter(entry.values())).get("cache", True)


# Stages after graph with an output in the DVC cache (not in git): a clone that pulled up to graph lacks it.
CACHED_AFTER_GRAPH = {name for name in AFTER_GRAPH if any(cached(entry) for entry in PIPELINE[name].get("outs", []))}
MAX_METRICS = 25
EXPERIMENTS = {"k20": ["graph.k=20"], "lr2": ["finetune.lr=0.002"]}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """The tiny project: its code committed, then the main job run and committed as the README says."""
    folder = tiny_pipeline.make_project(tmp_path_factory.mktemp("reference") / "project")
    git(folder, "add", "-A")
    git(folder, "commit", "-q", "-m", "the project")
    result = dvc_run(folder, "repro")
    assert "grid" not in result.stdout + result.stderr, "the main job talks about the Table 1 grid"
    commit_run(folder, "reference run")
    return folder


def ran_stages(output: str) -> list[str]:
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")]


def test_the_readme_commit_leaves_nothing_behind_and_its_lock_is_current(project):
    assert git(project, "status", "--porcelain") == "", "a run left files that git add did not cover"
    tracked = set(git(project, "ls-files").splitlines())
    assert {"dvc.lock", "data/.gitignore", "data/features/.gitignore", "metrics/evaluate.json",
            "data/finetune/live/metrics.json", "plots/recall_at_k/new_images.json"} <= tracked
    assert not {"data/features/train.npy", "data/finetune/model.pt", "data/graph/adjacency.npz"} & tracked, \
        "DVC-cached outputs belong in the DVC cache, not in git"
    assert not [path for path in tracked if path.startswith("data/") and (project / path).stat().st_size > 200_000]
    assert lock_mismatches(project) == []
    for command in (("metrics", "show"), ("plots", "show")):  # nothing about the grid's unbuilt files
        result = dvc_run(project, *command)
        assert "ERROR" not in result.stderr and "WARNING" not in result.stderr, (command, result.stderr)
    assert git(project, "status", "--porcelain") == "", "dvc plots show wrote outside dvc_plots/ (git-ignored)"


def test_a_fresh_clone_pulls_up_to_the_graph_and_reruns_only_what_follows(project, tmp_path):
    storage = tmp_path / "dvc-storage"
    dvc(project, "remote", "add", "--default", "shared", str(storage))
    git(project, "add", ".dvc/config")
    git(project, "commit", "-q", "-m", "DVC remote")
    dvc(project, "push")

    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(project), str(clone))
    assert not (clone / "data" / "graph" / "adjacency.npz").exists()
    dvc(clone, "pull", "--with-deps", "graph")
    for output in ("data/graph/adjacency.npz", "data/features/train.npy", "data/prepared/train/pixels.npy"):
        assert (clone / output).read_bytes() == (project / output).read_bytes(), output
    assert not (clone / "data" / "anchors" / "anchors.parquet").exists(), "pulled more than graph needs"

    reproduced = dvc(clone, "repro")
    ran = set(ran_stages(reproduced))
    # Every stage whose cached outputs were not pulled runs; evaluate and proxy_retrieval write only
    # small outputs that came with git, so they run only if the rerun above changed their inputs' bytes.
    assert CACHED_AFTER_GRAPH <= ran <= set(AFTER_GRAPH), reproduced
    for stage in (*UP_TO_GRAPH, *(set(AFTER_GRAPH) - ran)):
        assert f"Stage '{stage}' didn't change, skipping" in reproduced
    compared = dvc(clone, "metrics", "diff", "--all")
    assert "metrics/evaluate.json" in compared and "HEAD" in compared and "workspace" in compared, compared
    assert "new_classes.finetuned.recall_at_1" in compared


def test_exp_run_changes_one_params_line_says_nothing_about_the_grid_and_shows_few_metrics(project):
    for name, overrides in EXPERIMENTS.items():
        git(project, "checkout", "-q", "--", "params.yaml", "dvc.lock")  # each experiment from the reference run
        result = dvc_run(project, "exp", "run", "-n", name, *[arg for override in overrides for arg in ("-S", override)])
        said = result.stdout + result.stderr
        assert "grid" not in said and "WARNING" not in said, said[-3000:]
        changed = [line for line in git(project, "diff", "-U0", "HEAD", "--", "params.yaml").splitlines()
                   if line[:1] in "+-" and not line.startswith(("+++", "---"))]
        assert len(changed) == 2, changed  # one line out, one line in

    shown = dvc_run(project, "exp", "show", "--no-pager", "--json")
    assert "failed to load" not in shown.stderr, shown.stderr
    for row in json.loads(shown.stdout):
        for experiment in [row, *(run for group in row.get("experiments") or [] for run in group["revs"])]:
            metrics = (experiment.get("data") or {}).get("metrics") or {}
            count = sum(leaf_count(entry.get("data", {})) for entry in metrics.values())
            assert 0 < count <= MAX_METRICS, (experiment.get("name") or experiment["rev"], count)
    status = dvc(project, "status")
    assert "grid" not in status


def leaf_count(value) -> int:
    return sum(leaf_count(item) for item in value.values()) if isinstance(value, dict) else 1


def test_plots_diff_of_two_experiments_draws_both_in_every_data_plot(project, tmp_path):
    dvc(project, "plots", "diff", *EXPERIMENTS, "-o", str(tmp_path / "plots"))
    html = (tmp_path / "plots" / "index.html").read_text()
    specs = dict(re.findall(r'<div id = "([^"]*)">\s*<script type = "text/javascript">\s*var spec = (\{.*?\});', html,
                            re.S))
    for plot in ("Recall_K__new_images", "Recall_K__unseen_classes", "Fine-tuning_loss", "Tuples_with_a_non-zero_loss",
                 "Validation_Recall_1", "Proxy_retrieval_mAP__new_images", "Proxy_retrieval_mAP__unseen_classes"):
        (spec,) = [json.loads(text) for name, text in specs.items() if name.startswith(plot)]
        values = spec["data"]["values"]
        assert {value["rev"] for value in values} == set(EXPERIMENTS), plot
        if plot.startswith("Recall_K"):
            assert {(value["rev"], value["field"]) for value in values} == {
                (rev, field) for rev in EXPERIMENTS for field in ("initial", "start", "finetuned")}
    for figure in ("recall_at_k", "training"):  # the PNGs of both runs, for reading offline
        assert all(f"static/{rev}_plots_{figure}.png" in html for rev in EXPERIMENTS)
