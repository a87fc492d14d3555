"""The Table 1 grid, its own pipeline ablations/dvc.yaml: the cells DVC renders
from the root params.yaml (rows x seeds), the options each cell's commands end up
with, that the main pipeline's DVC commands do not see the grid (.dvcignore) while
the grid, shown by scripts/with_grid.sh, reuses the root stages' outputs, that a
key every row overrides is in no cell's command, and that a new seed runs only the
new cells (real ``dvc repro ablations/dvc.yaml`` of one row on tiny data)."""
import shlex
import subprocess
import sys

import pytest
import yaml

from mom import artifacts
from stages import evaluate, finetune, mine, proxy_retrieval, whiten
from tests.tiny_pipeline import HAVE_FASHION, ROOT, dvc, dvc_grid, dvc_run, environment, make_project

GRID_FILE = "ablations/dvc.yaml"
GRID_STAGES = ("grid_mine", "grid_finetune", "grid_whiten", "grid_evaluate", "grid_proxy")
ANCHOR_STAGES = ("grid_anchors", "grid_diffuse")
MAIN_STAGES = tuple(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])
# The root stages whose outputs the grid reads (built or skipped as root stages).
UPSTREAM = ("prepare", "extract", "graph", "anchors", "diffuse")
# The report's "untrained start" row comes from the main pipeline's evaluate report.
START_ROW_UPSTREAM = ("mine", "finetune", "whiten", "proxy_retrieval", "evaluate")
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
ROWS = PARAMS["grid"]["rows"]
SEEDS = PARAMS["grid"]["seeds"]
ANCHOR_SETS = PARAMS["grid"]["anchor_sets"]
ROOT_ANCHORS = {"anchors": "data/anchors", "diffuse": "data/diffuse"}
# The paper's Table 1 rows: (positives, negatives, weighted loss).
TABLE_1 = {("euclidean", "random", False), ("manifold", "random", False), ("euclidean", "manifold", False),
           ("manifold", "manifold", False), ("manifold", "manifold", True)}


def set_params(project, **sections):
    params = yaml.safe_load((project / "params.yaml").read_text())
    for section, values in sections.items():
        params[section].update(values)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def stage_name(name: str) -> str:
    """``ablations/dvc.yaml:grid_mine@row0-0`` -> ``grid_mine@row0-0`` (root stages have no prefix)."""
    return name.removeprefix(f"{GRID_FILE}:")


def ran_stages(output: str) -> list[str]:
    return [stage_name(line.split("'")[1]) for line in output.splitlines() if line.startswith("Running stage '")]


def rendered_commands(project, *targets: str) -> dict[str, list[str]]:
    """Stage name -> argv, as ``dvc repro --dry --force [targets]`` renders them (runs nothing)."""
    commands, stage = {}, None
    for line in dvc_grid(project, "repro", "--dry", "--force", *targets).splitlines():
        if line.startswith("Running stage '"):
            stage = stage_name(line.split("'")[1])
        elif line.startswith("> ") and stage:
            commands[stage] = shlex.split(line[2:])
            stage = None
    return commands


def parsed(command, argv: list[str]) -> dict:
    """The option values click gives the stage for this command line (later options win)."""
    assert argv[:2] == ["python", "-m"] and argv[2].startswith("stages."), argv[:3]
    return command.make_context(argv[2], list(argv[3:])).params


def anchor_set_of(row: dict) -> str | None:
    """The grid anchor set a row trains on (None: the root pipeline's anchors)."""
    if {key: row[key] for key in ROOT_ANCHORS} == ROOT_ANCHORS:
        return None
    name = row["anchors"].split("/")[-2]
    assert row["anchors"] == f"data/grid_anchors/{name}/anchors"
    assert row["diffuse"] == f"data/grid_anchors/{name}/diffuse"
    return name


def is_hdml_axis(row: dict) -> bool:
    """A row of the HDML comparison: a head, labels, or HDML synthesis (the MoM rows have none)."""
    tuned = row["finetune"]
    return bool(tuned.get("head_dim") or tuned.get("supervision", "none") != "none"
                or tuned.get("synthesis", "none") != "none")


