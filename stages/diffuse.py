"""Stage ``diffuse``: manifold neighbours of every anchor (method.md section 4).

Reads ``--graph`` (``adjacency.npz``) and ``--anchors`` (``anchors.parquet``).
Writes to ``--out-dir``: ``manifold_knn.parquet`` (``anchor, neighbour int64,
rank int32 (1 = largest s_m, anchor itself excluded), similarity float32 =
f_anchor*(neighbour)``; at most ``--k`` rows per anchor, only positive
similarities) and ``report.json`` (convergence: relative residuals
``||b - (I - alpha A_hat) f|| / ||b||`` and iterations per anchor,
the mean residual after each iteration).

``--k`` must be at least the ``mine`` stage's ``k_neg`` (its set differences need
manifold membership that deep).
"""
from __future__ import annotations

import logging
from pathlib import Path

import click
import numpy as np
import pyarrow as pa
from tqdm import tqdm

from mom import artifacts
from mom.diffusion import manifold_neighbours
from stages._cli import require, stage_command, timed

log = logging.getLogger("mom")

DTYPES = {"float32": np.float32, "float64": np.float64}


def read_anchors(path) -> np.ndarray:
    table = artifacts.load_parquet(path, columns=["item", "rank"])
    items = table.column("item").to_numpy()
    require(len(items) > 0, f"{path}: no anchors")
    require((np.diff(table.column("rank").to_numpy()) > 0).all(), f"{path}: rows not in rank order")
    return items


def manifold_table(anchors: np.ndarray, ids: np.ndarray, sims: np.ndarray) -> pa.Table:
    width = ids.shape[1]
    valid = (ids >= 0).ravel()
    return pa.table({
        "anchor": pa.array(np.repeat(anchors, width)[valid], pa.int64()),
        "neighbour": pa.array(ids.ravel()[valid], pa.int64()),
        "rank": pa.array(np.tile(np.arange(1, width + 1, dtype=np.int32), len(anchors))[valid], pa.int32()),
        "similarity": pa.array(sims.ravel()[valid], pa.float32()),
    })


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


@click.command()
@click.option("--alpha", type=float, default=0.99, show_default=True, help="diffusion parameter in (0, 1)")
@click.option("--max_iter", type=int, default=20, show_default=True, help="CG iterations (authors: 20)")
@click.option("--tol", type=float, default=1e-6, show_default=True, help="stop a column at this relative residual")
@click.option("--block_size", type=int, default=64, show_default=True, help="anchors solved together")
@click.option("--k", type=int, default=100, show_default=True, help="manifold neighbours kept per anchor (>= mine k_neg)")
@click.option("--reorder/--no-reorder", default=True, show_default=True,
              help="permute nodes for memory locality (reverse Cuthill-McKee); same result, faster")
@click.option("--dtype", type=click.Choice(sorted(DTYPES)), default="float32", show_default=True)
@click.option("--graph", "graph_path", type=click.Path(dir_okay=False), default="data/graph/adjacency.npz",
              show_default=True)
@click.option("--anchors", "anchors_path", type=click.Path(dir_okay=False), default="data/anchors/anchors.parquet",
              show_default=True)
@click.option("--out-dir", "out_dir", type=click.Path(file_okay=False), default="data/diffuse", show_default=True)
@stage_command("diffuse")
def main(alpha, max_iter, tol, block_size, k, reorder, dtype, graph_path, anchors_path, out_dir):
    """Diffuse from every anchor and keep its top-k manifold neighbours."""
    require(0 < alpha < 1, f"alpha={alpha}: must be in (0, 1)")
    require(max_iter >= 1, f"max_iter={max_iter}: must be at least 1")
    require(tol >= 0, f"tol={tol}: must be >= 0")
    require(block_size >= 1, f"block_size={block_size}: must be at least 1")
    adjacency = artifacts.load_csr(graph_path)
    anchors = read_anchors(anchors_path)
    n = adjacency.shape[0]
    require(1 <= k < n, f"k={k}: must be between 1 and the number of items minus 1 ({n - 1})")
    require(anchors.min() >= 0 and anchors.max() < n, f"{anchors_path}: anchor ids outside 0..{n - 1}")
    with timed(f"diffused from {len(anchors)} anchors"), \
            tqdm(total=len(anchors), desc="diffuse", unit="anchor", leave=False) as bar:
        result = manifold_neighbours(adjacency, anchors, k, alpha, max_iter, tol, block_size, reorder,
                                     DTYPES[dtype], progress=bar.update)
    options = {"alpha": alpha, "max_iter": max_iter, "tol": tol, "k": k, "dtype": dtype}
    report = convergence_report(result, options)
    out_dir = Path(out_dir)
    artifacts.save_parquet(out_dir / "manifold_knn.parquet", manifold_table(anchors, result.ids, result.similarities))
    artifacts.save_json(out_dir / "report.json", report)
    log.info("mean relative residual %.3g (max %.3g) after %.1f iterations on average",
             report["relative_residual"]["mean"], report["relative_residual"]["max"], report["iterations"]["mean"])


if __name__ == "__main__":
    main()
