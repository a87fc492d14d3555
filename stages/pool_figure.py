"""Stage ``pool_figure``: the paper's qualitative figure of the pools (method.md section 5).

Reads the train split's images (``--train``, labels for the borders only), our
pools (``--ours``: a ``pools.parquet`` of the manifold variant, P+ / P-) and the
baseline pools (``--baseline``: Euclidean NN positives, random negatives), draws
``figure_anchors`` anchors with ``figure_seed`` among those with members in all
four pools and writes ``--out`` (PNG): per anchor, the first
``figure_members`` members of each pool, green/red borders by label agreement.
"""
from __future__ import annotations

import logging
from pathlib import Path

import click
import matplotlib.pyplot as plt
import numpy as np

from mom import artifacts
from mom.figures import choose_anchors, pools_figure
from mom.imagestore import ImageStore
from stages._cli import StageCommand, require, stage_command

log = logging.getLogger("mom")

POOL_COLUMNS = ("anchor", "member", "kind", "rank")


def read_pools(path: Path, n_items: int):
    require(path.is_file(), f"{path}: file not found (run the grid's mine stage for that cell)")
    table = artifacts.load_parquet(path)
    missing = [name for name in POOL_COLUMNS if name not in table.column_names]
    require(not missing, f"{path}: missing columns {missing} (expected {list(POOL_COLUMNS)})")
    require(len(table) > 0, f"{path}: no pool members")
    ids = np.concatenate([table.column(name).to_numpy() for name in ("anchor", "member")])
    require(ids.min() >= 0 and ids.max() < n_items, f"{path}: ids outside 0..{n_items - 1} of the train split")
    return table


@click.command(cls=StageCommand)
@click.option("--figure_anchors", type=int, default=4, show_default=True, help="anchors shown (rows)")
@click.option("--figure_members", type=int, default=5, show_default=True, help="members shown per pool")
@click.option("--figure_seed", type=int, default=0, show_default=True, help="seed of the anchor draw")
@click.option("--train", "train_dir", type=click.Path(path_type=Path), default="data/prepared/train",
              show_default=True)
@click.option("--ours", "ours_path", type=click.Path(path_type=Path),
              default="data/grid/pos-manifold_neg-manifold_seed-0/mine/pools.parquet", show_default=True)
@click.option("--baseline", "baseline_path", type=click.Path(path_type=Path),
              default="data/grid/pos-euclidean_neg-random_seed-0/mine/pools.parquet", show_default=True)
@click.option("--out", "out_path", type=click.Path(path_type=Path), default="reports/pools.png", show_default=True)
@stage_command("pool_figure")
def main(figure_anchors, figure_members, figure_seed, train_dir, ours_path, baseline_path, out_path):
    """Anchors with their P+ / P- and the baseline pools, as a PNG."""
    require(1 <= figure_anchors <= 50, f"--figure_anchors: between 1 and 50, got {figure_anchors}")
    require(1 <= figure_members <= 20, f"--figure_members: between 1 and 20, got {figure_members}")
    require(figure_seed >= 0, f"--figure_seed: must be >= 0, got {figure_seed}")
    require((train_dir / "manifest.parquet").is_file(), f"--train: {train_dir}: no image store (run prepare)")
    store = ImageStore.open(train_dir)
    ours, baseline = read_pools(ours_path, len(store)), read_pools(baseline_path, len(store))
    try:
        anchors = choose_anchors(ours, baseline, figure_anchors, figure_seed)
    except ValueError as error:
        require(False, f"{ours_path}, {baseline_path}: {error}")
    labels = store.labels
    labels = labels if (labels >= 0).any() else None
    figure = pools_figure(store, labels, ours, baseline, anchors, figure_members)
    artifacts.save_figure(out_path, figure)
    plt.close(figure)
    log.info("anchors %s: wrote %s", anchors, out_path)


if __name__ == "__main__":
    main()