def test_params_grid_is_the_papers_table_1():
    fine_grained = [row for row in ROWS if anchor_set_of(row) is None and not is_hdml_axis(row)]
    assert {(r["mine"]["positives"], r["mine"]["negatives"], r["finetune"]["weighted"]) for r in fine_grained} == TABLE_1
    assert len(SEEDS) == 3 and len(set(SEEDS)) == 3
    for row in (row for row in ROWS if not is_hdml_axis(row)):
        weighted = "_weighted" if row["finetune"]["weighted"] else ""
        anchors = "" if anchor_set_of(row) is None else f"anchors-{anchor_set_of(row)}_"
        assert row["name"] == f"{anchors}pos-{row['mine']['positives']}_neg-{row['mine']['negatives']}{weighted}"


def test_the_hdml_rows_are_hdmls_table_1_and_mom_with_and_without_synthesis_on_one_head():
    axis = [row for row in ROWS if is_hdml_axis(row)]
    assert {row["finetune"]["head_dim"] for row in axis} == {512}, "one head for every row compared"
    supervised = {(row["finetune"].get("loss", "triplet"), row["finetune"].get("synthesis", "none")): row
                  for row in axis if row["finetune"].get("supervision") == "labels"}
    assert set(supervised) == {(loss, synthesis) for loss in ("triplet", "npair") for synthesis in ("none", "hdml")}
    for (loss, synthesis), row in supervised.items():
        assert row["name"] == f"labels_{'hdml-' if synthesis == 'hdml' else ''}{loss}"
        assert row["finetune"]["weighted"] is False
    unsupervised = [row for row in axis if row["finetune"].get("supervision", "none") != "labels"]
    assert [row["name"] for row in unsupervised] == ["head-512_pos-manifold_neg-manifold_weighted",
                                                     "hdml-kmeans_head-512_pos-manifold_neg-manifold_weighted"]
    recipes = [{key: value for key, value in row["finetune"].items() if not key.startswith(("hdml_", "synthesis",
                                                                                           "supervision"))}
               for row in unsupervised]
    assert recipes[0] == recipes[1] and unsupervised[0]["mine"] == unsupervised[1]["mine"], \
        "MoM + HDML differs from MoM by the synthesis only"
    for row in axis:
        if row["finetune"].get("synthesis") == "hdml":
            assert isinstance(row["finetune"]["hdml_alpha"], float) and isinstance(row["finetune"]["hdml_beta"], float)


def test_the_anchor_axis_compares_stationary_and_random_anchors_of_one_size_on_one_recipe():
    assert {name: spec["strategy"] for name, spec in ANCHOR_SETS.items()} == {"stationary": "stationary",
                                                                             "random": "random"}
    assert len({spec["count"] for spec in ANCHOR_SETS.values()}) == 1
    axis = [row for row in ROWS if anchor_set_of(row) is not None]
    assert sorted(anchor_set_of(row) for row in axis) == sorted(ANCHOR_SETS)
    recipes = [{key: row[key] for key in ("mine", "finetune")} for row in axis]
    assert all(recipe == recipes[0] for recipe in recipes)


def test_stage_list_shows_rows_times_seeds_cells_per_grid_stage(tmp_path):
    project = make_project(tmp_path)
    listed = dict(line.split(None, 1) for line in dvc_grid(project, "stage", "list", GRID_FILE).splitlines()
                  if line.strip())
    listed = {stage_name(name): description for name, description in listed.items()}
    for stage in GRID_STAGES:
        cells = sorted(name for name in listed if name.startswith(f"{stage}@"))
        assert cells == sorted(f"{stage}@row{r}-{seed}" for r in range(len(ROWS)) for seed in SEEDS)
        for r, row in enumerate(ROWS):
            for seed in SEEDS:
                assert listed[f"{stage}@row{r}-{seed}"].startswith(f"{row['name']}_seed-{seed}:")
    for stage in ANCHOR_STAGES:
        assert sorted(name for name in listed if name.startswith(f"{stage}@")) == sorted(
            f"{stage}@{name}" for name in ANCHOR_SETS)
    assert "report" in listed and "pool_figure" in listed


