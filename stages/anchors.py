"""Stage ``anchors``: the anchors of the training collection (docs/method.md section 3).

Reads ``--graph`` (``adjacency.npz`` of the graph stage). Writes
``<out-dir>/anchors.parquet``: ``item int64, probability float64 (stationary
distribution d_i / sum d), rank int32 (1 = first), strategy string``, in rank
order, and ``<out-dir>/report.json`` (strategy, count, anchors written and,
for ``--count auto``, the size chosen, :mod:`mom.autosize`). ``stationary``: the top ``--count`` 1-hop local maxima of the stationary
distribution; ``all``: every item (``--count`` ignored); ``random``: ``--count``
items drawn with ``--seed``.
"""
from __future__ import annotations

import logging
from pathlib import Path

import click

from mom import artifacts, autosize
from mom.artifacts import arrays, tables
from mom.anchors import ALL_ANCHORS_MAX_ITEMS, AUTO, STRATEGIES, resolve_strategy, select_anchors
from stages._cli import AUTO_INT, StageCommand, log_auto, require, stage_command, timed

log = logging.getLogger("mom")


@click.command(cls=StageCommand)
@click.option("--strategy", type=click.Choice((AUTO, *STRATEGIES)), default=AUTO, show_default=True,
              help=f"stationary (large collections), all (fine-grained), random (ablation); auto: all up to "
                   f"{ALL_ANCHORS_MAX_ITEMS} items, random above")
@click.option("--count", type=AUTO_INT, default="auto", show_default=True,
              help="anchors kept (stationary, random); auto: from the item count (mom/autosize.py)")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="seed of the random strategy")
@click.option("--graph", "graph_path", type=click.Path(dir_okay=False), default="data/graph/adjacency.npz",
              show_default=True)
@click.option("--out-dir", "out_dir", type=click.Path(file_okay=False), default="data/anchors", show_default=True)
@stage_command("anchors")
def main(strategy, count, seed, graph_path, out_dir):
    """Select anchors and write anchors.parquet."""
    require(autosize.is_auto(count) or count >= 1, f"count={count}: must be at least 1 (or auto)")
    adjacency = arrays.read_adjacency(graph_path)
    n = adjacency.shape[0]
    sizes: dict = {}
    if strategy == AUTO:
        strategy = resolve_strategy(strategy, n)
        sizes["anchors.strategy"] = {"value": strategy, "n": int(n),
                                     "rule": f"all if n <= {ALL_ANCHORS_MAX_ITEMS}, else random"}
    if strategy == "all":  # every item: count not used
        count = None
    else:
        count = autosize.resolve("anchors.count", count, n, sizes)
        require(strategy != "random" or count <= n, autosize.too_large({"anchors.count": count}, n, bound=f"<= {n}"))
    log_auto(sizes)
    with timed("selected anchors"):
        items, probability = select_anchors(adjacency, strategy, count, seed)
    require(len(items) > 0, f"{graph_path}: the graph has no edges, so no anchor (lower k or check the features)")
    if strategy == "stationary" and len(items) < count:
        log.warning("only %d local maxima: fewer anchors than count=%d", len(items), count)
    tables.write_anchors(Path(out_dir) / "anchors.parquet", items, probability, strategy)
    report = {"strategy": strategy, "count": count, "anchors": int(len(items)),
              "items": int(n), "auto_sizes": sizes}
    artifacts.save_json(Path(out_dir) / "report.json", report)
    log.info("%d anchors (%s)", len(items), strategy)


if __name__ == "__main__":
    main()
