"""Stage ``report`` and mom.report: Table 1 from a fake set of grid cells."""
import statistics

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from mom import artifacts
from mom.report import build_table, cell_name, format_value, mean_std, pool_purities, to_markdown
from stages import report as report_stage

ROWS = ["pos-euclidean_neg-random", "pos-manifold_neg-manifold_weighted"]
SEEDS = [0, 1, 2]
INITIAL = {"recall_at_1": 0.40, "nmi": 0.30}


def finetuned_values(row: int, seed: int) -> dict:
    rng = np.random.default_rng(100 * row + seed)
    return {"recall_at_1": float(0.5 + 0.1 * row + rng.uniform(0, 0.05)), "nmi": float(0.35 + rng.uniform(0, 0.05))}


NEW_IMAGES_OFFSET = 0.2  # the fake new_images metrics are the new_classes ones plus this


def evaluation(finetuned: dict) -> dict:
    """An evaluate report: ``finetuned`` on new_classes, the same + NEW_IMAGES_OFFSET on new_images."""
    shifted = {key: value + NEW_IMAGES_OFFSET for key, value in finetuned.items()}
    return {"new_images": {"items": 10, "initial": {key: v + NEW_IMAGES_OFFSET for key, v in INITIAL.items()},
                           "finetuned": shifted},
            "new_classes": {"items": 10, "initial": {**INITIAL, "recall_at_2": 0.5},
                            "finetuned": {**finetuned, "recall_at_2": 0.9}}}


def proxy(row: int, seed: int) -> dict:
    return {"note": "PROXY", "new_classes": {"levels": {"strong": {
        "raw_pixels": {"map": 0.1}, "initial": {"map": 0.2}, "finetuned": {"map": 0.9},
        "finetuned_whitened": {"map": 0.3 + 0.1 * row + 0.01 * seed}}}}}


def purity(positives: str, negatives: str, seed: int) -> dict:
    return {"written": {"positives": positives, "negatives": negatives},
            "manifold_positives": {"purity": 0.4}, "euclidean_positives": {"purity": 0.6 + 0.01 * seed},
            "manifold_negatives": {"purity": 0.96}, "random_negatives": {"purity": 0.8 - 0.02 * seed}}


@pytest.fixture
def grid_project(tmp_path):
    """params.yaml with the grid, every listed cell's metrics and purity, and stale cells on disk."""
    rows = [{"name": name, "mine": {}, "finetune": {}} for name in ROWS]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"grid": {"seeds": SEEDS, "rows": rows}}))
    variants = {ROWS[0]: ("euclidean", "random"), ROWS[1]: ("manifold", "manifold")}
    for r, row in enumerate(ROWS):
        for seed in SEEDS:
            cell = cell_name(row, seed)
            artifacts.save_json(tmp_path / "metrics" / "grid" / f"{cell}.json", evaluation(finetuned_values(r, seed)))
            artifacts.save_json(tmp_path / "data" / "grid" / cell / "mine" / "purity.json",
                                purity(*variants[row], seed))
            artifacts.save_json(tmp_path / "metrics" / "grid_proxy" / f"{cell}.json", proxy(r, seed))
    stale = evaluation({"recall_at_1": 0.99, "nmi": 0.99})
    artifacts.save_json(tmp_path / "metrics" / "grid" / "pos-manifold_neg-random_seed-0.json", stale)  # old row
    artifacts.save_json(tmp_path / "metrics" / "grid" / f"{cell_name(ROWS[0], 9)}.json", stale)  # removed seed
    artifacts.save_json(tmp_path / "metrics" / "grid_proxy" / f"{cell_name(ROWS[0], 9)}.json", proxy(50, 0))
    return tmp_path


def run_report(folder, *extra):
    args = ["--params", str(folder / "params.yaml"), "--metrics-dir", str(folder / "metrics" / "grid"),
            "--grid-dir", str(folder / "data" / "grid"), "--proxy-dir", str(folder / "metrics" / "grid_proxy"),
            "--start-metrics", "", "--start-proxy", "", "--markdown", str(folder / "reports" / "table1.md"),
            "--png", str(folder / "reports" / "table1.png"), "--json", str(folder / "reports" / "table1.json"), *extra]
    return CliRunner().invoke(report_stage.main, args)


