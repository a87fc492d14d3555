"""Stage ``whiten``: learn a whitening of the fine-tuned descriptors (docs/method.md section 7).

Embeds the ``train`` split with the fine-tuned network (``--model``) and learns
``pca`` (PCA whitening, no pairs) or ``lw`` (learned whitening from matching
pairs: each anchor with its manifold neighbours of rank <= ``lw_neighbours``
from ``--manifold-knn``); ``none`` writes the identity without embedding
anything. Writes ``<out-dir>/whitening.npz`` (``mean``, ``projection``,
``method``; ``np.load`` reads it) and ``<out-dir>/report.json``.
"""
from __future__ import annotations

import logging
from pathlib import Path

import click
import numpy as np

from mom import artifacts, extraction, networks, whitening
from mom.artifacts import tables
from mom.imagestore import ImageStore
from stages._cli import StageCommand, require, stage_command, timed

log = logging.getLogger("mom")

METHODS = ("pca", "lw", "none")


def matching_pairs(path: Path, max_rank: int, n_train: int) -> np.ndarray:
    """``(m, 2)`` pairs (anchor, manifold neighbour of rank <= max_rank)."""
    table = tables.read_manifold_knn(path, n_items=n_train, owner="the train split")
    anchor, neighbour, rank = (table.column(c).to_numpy() for c in ("anchor", "neighbour", "rank"))
    keep = (rank <= max_rank) & (anchor != neighbour)
    pairs = np.stack([anchor[keep], neighbour[keep]], axis=1).astype(np.int64)
    require(len(pairs) > 0, f"{path}: no manifold neighbour of rank <= {max_rank}: no pair to learn Lw from")
    return pairs


@click.command(cls=StageCommand)
@click.option("--model", "model_path", type=click.Path(path_type=Path), default="data/finetune/model.pt", show_default=True)
@click.option("--train", "train_dir", type=click.Path(path_type=Path), default="data/prepared/train", show_default=True)
@click.option("--manifold-knn", "knn_path", type=click.Path(path_type=Path),
              default="data/diffuse/manifold_knn.parquet", show_default=True)
@click.option("--out-dir", type=click.Path(path_type=Path), default="data/whiten", show_default=True)
@click.option("--method", default="none", show_default=True, help="pca | lw | none")
@click.option("--dim", type=int, default=0, show_default=True, help="Output dimensions kept (0: all).")
@click.option("--eps", type=float, default=1e-6, show_default=True, help="Relative ridge on the eigenvalues.")
@click.option("--lw_neighbours", type=int, default=50, show_default=True,
              help="Lw matching pairs: anchor with its manifold neighbours up to this rank.")
@click.option("--scales", type=int, multiple=True, default=(),
              help="Longer image side(s) when embedding (default: those recorded in the model).")
@click.option("--aggregation", default="", help="Multi-scale aggregation: sum | gem (default: the model's).")
@click.option("--batch_size", type=int, default=128, show_default=True)
@stage_command("whiten")
def main(model_path, train_dir, knn_path, out_dir, method, dim, eps, lw_neighbours, scales, aggregation, batch_size):
    require(method in METHODS, f"method: must be one of {', '.join(METHODS)}, got {method!r}")
    require(dim >= 0, f"dim: must be >= 0 (0 = keep all), got {dim}")
    require(eps >= 0, f"eps: must be >= 0, got {eps}")
    require(lw_neighbours >= 1, f"lw_neighbours: must be >= 1, got {lw_neighbours}")
    require(batch_size >= 1, f"batch_size: must be >= 1, got {batch_size}")
    net, extra = networks.load_checkpoint(model_path)
    scales, aggregation = networks.embedding_settings(extra, scales, aggregation)
    d = net.dim
    require(dim <= d, f"dim: the model's descriptors have {d} dimensions, got dim {dim}")
    report = {"method": method, "input_dim": d, "scales": scales, "aggregation": aggregation}

    if method == "none":
        mean, projection = whitening.identity_whitening(d)
    else:
        store = ImageStore.open(train_dir)
        pairs = matching_pairs(knn_path, lw_neighbours, len(store)) if method == "lw" else None
        with timed(f"embedded {len(store)} training items"):
            train = extraction.embed_store(net, store, scales=scales, batch_size=batch_size, aggregation=aggregation)
        if method == "pca":
            mean, projection = whitening.learn_pca_whitening(train, dim or None, eps)
        else:
            mean, projection = whitening.learn_lw_whitening(train, pairs, dim or None, eps)
            report["matching_pairs"] = len(pairs)
        report["training_items"] = len(store)
    report["output_dim"] = int(projection.shape[0])
    whitening.save_whitening(out_dir / "whitening.npz", mean, projection, method)
    artifacts.save_json(out_dir / "report.json", report)
    log.info("%s whitening: %d -> %d dimensions", method, d, projection.shape[0])


if __name__ == "__main__":
    main()