def test_bare_repro_runs_the_main_pipeline_only_and_the_grid_reuses_its_outputs(tmp_path):
    project = make_project(tmp_path)
    listed = [line.split()[0] for line in dvc(project, "stage", "list").splitlines() if line.strip()]
    assert listed == list(MAIN_STAGES)
    assert sorted(rendered_commands(project)) == sorted(MAIN_STAGES)
    # the main pipeline's commands do not see the grid; with_grid.sh shows it for one command only
    status = dvc(project, "status")
    assert "grid" not in status and all(f"{stage}:" in status for stage in MAIN_STAGES), status
    assert "grid_mine@row0-0" in dvc_grid(project, "status", GRID_FILE)
    assert not (project / "ablations" / ".dvcignore").exists()
    assert "grid" not in dvc(project, "status")
    # the grid's upstream are the root stages themselves (no prefix), and only those it reads
    grid_run = rendered_commands(project, GRID_FILE)
    assert {name.split("@")[0] for name in grid_run} == {*UPSTREAM, *START_ROW_UPSTREAM, *ANCHOR_STAGES, *GRID_STAGES, "grid_prefix",
                                                        "report", "pool_figure"}
    # one file for every knob: the grid reads the root params.yaml (no ablations/params.yaml)
    assert not (project / "ablations" / "params.yaml").exists()


def test_each_cell_runs_its_variant_and_seed_into_its_own_folder(tmp_path):
    project = make_project(tmp_path)
    commands = rendered_commands(project, GRID_FILE)
    folders = set()
    for r, row in enumerate(ROWS):
        for seed in SEEDS:
            cell = f"{row['name']}_seed-{seed}"
            folder = f"data/grid/{cell}"
            folders.add(folder)
            mined = parsed(mine.main, commands[f"grid_mine@row{r}-{seed}"])
            assert (mined["positives"], mined["negatives"], mined["seed"]) == (
                row["mine"]["positives"], row["mine"]["negatives"], seed)
            assert mined["out_dir"] == f"{folder}/mine"
            assert (mined["anchors_path"], mined["manifold_path"]) == (
                f"{row['anchors']}/anchors.parquet", f"{row['diffuse']}/manifold_knn.parquet")
            tuned = parsed(finetune.main, commands[f"grid_finetune@row{r}-{seed}"])
            assert (tuned["weighted"], tuned["seed"]) == (row["finetune"]["weighted"], seed)
            assert str(tuned["pools_path"]) == f"{folder}/mine/pools.parquet"
            assert str(tuned["out_dir"]) == f"{folder}/finetune"
            assert str(tuned["checkpoint_dir"]) == f"checkpoints/grid/{cell}"
            assert str(tuned["anchors_path"]) == f"{row['anchors']}/anchors.parquet"
            whitened = parsed(whiten.main, commands[f"grid_whiten@row{r}-{seed}"])
            assert str(whitened["model_path"]) == f"{folder}/finetune/model.pt"
            assert str(whitened["out_dir"]) == f"{folder}/whiten"
            assert str(whitened["knn_path"]) == f"{row['diffuse']}/manifold_knn.parquet"
            evaluated = parsed(evaluate.main, commands[f"grid_evaluate@row{r}-{seed}"])
            assert str(evaluated["model_path"]) == f"{folder}/finetune/model.pt"
            assert str(evaluated["whitening_path"]) == f"{folder}/whiten/whitening.npz"
            assert str(evaluated["report_path"]) == f"metrics/grid/{cell}.json"
            assert (evaluated["metrics_path"], evaluated["proxy_path"]) == ("", ""), "no headline per cell"
            proxied = parsed(proxy_retrieval.main, commands[f"grid_proxy@row{r}-{seed}"])
            assert (proxied["model_path"], proxied["whitening_path"]) == (f"{folder}/finetune/model.pt",
                                                                          f"{folder}/whiten/whitening.npz")
            assert str(proxied["report_path"]) == f"metrics/grid_proxy/{cell}.json"
    assert len(folders) == len(ROWS) * len(SEEDS)
    # every other option comes from the stage's own section, as in the main pipeline
    sections = yaml.safe_load((project / "params.yaml").read_text())
    tuned = parsed(finetune.main, commands["grid_finetune@row0-0"])
    assert (tuned["epochs"], tuned["batch_size_embed"]) == (sections["finetune"]["epochs"],
                                                           sections["finetune"]["batch_size_embed"])
    assert parsed(mine.main, commands["grid_mine@row0-0"])["k_neg"] == sections["mine"]["k_neg"]