def table_rows(markdown: str) -> list[list[str]]:
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_mean_std_is_the_sample_standard_deviation():
    values = [0.1, 0.25, 0.7]
    mean, std = mean_std(values)
    assert mean == pytest.approx(statistics.mean(values))
    assert std == pytest.approx(statistics.stdev(values))
    assert mean_std([0.3]) == (0.3, 0.0)


def test_report_table_from_listed_cells_ignores_stale_files(grid_project):
    result = run_report(grid_project)
    assert result.exit_code == 0, result.output
    rows = table_rows((grid_project / "reports" / "table1.md").read_text())
    header, body = rows[0], rows[2:]
    assert header == ["row", "seeds", "labels used", "new images R@1", "new images NMI", "new classes R@1",
                      "new classes NMI", "new classes proxy mAP strong", "P+ purity", "P- purity"]
    assert [row[0] for row in body] == ["initial features", *ROWS], "initial row first, then the params' rows"
    assert [row[2] for row in body] == ["no", "no", "no"], "no cell says it trained on labels"
    assert body[0][3:8] == ["60.00 ± 0.00", "50.00 ± 0.00", "40.00 ± 0.00", "30.00 ± 0.00", "20.00 ± 0.00"]
    assert body[0][8:] == ["—", "—"]
    for r, row in enumerate(ROWS):
        for column, key, offset in ((3, "recall_at_1", NEW_IMAGES_OFFSET), (4, "nmi", NEW_IMAGES_OFFSET),
                                    (5, "recall_at_1", 0), (6, "nmi", 0)):
            values = [finetuned_values(r, seed)[key] + offset for seed in SEEDS]  # stale 0.99 cells must not count
            expected = f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"
            assert body[1 + r][column] == expected, (row, key)
        assert body[1 + r][1] == "3"
        maps = [0.3 + 0.1 * r + 0.01 * seed for seed in SEEDS]  # whitened fine-tuned descriptors
        assert body[1 + r][7] == format_value((statistics.mean(maps), statistics.stdev(maps)))
    euclidean = [0.6 + 0.01 * seed for seed in SEEDS]
    random = [0.8 - 0.02 * seed for seed in SEEDS]
    assert body[1][8] == format_value((statistics.mean(euclidean), statistics.stdev(euclidean)))
    assert body[1][9] == format_value((statistics.mean(random), statistics.stdev(random)))
    assert body[2][8:] == ["40.00 ± 0.00", "96.00 ± 0.00"]

    table = artifacts.load_json(grid_project / "reports" / "table1.json")
    assert list(table) == ["initial features", *ROWS]
    values = [finetuned_values(1, seed)["recall_at_1"] for seed in SEEDS]
    assert table[ROWS[1]]["new_classes_recall_at_1"]["mean"] == pytest.approx(statistics.mean(values))
    assert table[ROWS[1]]["new_classes_recall_at_1"]["std"] == pytest.approx(statistics.stdev(values))
    assert table[ROWS[1]]["labels_used"] == "no"


@pytest.mark.parametrize("supervisions,shown", [
    (["labels", "labels", "labels"], "yes"), (["kmeans", "kmeans", "kmeans"], "k-means"), (["none", None, "none"], "no")])
def test_the_labels_used_column_says_what_evaluate_recorded_of_the_training(grid_project, supervisions, shown):
    for seed, supervision in zip(SEEDS, supervisions):
        path = grid_project / "metrics" / "grid" / f"{cell_name(ROWS[1], seed)}.json"
        report = artifacts.load_json(path)
        if supervision is not None:  # a report from before the training section: plain MoM
            report["training"] = {"supervision": supervision, "labels_used": supervision == "labels", "synthesis": "hdml"}
        artifacts.save_json(path, report)
    assert run_report(grid_project).exit_code == 0
    body = table_rows((grid_project / "reports" / "table1.md").read_text())[2:]
    assert [row[2] for row in body] == ["no", "no", shown]
    assert artifacts.load_json(grid_project / "reports" / "table1.json")[ROWS[1]]["labels_used"] == shown


