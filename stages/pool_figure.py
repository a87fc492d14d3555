"""Stage ``pool_figure``: the paper's qualitative figure of the pools (docs/method.md section 5).

Reads the train split's images (``--train``, labels for the borders only) and
the pools of two cells of the Table 1 grid: ``ours`` (a manifold variant: P+ /
P-) and ``baseline`` (Euclidean NN positives, random negatives), each
``<grid-dir>/<cell>/mine/pools.parquet``. Draws ``anchors`` anchors with
``seed`` among those with members in all four pools and writes ``--out`` (PNG):
per anchor, the first ``members`` members of each pool, green/red borders by
label agreement.
"""
from __future__ import annotations

import logging
from pathlib import Path

import click
import matplotlib.pyplot as plt

from mom import artifacts
from mom.artifacts import tables
from mom.figures import choose_anchors, pools_figure
from mom.imagestore import ImageStore
from stages._cli import StageCommand, require, stage_command

log = logging.getLogger("mom")

def read_pools(path: Path, n_items: int, option: str):
    require(path.is_file(), f"--{option}: {path}: file not found (run the grid's mine stage of that cell)")
    return tables.read_pools(path, n_items=n_items)


def cell_pools_path(grid_dir: Path, cell: str, option: str) -> Path:
    require(cell and "/" not in cell and "\\" not in cell and cell not in (".", ".."),
            f"--{option}: must be a grid cell name (a folder of --grid-dir, no path separators) such as "
            f"pos-manifold_neg-manifold_seed-0, got {cell!r}")
    return grid_dir / cell / "mine" / "pools.parquet"


@click.command(cls=StageCommand)
@click.option("--ours", default="pos-manifold_neg-manifold_seed-0", show_default=True,
              help="grid cell whose pools are shown as P+ / P-")
@click.option("--baseline", default="pos-euclidean_neg-random_seed-0", show_default=True,
              help="grid cell whose pools are shown as the baseline (Euclidean NN / random negatives)")
@click.option("--anchors", "anchor_count", type=int, default=4, show_default=True, help="anchors shown (rows)")
@click.option("--members", type=int, default=5, show_default=True, help="members shown per pool")
@click.option("--seed", type=int, default=0, show_default=True, help="seed of the anchor draw")
@click.option("--grid-dir", type=click.Path(path_type=Path), default="data/grid", show_default=True)
@click.option("--train", "train_dir", type=click.Path(path_type=Path), default="data/prepared/train",
              show_default=True)
@click.option("--out", "out_path", type=click.Path(path_type=Path), default="reports/pools.png", show_default=True)
@stage_command("pool_figure")
def main(ours, baseline, anchor_count, members, seed, grid_dir, train_dir, out_path):
    """Anchors with their P+ / P- and the baseline pools, as a PNG."""
    require(1 <= anchor_count <= 50, f"--anchors: between 1 and 50, got {anchor_count}")
    require(1 <= members <= 20, f"--members: between 1 and 20, got {members}")
    require(seed >= 0, f"--seed: must be >= 0, got {seed}")
    ours_path = cell_pools_path(grid_dir, ours, "ours")
    baseline_path = cell_pools_path(grid_dir, baseline, "baseline")
    require((train_dir / "manifest.parquet").is_file(), f"--train: {train_dir}: no image store (run prepare)")
    store = ImageStore.open(train_dir)
    ours_pools = read_pools(ours_path, len(store), "ours")
    baseline_pools = read_pools(baseline_path, len(store), "baseline")
    try:
        anchors = choose_anchors(ours_pools, baseline_pools, anchor_count, seed)
    except ValueError as error:
        require(False, f"{ours_path}, {baseline_path}: {error}")
    labels = store.labels
    labels = labels if (labels >= 0).any() else None
    figure = pools_figure(store, labels, ours_pools, baseline_pools, anchors, members)
    artifacts.save_figure(out_path, figure)
    plt.close(figure)
    log.info("anchors %s: wrote %s", anchors, out_path)

if __name__ == "__main__":
    main()
