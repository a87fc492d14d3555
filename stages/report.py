"""Stage ``report``: the paper's Table 1 from the grid's cells (docs/method.md section 9).

The cells are those the ``grid`` section of ``--params`` lists (``rows`` x
``seeds``), never the files found on disk: a stale cell left in
``--metrics-dir`` is ignored. Per cell ``<row>_seed-<seed>`` it reads
``<metrics-dir>/<cell>.json`` (the ``evaluate`` stage: Recall@1 and NMI of the
evaluation splits ``new_images`` and ``new_classes``, mAP per retrieval
protocol when the dataset has a ground truth) and
``<grid-dir>/<cell>/mine/purity.json`` (pool purity, where labels exist) and,
when it exists, ``<proxy-dir>/<cell>.json`` (proxy retrieval mAP per level; a
column appears only when every listed cell has it).
``--start-metrics`` and ``--start-proxy`` (the main pipeline's evaluate and proxy_retrieval
reports, reports/evaluate.json and reports/proxy_retrieval.json) give the rows of the initial
features and of the untrained start of fine-tuning: the cells score neither (same features,
settings and views in every cell). Without ``--start-metrics`` the initial row averages the
cells' own ``initial`` sections.
Writes ``--markdown`` and ``--png`` (the table: mean ± std over seeds in percent,
the initial features first) and ``--json`` (the same numbers, DVC metrics).
"""
from __future__ import annotations

import logging
from pathlib import Path

import click
import matplotlib.pyplot as plt
import yaml

from mom import artifacts
from mom.artifacts import reports
from mom.report import build_table, cell_name, to_dict, to_figure, to_markdown
from stages._cli import StageCommand, require, stage_command

log = logging.getLogger("mom")

TITLE = "Table 1 (Iscen et al. 2018): pools and loss, mean ± std over seeds (%)"


def read_grid(path: Path) -> tuple[list[str], list[int]]:
    """Row names and seeds of the ``grid`` section of a params file, validated."""
    require(path.is_file(), f"--params: {path}: file not found")
    grid = (yaml.safe_load(path.read_text()) or {}).get("grid")
    require(isinstance(grid, dict), f"{path}: no 'grid' section (rows and seeds)")
    rows, seeds = grid.get("rows"), grid.get("seeds")
    require(isinstance(rows, list) and rows and all(isinstance(r, dict) and isinstance(r.get("name"), str)
                                                    for r in rows),
            f"{path}: grid.rows must be a non-empty list of rows, each with a 'name'")
    names = [row["name"] for row in rows]
    require(len(set(names)) == len(names), f"{path}: grid.rows: names must be distinct, got {names}")
    require(isinstance(seeds, list) and seeds and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
            and len(set(seeds)) == len(seeds), f"{path}: grid.seeds must be a non-empty list of distinct integers, "
            f"got {seeds!r}")
    return names, seeds


def read_cells(names, seeds, metrics_dir: Path, grid_dir: Path, proxy_dir: Path) -> tuple[dict, dict, dict]:
    evaluations, purities, proxies = {}, {}, {}
    for row, seed in ((row, seed) for row in names for seed in seeds):
        cell = cell_name(row, seed)
        path = metrics_dir / f"{cell}.json"
        require(path.is_file(), f"{path}: missing: cell {cell} has not been evaluated (run the grid: bash scripts/repro.sh ablations/dvc.yaml; stage grid_evaluate)")
        evaluations[cell] = reports.read_evaluation_report(path)
        purity = grid_dir / cell / "mine" / "purity.json"
        if purity.is_file():
            purities[cell] = reports.read_purity_report(purity)
        proxy = proxy_dir / f"{cell}.json"
        if proxy.is_file():
            proxies[cell] = reports.read_proxy_report(proxy)
    return evaluations, purities, proxies


@click.command(cls=StageCommand)
@click.option("--params", "params_path", type=click.Path(path_type=Path), default="params.yaml", show_default=True,
              help="params file whose grid section lists the cells")
@click.option("--metrics-dir", type=click.Path(path_type=Path), default="metrics/grid", show_default=True)
@click.option("--grid-dir", type=click.Path(path_type=Path), default="data/grid", show_default=True)
@click.option("--proxy-dir", type=click.Path(path_type=Path), default="metrics/grid_proxy", show_default=True)
@click.option("--start-metrics", "start_path", type=click.Path(path_type=Path), default="reports/evaluate.json",
              show_default=True, help="an evaluate report with the initial features and the untrained start "
                                      "('' = the initial row from the cells, no start row)")
@click.option("--start-proxy", "start_proxy_path", type=click.Path(path_type=Path),
              default="reports/proxy_retrieval.json", show_default=True,
              help="a proxy_retrieval report with the initial network's mAP ('' = none)")
@click.option("--markdown", "markdown_path", type=click.Path(path_type=Path), default="reports/table1.md",
              show_default=True)
@click.option("--png", "png_path", type=click.Path(path_type=Path), default="reports/table1.png", show_default=True)
@click.option("--json", "json_path", type=click.Path(path_type=Path), default="reports/table1.json",
              show_default=True)
@stage_command("report")
def main(params_path, metrics_dir, grid_dir, proxy_dir, start_path, start_proxy_path, markdown_path, png_path,
         json_path):
    """Table 1 from the grid's cells, as Markdown, PNG and JSON."""
    names, seeds = read_grid(params_path)
    evaluations, purities, proxies = read_cells(names, seeds, metrics_dir, grid_dir, proxy_dir)
    start = reports.read_evaluation_report(start_path) if str(start_path) not in ("", ".") else None
    start_proxy = reports.read_proxy_report(start_proxy_path) if str(start_proxy_path) not in ("", ".") else None
    table = build_table(names, seeds, evaluations, purities, proxies, start, start_proxy)
    markdown = to_markdown(table, f"**{TITLE}**")
    artifacts.save_text(markdown_path, markdown)
    artifacts.save_json(json_path, to_dict(table))
    figure = to_figure(table, TITLE)
    artifacts.save_figure(png_path, figure)
    plt.close(figure)
    log.info("%d rows x %d seeds:\n%s", len(names), len(seeds), markdown)


if __name__ == "__main__":
    main()