def test_report_has_the_untrained_start_row_when_given(grid_project):
    start = evaluation({"recall_at_1": 0.1, "nmi": 0.2})
    for split in ("new_images", "new_classes"):
        start[split]["start"] = start[split].pop("finetuned")
    artifacts.save_json(grid_project / "evaluate.json", start)
    result = run_report(grid_project, "--start-metrics", str(grid_project / "evaluate.json"))
    assert result.exit_code == 0, result.output
    body = table_rows((grid_project / "reports" / "table1.md").read_text())[2:]
    assert [row[0] for row in body] == ["initial features", "untrained start", *ROWS]
    assert body[1][1:7] == ["—", "no", "30.00 ± 0.00", "40.00 ± 0.00", "10.00 ± 0.00", "20.00 ± 0.00"]
    assert (grid_project / "reports" / "table1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_initial_row_comes_from_the_main_reports_when_the_cells_skip_it(grid_project):
    """The grid's cells run evaluate and proxy_retrieval with --no-initial: the initial
    row is then the main job's (same features, settings and views), not an average of cells."""
    for path in [*(grid_project / "metrics" / "grid").glob("*.json"), *(grid_project / "metrics" / "grid_proxy").glob("*.json")]:
        report = artifacts.load_json(path)
        for section in (report.get("new_images", {}), report.get("new_classes", {})):
            section.pop("initial", None)
            for level in section.get("levels", {}).values():
                level.pop("initial"), level.pop("raw_pixels")
        artifacts.save_json(path, report)
    start = evaluation({"recall_at_1": 0.1, "nmi": 0.2})
    for split in ("new_images", "new_classes"):
        start[split]["start"] = start[split].pop("finetuned")
        start[split]["initial"] = {"recall_at_1": 0.25, "nmi": 0.35}
    main_proxy = proxy(0, 0)
    main_proxy["new_classes"]["levels"]["strong"]["initial"] = {"map": 0.45}
    artifacts.save_json(grid_project / "evaluate.json", start)
    artifacts.save_json(grid_project / "proxy_retrieval.json", main_proxy)
    result = run_report(grid_project, "--start-metrics", str(grid_project / "evaluate.json"),
                        "--start-proxy", str(grid_project / "proxy_retrieval.json"))
    assert result.exit_code == 0, result.output
    table = artifacts.load_json(grid_project / "reports" / "table1.json")
    assert list(table) == ["initial features", "untrained start", *ROWS]
    initial = table["initial features"]
    assert initial["seeds"] == [], "one report, not an average over seeds"
    assert {key: value["mean"] for key, value in initial.items() if key.endswith(("recall_at_1", "nmi"))} == {
        "new_images_recall_at_1": 0.25, "new_images_nmi": 0.35, "new_classes_recall_at_1": 0.25, "new_classes_nmi": 0.35}
    assert initial["proxy_map_new_classes_strong"] == {"mean": 0.45, "std": 0.0}
    assert table[ROWS[1]]["proxy_map_new_classes_strong"]["mean"] == pytest.approx(0.41)


def test_report_is_deterministic(grid_project):
    assert run_report(grid_project).exit_code == 0
    names = ("table1.md", "table1.png", "table1.json")
    first = {name: (grid_project / "reports" / name).read_bytes() for name in names}
    assert run_report(grid_project).exit_code == 0
    assert first == {name: (grid_project / "reports" / name).read_bytes() for name in first}


def test_proxy_column_only_when_every_listed_cell_has_it(grid_project):
    (grid_project / "metrics" / "grid_proxy" / f"{cell_name(ROWS[1], 1)}.json").unlink()
    assert run_report(grid_project).exit_code == 0
    header = table_rows((grid_project / "reports" / "table1.md").read_text())[0]
    assert header == ["row", "seeds", "labels used", "new images R@1", "new images NMI", "new classes R@1",
                      "new classes NMI", "P+ purity", "P- purity"]


def test_a_listed_cell_without_metrics_is_a_one_line_error(grid_project):
    (grid_project / "metrics" / "grid" / f"{cell_name(ROWS[1], 2)}.json").unlink()
    result = run_report(grid_project)
    assert result.exit_code == 2
    assert f"{cell_name(ROWS[1], 2)}" in result.output and "grid_evaluate" in result.output
    assert not (grid_project / "reports" / "table1.md").exists()


@pytest.mark.parametrize("grid, message", [
    ({"seeds": [0, 0], "rows": [{"name": "a"}]}, "distinct integers"),
    ({"seeds": [], "rows": [{"name": "a"}]}, "grid.seeds"),
    ({"seeds": [0], "rows": [{"name": "a"}, {"name": "a"}]}, "names must be distinct"),
    ({"seeds": [0], "rows": []}, "grid.rows"),
])
def test_invalid_grid_params_are_refused(tmp_path, grid, message):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"grid": grid}))
    result = run_report(tmp_path)
    assert result.exit_code == 2 and message in result.output, result.output