def overridden_by_every(overrides: list[dict]) -> set[str]:
    return set.intersection(*(set(override) for override in overrides))


# The options a grid stage passes one by one (not as the whole `${section}`): the section,
# and the override dicts of its cells (grid rows' or anchor sets'); each cell also sets `seed` itself
# where the grid has seeds.
ONE_BY_ONE = {"grid_mine": ("mine", [row["mine"] for row in ROWS], {"seed"}),
              "grid_anchors": ("anchors", list(ANCHOR_SETS.values()), set())}


@pytest.mark.parametrize("stage", sorted(ONE_BY_ONE))
def test_grid_cells_pass_every_key_their_cells_do_not_all_override(stage):
    """A grid stage that lists its section's options one by one lists every key
    except those that every cell overrides (which must not be in its command:
    changing them would make every cell stale for nothing)."""
    section, overrides, set_by_grid = ONE_BY_ONE[stage]
    grid = yaml.safe_load((ROOT / GRID_FILE).read_text())["stages"][stage]
    body = grid.get("do", grid)
    tracked = {entry.removeprefix(f"{section}.") for entry in body["params"]}
    expected = set(PARAMS[section]) - overridden_by_every(overrides) - set_by_grid
    assert tracked == expected, f"{GRID_FILE} {stage}: params should be {section}.{sorted(expected)}"
    for key in expected:
        assert f"--{key} ${{{section}.{key}}}" in body["cmd"], f"{stage}: pass --{key} ${{{section}.{key}}}"
    assert f"${{{section}}}" not in body["cmd"], f"{stage}: the whole section would carry the overridden keys"


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_FASHION, reason="Debian package dataset-fashion-mnist not installed")
def test_a_new_seed_runs_only_the_new_cells(tmp_path):
    project = make_project(tmp_path)
    first = ROWS[0]["name"]
    set_params(project, grid={"rows": ROWS[:1], "seeds": [0], "anchor_sets": {"random": {"strategy": "random", "count": 5}}},
               pool_figure={"ours": f"{first}_seed-0", "baseline": f"{first}_seed-0", "members": 2})
    ran = ran_stages(dvc_grid(project, "repro", GRID_FILE))
    assert sorted(ran) == sorted([*UPSTREAM, *START_ROW_UPSTREAM, *(f"{stage}@random" for stage in ANCHOR_STAGES),
                                  *(f"{stage}@row0-0" for stage in GRID_STAGES), "grid_prefix", "report", "pool_figure"]), ran
    table = (project / "reports" / "table1.md").read_text()
    assert f"| {first} | 1 |" in table and "| initial features | — |" in table
    assert "new images R@1" in table and "new classes proxy mAP strong" in table and "P+ purity" in table
    assert (project / "reports" / "pools.png").stat().st_size > 0
    cell = artifacts.load_json(project / "metrics" / "grid" / f"{first}_seed-0.json")
    assert 0 <= cell["new_images"]["finetuned"]["recall_at_1"] <= 1
    assert 0 <= cell["new_classes"]["finetuned"]["recall_at_1"] <= 1
    # the cells do not score the initial features again: Table 1's initial row is the main job's
    assert "initial" not in cell["new_images"] and "initial" not in cell["new_classes"]
    main_report = artifacts.load_json(project / "reports" / "evaluate.json")
    initial_row = artifacts.load_json(project / "reports" / "table1.json")["initial features"]
    assert initial_row["new_images_recall_at_1"]["mean"] == main_report["new_images"]["initial"]["recall_at_1"]

    # the cells' params are keys of the root params.yaml; the grid's metric is Table 1, not the cells
    lock = yaml.safe_load((project / "ablations" / "dvc.lock").read_text())["stages"]
    assert set(lock["grid_mine@row0-0"]["params"]) == {"params.yaml"}
    assert "mine.k_neg" in lock["grid_mine@row0-0"]["params"]["params.yaml"]
    shown = dvc_run(project, "metrics", "show", grid=True)
    assert "reports/table1.json" in shown.stdout and "metrics/grid/" not in shown.stdout
    assert "failed" not in shown.stderr.lower(), shown.stderr

    # a key every row overrides (and the seeds the grid sets) is in no cell's command: the grid stays up to date
    before = (project / "params.yaml").read_text()
    set_params(project, mine={"positives": "euclidean", "negatives": "random", "seed": 5},
               anchors={"strategy": "random", "count": 7})
    assert "up to date" in dvc_grid(project, "status", GRID_FILE)
    (project / "params.yaml").write_text(before)

    set_params(project, grid={"seeds": [0, 7]})
    ran = ran_stages(dvc_grid(project, "repro", GRID_FILE))
    assert sorted(ran) == sorted([*(f"{stage}@row0-7" for stage in GRID_STAGES), "report"]), ran
    assert f"| {first} | 2 |" in (project / "reports" / "table1.md").read_text()


