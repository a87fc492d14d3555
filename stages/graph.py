"""Stage ``graph``: the reciprocal kNN graph of the training features (docs/method.md section 2).

Reads ``--features`` (``float32 (n, d)``, l2-normalized). Writes to ``--out-dir``:
``adjacency.npz`` (scipy CSR, symmetric, zero diagonal, ``a_ij = [y_i.y_j]_+^gamma``
for mutual neighbours), ``knn.parquet`` (item, neighbour, rank (1 = nearest
other item), similarity = inner product ``y_i.y_j``; self never listed) and
``report.json`` (edges, degrees, isolated nodes, components, search method and,
for approximate search, recall against exact search on a sample).

Self-neighbour convention: ``k`` counts the item itself (``--count_self``, the
authors' choice: k = 30 gives 29 other neighbours); ``--no-count_self`` makes
``k`` the number of other items.

``--device cuda`` (or ``auto`` when faiss sees a GPU) runs exact and IVF search
on every visible GPU; it needs the GPU build of faiss. Untested in this
project (no GPU in its CI).
"""
from __future__ import annotations

import logging
from pathlib import Path

import click
import faiss
import numpy as np
from tqdm import tqdm

from mom import artifacts, autosize
from mom.artifacts import arrays, tables
from mom.graph import (SEARCH_DEVICES, SEARCH_METHODS, SearchSettings, check_features, check_k, graph_report,
                       knn_search, method_device, neighbours_per_item, reciprocal_graph, resolve_search_device,
                       search_recall, visible_gpus)
from stages._cli import AUTO_INT, StageCommand, log_auto, require, stage_command, timed

log = logging.getLogger("mom")


@click.command(cls=StageCommand)
@click.option("--k", type=AUTO_INT, default="auto", show_default=True,
              help="neighbourhood size NN_k (see --count_self); auto: from the item count (mom/autosize.py)")
@click.option("--count_self/--no-count_self", default=True, show_default=True,
              help="the item counts among its own k neighbours (authors' convention: k - 1 other items)")
@click.option("--gamma", type=float, default=3.0, show_default=True, help="similarity power: a_ij = [y_i.y_j]_+^gamma")
@click.option("--search", type=click.Choice(SEARCH_METHODS), default="auto", show_default=True,
              help="auto = exact up to --exact_max_items items, HNSW above")
@click.option("--exact_max_items", type=int, default=200_000, show_default=True)
@click.option("--hnsw_m", type=int, default=32, show_default=True)
@click.option("--hnsw_ef_construction", type=int, default=80, show_default=True,
              help="HNSW build beam (benchmark recall: 40 gave 0.993 at 300k items, 80 gave 0.9999 at 100k)")
@click.option("--hnsw_ef_search", type=int, default=64, show_default=True)
@click.option("--hnsw_self_entry/--no-hnsw_self_entry", default=True, show_default=True,
              help="search each item's neighbours from its own HNSW node (faster, fewer stuck searches)")
@click.option("--ivf_nlist", type=int, default=4096, show_default=True)
@click.option("--ivf_nprobe", type=int, default=64, show_default=True)
@click.option("--recall_sample", type=int, default=1000, show_default=True,
              help="items whose approximate neighbours are checked against exact search (0 = skip)")
@click.option("--threads", type=int, default=0, show_default=True,
              help="faiss threads (0 = all cores); HNSW builds are bit-reproducible only with 1")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="recall sample and IVF training sample")
@click.option("--device", type=click.Choice(SEARCH_DEVICES), default="cpu", show_default=True,
              help="exact and IVF search on the CPU or every visible GPU (faiss-gpu); auto: cuda if faiss sees a GPU")
@click.option("--features", "features_path", type=click.Path(dir_okay=False), default="data/features/train.npy",
              show_default=True)
@click.option("--out-dir", "out_dir", type=click.Path(file_okay=False), default="data/graph", show_default=True)
@stage_command("graph")
def main(k, count_self, gamma, search, exact_max_items, hnsw_m, hnsw_ef_construction, hnsw_ef_search,
         hnsw_self_entry, ivf_nlist,
         ivf_nprobe, recall_sample, threads, seed, device, features_path, out_dir):
    """Build the reciprocal kNN graph, the kNN lists and the graph report."""
    require(autosize.is_auto(k) or k >= 1, f"k={k}: must be at least 1 (or auto)")
    require(gamma > 0, f"gamma={gamma}: must be positive")
    for name, value in (("hnsw_m", hnsw_m), ("hnsw_ef_construction", hnsw_ef_construction),
                        ("hnsw_ef_search", hnsw_ef_search), ("ivf_nlist", ivf_nlist), ("ivf_nprobe", ivf_nprobe)):
        require(value >= 1, f"{name}={value}: must be at least 1")
    require(recall_sample >= 0 and threads >= 0 and exact_max_items >= 0,
            "recall_sample, threads and exact_max_items must be >= 0")
    device = resolve_search_device(device, visible_gpus())
    features = arrays.read_features(features_path, mmap=True)
    with timed("checked features"):
        check_features(features, name=str(features_path))
    n = features.shape[0]
    sizes: dict = {}
    k = autosize.resolve("graph.k", k, n, sizes)
    require(k >= 1, f"k={k}: must be at least 1")
    require(k < n, autosize.too_large({"graph.k": k}, n, bound=f"< {n}"))
    check_k(k, n)
    log_auto(sizes)
    require(neighbours_per_item(k, count_self) >= 1, f"k={k}: with --count_self k must be at least 2")
    if threads:
        faiss.omp_set_num_threads(threads)
    settings = SearchSettings(search, exact_max_items, hnsw_m, hnsw_ef_construction, hnsw_ef_search,
                              hnsw_self_entry, ivf_nlist, ivf_nprobe, seed=seed, device=device)
    with timed("searched neighbours"), tqdm(total=n, desc="graph search", unit="item", leave=False) as bar:
        ids, sims, method = knn_search(features, k, count_self, settings, progress=bar.update)
    searched_on = method_device(method, device)
    log.info("search: %s on %s, %d items x %d neighbours", method, searched_on, n, ids.shape[1])
    with timed("built reciprocal graph"):
        adjacency = reciprocal_graph(ids, sims, gamma)
    report = {
        "convention": {"k": k, "count_self": count_self, "other_neighbours_per_item": int(ids.shape[1]),
                       "gamma": gamma},
        "auto_sizes": sizes,
        **graph_report(adjacency),
        "search": {"method": method, "device": searched_on, "recall_sample": 0, "recall_at_k": None},
    }
    if method != "exact" and recall_sample:
        sample = np.sort(np.random.default_rng(seed).choice(n, size=min(recall_sample, n), replace=False))
        with timed("measured recall"):
            report["search"].update(recall_sample=len(sample), recall_at_k=search_recall(features, ids, sample))
        log.info("recall@%d of %s search: %.4f", ids.shape[1], method, report["search"]["recall_at_k"])
    out_dir = Path(out_dir)
    with timed("wrote graph"):
        arrays.write_adjacency(out_dir / "adjacency.npz", adjacency)
        tables.write_knn(out_dir / "knn.parquet", ids, sims)
        artifacts.save_json(out_dir / "report.json", report)
    log.info("%d edges, %d isolated nodes, %d components", report["edges"], report["isolated_nodes"],
             report["components"]["count"])


if __name__ == "__main__":
    main()
