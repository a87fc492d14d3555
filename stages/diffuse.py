"""Stage ``diffuse``: manifold neighbours of every anchor (docs/method.md section 4).

Reads ``--graph`` (``adjacency.npz``) and ``--anchors`` (``anchors.parquet``).
Writes to ``--out-dir``: ``manifold_knn.parquet`` (``anchor, neighbour int64,
rank int32 (1 = largest s_m, anchor itself excluded), similarity float32 =
f_anchor*(neighbour)``; at most ``--k`` rows per anchor, only positive
similarities) and ``report.json`` (convergence: relative residuals
``||b - (I - alpha A_hat) f|| / ||b||`` and iterations per anchor,
the mean residual after each iteration).

``--k`` must be at least the ``mine`` stage's ``k_neg`` (its set differences need
manifold membership that deep).

``--truncate T`` (optional, 0 = off) solves each anchor's system on its T
nearest Euclidean neighbours only (read from ``--features``), and reports the
agreement of the truncated top-k with the full solve on ``--agreement_sample``
anchors (mean fraction of the full top-k found).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import click
import numpy as np
import torch
from tqdm import tqdm

from mom import artifacts, autosize
from mom.artifacts import arrays, tables
from mom.diffusion import manifold_neighbours, neighbour_agreement, truncated_manifold_neighbours
from mom.graph import check_features, neighbours_of
from stages._cli import AUTO_INT, StageCommand, log_auto, require, stage_command, timed

log = logging.getLogger("mom")

DTYPES = {"float32": np.float32, "float64": np.float64}


def convergence_report(result, options: dict) -> dict:
    residual = result.relative_residual
    return {
        **options,
        "anchors": int(len(residual)),
        "neighbours_per_anchor": {"mean": float((result.ids >= 0).sum(axis=1).mean()),
                                  "min": int((result.ids >= 0).sum(axis=1).min())},
        "relative_residual": {"mean": float(residual.mean()), "median": float(np.median(residual)),
                              "max": float(residual.max())},
        "converged_fraction": float((residual <= options["tol"]).mean()),
        "iterations": {"mean": float(result.iterations.mean()), "max": int(result.iterations.max())},
        "mean_residual_per_iteration": [float(value) for value in result.residual_history],
    }


def read_truncation_features(features_path, adjacency) -> np.ndarray:
    """The features of every graph node, checked (the Euclidean search reads them all)."""
    features = arrays.read_features(features_path, n_items=adjacency.shape[0], mmap=True, owner="the graph")
    check_features(features, name=str(features_path))
    return features


def truncated_solve(features, adjacency, anchors, truncate, sample_size, k, alpha, max_iter, tol, block_size,
                    reorder, dtype, bar):
    """Truncated diffusion for all anchors, plus its agreement with the full solve on a sample."""
    neighbourhoods, _ = neighbours_of(features, anchors, truncate)
    result = truncated_manifold_neighbours(adjacency, anchors, neighbourhoods, k, alpha, max_iter, tol, dtype,
                                           progress=bar.update)
    sample = np.arange(0, len(anchors), max(1, len(anchors) // max(sample_size, 1)))[:sample_size]
    full = manifold_neighbours(adjacency, anchors[sample], k, alpha, max_iter, tol, block_size, reorder, dtype)
    return result, {"neighbourhood": truncate, "sample": int(len(sample)),
                    "agreement_at_k": neighbour_agreement(result.ids[sample], full.ids)}


@click.command(cls=StageCommand)
@click.option("--alpha", type=float, default=0.99, show_default=True, help="diffusion parameter in (0, 1)")
@click.option("--max_iter", type=int, default=20, show_default=True, help="CG iterations (authors: 20)")
@click.option("--tol", type=float, default=1e-6, show_default=True, help="stop a column at this relative residual")
@click.option("--block_size", type=int, default=64, show_default=True, help="anchors solved together")
@click.option("--k", type=AUTO_INT, default="auto", show_default=True,
              help="manifold neighbours kept per anchor (>= mine k_neg); auto: from the item count (mom/autosize.py)")
@click.option("--reorder/--no-reorder", default=True, show_default=True,
              help="permute nodes for memory locality (reverse Cuthill-McKee); same result, faster")
@click.option("--dtype", type=click.Choice(sorted(DTYPES)), default="float32", show_default=True)
@click.option("--threads", type=int, default=0, show_default=True,
              help="threads of the sparse products and dense block updates (0 = all cores)")
@click.option("--fused_min_items", type=int, default=200_000, show_default=True,
              help="graphs of at least this many nodes are solved by the fused block CG (numba; 0 = always); "
                   "same recurrences, equal to float rounding")
@click.option("--truncate", type=int, default=0, show_default=True,
              help="solve on each anchor's T nearest Euclidean neighbours only (0 = full graph)")
@click.option("--agreement_sample", type=int, default=100, show_default=True,
              help="truncation: anchors also solved on the full graph to measure agreement")
@click.option("--features", "features_path", type=click.Path(dir_okay=False), default="data/features/train.npy",
              show_default=True, help="read only with --truncate")
@click.option("--graph", "graph_path", type=click.Path(dir_okay=False), default="data/graph/adjacency.npz",
              show_default=True)
@click.option("--anchors", "anchors_path", type=click.Path(dir_okay=False), default="data/anchors/anchors.parquet",
              show_default=True)
@click.option("--out-dir", "out_dir", type=click.Path(file_okay=False), default="data/diffuse", show_default=True)
@stage_command("diffuse")
def main(alpha, max_iter, tol, block_size, k, reorder, dtype, threads, fused_min_items, truncate, agreement_sample,
         features_path, graph_path, anchors_path, out_dir):
    """Diffuse from every anchor and keep its top-k manifold neighbours."""
    require(autosize.is_auto(k) or k >= 1, f"k={k}: must be at least 1 (or auto)")
    require(0 < alpha < 1, f"alpha={alpha}: must be in (0, 1)")
    require(max_iter >= 1, f"max_iter={max_iter}: must be at least 1")
    require(tol >= 0, f"tol={tol}: must be >= 0")
    require(block_size >= 1, f"block_size={block_size}: must be at least 1")
    require(fused_min_items >= 0, f"fused_min_items={fused_min_items}: must be >= 0")
    adjacency = arrays.read_adjacency(graph_path)
    n = adjacency.shape[0]
    anchors = tables.read_anchors(anchors_path, n_items=n, owner=str(graph_path))
    sizes: dict = {}
    k = autosize.resolve("diffuse.k", k, n, sizes)
    require(k >= 1, f"k={k}: must be at least 1")
    require(k < n, autosize.too_large({"diffuse.k": k, "mine.k_neg": None}, n,
                                      bound=f"diffuse.k < {n} items, mine.k_neg <= diffuse.k"))
    log_auto(sizes)
    require(truncate >= 0 and agreement_sample >= 0 and threads >= 0,
            "truncate, agreement_sample and threads must be >= 0")
    threads = threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    require(truncate == 0 or k <= truncate, f"k={k}: with truncate={truncate} at most {truncate} neighbours exist")
    fused = n >= fused_min_items
    log.info("block CG: %s", "fused (numba)" if fused else "scipy products")
    options = {"alpha": alpha, "max_iter": max_iter, "tol": tol, "k": k, "dtype": dtype, "truncate": truncate}
    features = read_truncation_features(features_path, adjacency) if truncate else None
    with timed(f"diffused from {len(anchors)} anchors"), \
            tqdm(total=len(anchors), desc="diffuse", unit="anchor", leave=False) as bar:
        if truncate:
            result, agreement = truncated_solve(features, adjacency, anchors, truncate, agreement_sample,
                                                k, alpha, max_iter, tol, block_size, reorder, DTYPES[dtype], bar)
        else:
            result = manifold_neighbours(adjacency, anchors, k, alpha, max_iter, tol, block_size, reorder,
                                         DTYPES[dtype], progress=bar.update, threads=threads, fused=fused)
    report = convergence_report(result, options)
    report["auto_sizes"] = sizes
    if truncate:
        report["truncation"] = agreement
        log.info("truncated top-%d agrees with the full solve at %.3f", k, agreement["agreement_at_k"])
    out_dir = Path(out_dir)
    tables.write_manifold_knn(out_dir / "manifold_knn.parquet", anchors, result.ids, result.similarities)
    artifacts.save_json(out_dir / "report.json", report)
    log.info("mean relative residual %.3g (max %.3g) after %.1f iterations on average",
             report["relative_residual"]["mean"], report["relative_residual"]["max"], report["iterations"]["mean"])


if __name__ == "__main__":
    main()