def test_columns_only_where_every_cell_has_the_metric():
    evaluations = {cell_name("a", 0): evaluation({"recall_at_1": 0.5, "nmi": 0.4}),
                   cell_name("a", 1): {"new_classes": {"initial": INITIAL, "finetuned": {"recall_at_1": 0.7}}}}
    table = build_table(["a"], [0, 1], evaluations)
    assert [key for key, _ in table.columns] == ["new_classes_recall_at_1"]
    assert table.rows[1].values["new_classes_recall_at_1"] == pytest.approx(mean_std([0.5, 0.7]))
    assert "| a | 2 | no | 60.00 ± 14.14 |" in to_markdown(table)


def test_retrieval_map_columns_and_purity_of_the_written_variants():
    evaluations = {cell_name("r", seed): {"retrieval": {
        "initial": {"medium": {"map": 0.3}}, "finetuned": {"medium": {"map": 0.5 + 0.1 * seed}}}} for seed in (0, 1)}
    table = build_table(["r"], [0, 1], evaluations)
    assert [header for _, header in table.columns] == ["mAP medium"]
    assert table.rows[0].values["map_medium"] == pytest.approx((0.3, 0.0))
    assert table.rows[1].values["map_medium"] == pytest.approx(mean_std([0.5, 0.6]))
    assert pool_purities(purity("manifold", "random", 2)) == {"positive_purity": 0.4, "negative_purity": 0.76}
    unlabelled = {"written": {"positives": "manifold", "negatives": "manifold"},
                  "manifold_positives": {"purity": None}, "manifold_negatives": {"purity": None}}
    assert pool_purities(unlabelled) == {}


def test_headline_keeps_only_what_a_user_compares():
    from mom.report import headline

    report = evaluation(finetuned_values(1, 0))
    report["new_classes"]["start"] = {"recall_at_1": 0.1, "nmi": 0.1}
    report["new_classes"]["finetuned"]["recall_at_8"] = 0.95
    report["new_classes"]["initial"]["recall_at_8"] = 0.85
    report["retrieval"] = {"queries": 3, "initial": {"easy": {"map": 0.4, "mp_at_1": 0.5}},
                           "finetuned": {"easy": {"map": 0.6, "mp_at_1": 0.7}}}
    result = headline(report, proxy(1, 2))
    assert result["new_classes"] == {
        "initial": {"recall_at_1": INITIAL["recall_at_1"], "recall_at_8": 0.85, "nmi": INITIAL["nmi"]},
        "finetuned": {"recall_at_1": report["new_classes"]["finetuned"]["recall_at_1"], "recall_at_8": 0.95,
                      "nmi": report["new_classes"]["finetuned"]["nmi"]}}, "R@1, the largest K, NMI; no start"
    assert set(result["new_images"]["finetuned"]) == {"recall_at_1", "nmi"}, "no K above 1 in that report"
    report["new_images"]["finetuned"]["f1"] = 0.45
    assert headline(report)["new_images"]["finetuned"]["f1"] == 0.45, "F1 joins NMI when the report has it"
    assert result["retrieval_map"] == {"initial": {"easy": 0.4}, "finetuned": {"easy": 0.6}}
    assert result["proxy_map"] == {"new_classes": {"strong": {"initial": 0.2, "finetuned": 0.3 + 0.1 + 0.02}}}, \
        "the whitened fine-tuned descriptors; no raw pixels"
    assert "proxy_map" not in headline(report)


def test_headline_of_an_unlabeled_collection_holds_the_label_free_measures():
    from mom.report import headline

    report = {"label_free": {"new_images": {"items": 20, "k": 10, "initial": {"manifold_agreement_at_10": 0.4},
                                            "finetuned": {"manifold_agreement_at_10": 0.5},
                                            "neighbours_kept_at_10": 0.7}},
              "evaluations": "ran: label-free on new_images; not run: retrieval mAP (no ground truth)"}
    result = headline(report)
    assert result == {"label_free": {"new_images": {"initial": {"manifold_agreement_at_10": 0.4},
                                                    "finetuned": {"manifold_agreement_at_10": 0.5},
                                                    "neighbours_kept_at_10": 0.7}},
                      "evaluations": report["evaluations"]}