@pytest.mark.skipif(not HAVE_FASHION, reason="Debian package dataset-fashion-mnist not installed")
def test_the_grid_runner_runs_cells_at_once_and_records_them_as_dvc_repro_would(tmp_path):
    """scripts/grid.py (what scripts/repro.sh runs for the grid): two cells at once; DVC then
    finds them up to date; a failing cell stops only its own later stages and is named."""
    project = make_project(tmp_path)
    first = ROWS[0]["name"]
    set_params(project, grid={"rows": ROWS[:1], "seeds": [0, 1, 2], "anchor_sets": {"random": {"strategy": "random", "count": 5}}},
               pool_figure={"ours": f"{first}_seed-0", "baseline": f"{first}_seed-1", "members": 2})
    (project / "metrics" / "grid" / f"{first}_seed-2.json").mkdir(parents=True)  # evaluate cannot write there

    def runner():
        command = ["bash", "scripts/with_grid.sh", sys.executable, "scripts/grid.py", GRID_FILE, "--jobs", "2"]
        return subprocess.run(command, cwd=project, env=environment(project), capture_output=True, text=True)

    failed = runner()
    assert failed.returncode == 1, failed.stdout[-3000:] + failed.stderr[-3000:]
    assert "3 cells to run (15 stages), 2 at once" in failed.stdout
    assert "failed cells (the others are recorded): row0-2 at grid_evaluate@row0-2" in failed.stderr
    assert "logs/grid/row0-2.log" in failed.stderr and (project / "logs" / "grid" / "row0-0.log").is_file()
    assert "recorded 13 stages in dvc.lock" in failed.stdout  # 5 + 5 + mine, finetune, whiten of row0-2
    status = dvc_grid(project, "status", GRID_FILE)
    stale = {stage_name(line.rstrip(":")) for line in status.splitlines() if line and not line[0].isspace()}
    assert stale == {"grid_evaluate@row0-2", "grid_proxy@row0-2", "report", "pool_figure"}, status

    (project / "metrics" / "grid" / f"{first}_seed-2.json").rmdir()
    second = runner()
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "1 cells to run (2 stages)" in second.stdout
    assert sorted(ran_stages(second.stdout)) == ["pool_figure", "report"]  # only what reads the cells runs in dvc
    assert "up to date" in dvc_grid(project, "status", GRID_FILE)
    assert f"| {first} | 3 |" in (project / "reports" / "table1.md").read_text()


def test_the_runner_starts_the_longest_cells_and_records_only_full_runs(tmp_path):
    """scripts/grid.py orders cells by their last full run, longest first (the lanes then
    finish close together), cells never timed first; a partial or failed run is not recorded."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import grid
    finally:
        sys.path.pop(0)
    cells = [grid.Cell(name) for name in ("row0-0", "row0-1", "row1-0", "row2-0", "row10-0")]
    order = grid.longest_first(cells, {"row0-0": 250.0, "row0-1": 260.0, "row1-0": 400.0, "row10-0": 400.0})
    assert [cell.name for cell in order] == ["row2-0", "row1-0", "row10-0", "row0-1", "row0-0"]
    path = tmp_path / grid.SECONDS_FILE
    full = grid.Cell("row3-0", done=list(grid.CELL_STAGES), seconds=301.26)
    partial = grid.Cell("row4-0", done=["grid_evaluate", "grid_proxy"], seconds=40.0)
    failed = grid.Cell("row5-0", done=list(grid.CELL_STAGES[:2]), failed="grid_whiten", seconds=90.0)
    for cell in (full, partial, failed):
        grid.save_seconds(path, cell)
    assert grid.read_seconds(path) == {"row3-0": 301.3}
    path.write_text("not json")
    assert grid.read_seconds(path) == {}
