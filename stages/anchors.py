"""Stage ``anchors``: the anchors of the training collection (docs/method.md section 3).

Reads ``--graph`` (``adjacency.npz`` of the graph stage). Writes
``<out-dir>/anchors.parquet``: ``item int64, probability float64 (stationary
distribution d_i / sum d), rank int32 (1 = first), strategy string``, in rank
order. ``stationary``: the top ``--count`` 1-hop local maxima of the stationary
distribution; ``all``: every item (``--count`` ignored); ``random``: ``--count``
items drawn with ``--seed``.
"""
from __future__ import annotations

import logging
from pathlib import Path

import click

from mom.artifacts import arrays, tables
from mom.anchors import STRATEGIES, select_anchors
from stages._cli import StageCommand, require, stage_command, timed

log = logging.getLogger("mom")


@click.command(cls=StageCommand)
@click.option("--strategy", type=click.Choice(STRATEGIES), default="all", show_default=True,
              help="stationary (large collections), all (fine-grained), random (ablation)")
@click.option("--count", type=int, default=1500, show_default=True, help="anchors kept (stationary, random)")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="seed of the random strategy")
@click.option("--graph", "graph_path", type=click.Path(dir_okay=False), default="data/graph/adjacency.npz",
              show_default=True)
@click.option("--out-dir", "out_dir", type=click.Path(file_okay=False), default="data/anchors", show_default=True)
@stage_command("anchors")
def main(strategy, count, seed, graph_path, out_dir):
    """Select anchors and write anchors.parquet."""
    require(count >= 1, f"count={count}: must be at least 1")
    adjacency = arrays.read_adjacency(graph_path)
    with timed("selected anchors"):
        items, probability = select_anchors(adjacency, strategy, None if strategy == "all" else count, seed)
    require(len(items) > 0, f"{graph_path}: the graph has no edges, so no anchor (lower k or check the features)")
    if strategy == "stationary" and len(items) < count:
        log.warning("only %d local maxima: fewer anchors than count=%d", len(items), count)
    tables.write_anchors(Path(out_dir) / "anchors.parquet", items, probability, strategy)
    log.info("%d anchors (%s)", len(items), strategy)


if __name__ == "__main__":
    main()
