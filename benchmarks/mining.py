"""Scale benchmark of the mining core (issue 3): graph, anchors, diffuse, mine at 1M x 512.

Generates a deterministic synthetic collection with manifold structure —
smooth random 2-D tori (``--manifold-items`` items each, 100k by default) in a 16-D subspace of
``--dim`` dimensions, isotropic noise, l2-normalized, in random order (see
:func:`synthetic_collection`) — writes it as a memory-mapped
``.npy`` like the extract stage does, and runs the same ``mom`` functions as
the stages, printing wall time and peak resident memory per step:

    python benchmarks/mining.py --n 1000000                # the acceptance run
    python benchmarks/mining.py --n 100000 --exact-subset 50000   # a quick one

Also measured in the same run: exact search on a subset (scaled by n^2 to the
full collection), recall@k of the approximate search against exact search on
``--recall-sample`` items, and scipy's ``cg`` (one call per anchor, 20
iterations) against the block CG, per anchor. Numbers only, no assertions.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: this checkout's mom

import faiss
import numpy as np
import psutil
import scipy.sparse as sp
import torch
from scipy.sparse.linalg import cg

from mom import artifacts
from mom.anchors import select_anchors
from mom.diffusion import diffusion_system, locality_order, manifold_neighbours, normalized_adjacency
from mom.graph import (SearchSettings, check_features, graph_report, knn_search, neighbours_of, reciprocal_graph,
                       search_recall)
from mom.pools import euclidean_positives, manifold_negatives, manifold_positives, random_negatives
from synthetic import synthetic_collection

GIB = 2 ** 30


class PeakMemory:
    """Peak resident set size of this process during a block.

    Resets the kernel's high-water mark (``/proc/self/clear_refs`` = 5) and reads
    ``VmHWM``; where that is not allowed, samples the RSS every 20 ms instead.
    """

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()
        self._thread = None
        self._kernel = self._reset_kernel_peak()

    @staticmethod
    def _reset_kernel_peak() -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            return True
        except OSError:
            return False

    def __enter__(self):
        if not self._kernel:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        process = psutil.Process()
        while not self._stop.is_set():
            self.peak = max(self.peak, process.memory_info().rss)
            time.sleep(0.02)

    def __exit__(self, *exc):
        if self._kernel:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.peak = int(line.split()[1]) * 1024
        else:
            self._stop.set()
            self._thread.join()
        return False


RESULTS: dict = {}


@contextmanager
def step(name: str):
    """Time a step and record its peak RSS in RESULTS."""
    print(f"-- {name} ...", flush=True)
    start = time.perf_counter()
    cpu_start = sum(psutil.Process().cpu_times()[:2])
    with PeakMemory() as memory:
        yield RESULTS.setdefault(name, {})
    # cpu_seconds / seconds well below the thread count means the cores were busy with something else
    RESULTS[name].update(seconds=round(time.perf_counter() - start, 2), peak_rss_gib=round(memory.peak / GIB, 3),
                         cpu_seconds=round(sum(psutil.Process().cpu_times()[:2]) - cpu_start, 1),
                         load_average=round(os.getloadavg()[0], 2))
    print(f"   {name}: {RESULTS[name]}", flush=True)


def scipy_cg_per_anchor(adjacency: sp.csr_matrix, anchors: np.ndarray, alpha: float, iterations: int,
                        reorder: bool) -> float:
    """Seconds per anchor of one ``scipy.sparse.linalg.cg`` call each (x0 = 0, fixed iterations)."""
    if reorder:
        order = locality_order(adjacency)
        position = np.empty(len(order), dtype=np.int64)
        position[order] = np.arange(len(order))
        adjacency = adjacency[order][:, order].tocsr()
        anchors = position[anchors]
    system = diffusion_system(normalized_adjacency(adjacency, dtype=np.float32), alpha)
    start = time.perf_counter()
    for anchor in anchors:
        rhs = np.zeros(system.shape[0], dtype=np.float32)
        rhs[anchor] = 1 - alpha
        cg(system, rhs, x0=np.zeros_like(rhs), rtol=1e-30, atol=0, maxiter=iterations)
    return (time.perf_counter() - start) / len(anchors)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--manifold-items", type=int, default=100_000,
                        help="items per manifold on average (100k: ten 100k-node manifolds at 1M)")
    parser.add_argument("--intrinsic", type=int, default=2, help="intrinsic dimension of the manifolds")
    parser.add_argument("--noise", type=float, default=0.05, help="norm of the isotropic noise")
    parser.add_argument("--subspace", type=int, default=16, help="dimension of the subspace holding the manifolds")
    parser.add_argument("--k", type=int, default=30)
    parser.add_argument("--search", default="hnsw", choices=["hnsw", "ivf", "exact"])
    parser.add_argument("--hnsw-m", type=int, default=32)
    parser.add_argument("--ef-construction", type=int, default=80)
    parser.add_argument("--ef-search", type=int, default=64)
    parser.add_argument("--exact-subset", type=int, default=100_000, help="0: skip the exact timing")
    parser.add_argument("--recall-sample", type=int, default=1000)
    parser.add_argument("--anchors", type=int, default=1500)
    parser.add_argument("--k-neg", type=int, default=10_000)
    parser.add_argument("--k-pos", type=int, default=50)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--max-iter", type=int, default=20)
    parser.add_argument("--no-reorder", action="store_true")
    parser.add_argument("--full-length-anchors", type=int, default=128,
                        help="anchors also solved with full-length vectors (no support tracking; 0: skip)")
    parser.add_argument("--scipy-anchors", type=int, default=8, help="anchors timed with scipy cg (0: skip)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", default="", help="where the features file goes (default: a temp dir)")
    parser.add_argument("--json", default="", help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
        torch.set_num_threads(args.threads)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="mining-bench-"))
    RESULTS["config"] = {**vars(args), "cores": os.cpu_count(), "faiss_threads": faiss.omp_get_max_threads(),
                         "torch_threads": torch.get_num_threads(), "load_average_at_start": os.getloadavg()}
    print(json.dumps(RESULTS["config"]), flush=True)
    n = args.n
    k_neg = min(args.k_neg, n // 2)

    with step("generate"):
        features, _ = synthetic_collection(work / "features.npy", n, args.dim, max(1, n // args.manifold_items),
                                        args.intrinsic, args.subspace, args.noise, args.seed)
    with step("graph") as info:
        check_features(features)
        settings = SearchSettings(method=args.search, hnsw_m=args.hnsw_m, hnsw_ef_construction=args.ef_construction,
                                  hnsw_ef_search=args.ef_search, seed=args.seed)
        start = time.perf_counter()
        ids, sims, _ = knn_search(features, args.k, True, settings)
        info["search_seconds"] = round(time.perf_counter() - start, 2)
        adjacency = reciprocal_graph(ids, sims, gamma=3)
        report = graph_report(adjacency)
        info.update(edges=report["edges"], nnz=int(adjacency.nnz), isolated=report["isolated_nodes"],
                    components=report["components"]["count"], largest_component=report["components"]["largest"],
                    mean_degree=round(report["degree"]["mean"], 2))
        del sims
    with step("graph_recall") as info:
        sample = np.sort(np.random.default_rng(args.seed).choice(n, size=min(args.recall_sample, n), replace=False))
        info["recall_at_k"] = round(search_recall(features, ids, sample), 5)
        info["sample"] = len(sample)
    del ids
    if args.exact_subset:
        with step("exact_subset") as info:
            subset = min(args.exact_subset, n)
            start = time.perf_counter()
            knn_search(np.asarray(features[:subset]), args.k, True, SearchSettings(method="exact"))
            seconds = time.perf_counter() - start
            info.update(items=subset, search_seconds=round(seconds, 2),
                        extrapolated_full_seconds=round(seconds * (n / subset) ** 2, 1))
            info["speedup_of_approximate"] = round(info["extrapolated_full_seconds"] / RESULTS["graph"]["search_seconds"], 1)
    with step("anchors") as info:
        anchors, _ = select_anchors(adjacency, "stationary", args.anchors)
        info["anchors"] = len(anchors)
    with step("diffuse") as info:
        diffusion = manifold_neighbours(adjacency, anchors, k_neg, max_iter=args.max_iter, tol=1e-6,
                                        block_size=args.block_size, reorder=not args.no_reorder,
                                        threads=args.threads or os.cpu_count())
        info.update(per_anchor_seconds=None, mean_relative_residual=float(diffusion.relative_residual.mean()),
                    mean_neighbours=float((diffusion.ids >= 0).sum(axis=1).mean()))
    RESULTS["diffuse"]["per_anchor_seconds"] = round(RESULTS["diffuse"]["seconds"] / len(anchors), 4)
    if args.full_length_anchors:
        # the cost where every iterate fills the whole graph (one giant component):
        # the same solve with the support tracking switched off, on a few blocks
        with step("diffuse_full_length") as info:
            chosen = anchors[:args.full_length_anchors]
            manifold_neighbours(adjacency, chosen, k_neg, max_iter=args.max_iter, tol=1e-6,
                                block_size=args.block_size, reorder=not args.no_reorder, full_fraction=0.0,
                                threads=args.threads or os.cpu_count())
            info.update(anchors=len(chosen))
        RESULTS["diffuse_full_length"]["per_anchor_seconds"] = round(
            RESULTS["diffuse_full_length"]["seconds"] / len(chosen), 4)
    with step("mine") as info:
        euclidean_ids, _ = neighbours_of(features, anchors, k_neg)
        positives = manifold_positives(diffusion.ids, euclidean_ids, args.k_pos, 50)
        negatives = manifold_negatives(diffusion.ids, euclidean_ids, k_neg, 50)
        euclidean_positives(euclidean_ids, 5)
        random_negatives(anchors, euclidean_ids, n, 5, 50, args.seed)
        info.update(k_neg=k_neg, positives_per_anchor=round(len(positives.member) / len(anchors), 2),
                    negatives_per_anchor=round(len(negatives.member) / len(anchors), 2))
    mining = ("graph", "anchors", "diffuse", "mine")
    RESULTS["mining_total"] = {
        "seconds": round(sum(RESULTS[name]["seconds"] for name in mining), 1),
        "peak_rss_gib": max(RESULTS[name]["peak_rss_gib"] for name in mining),
    }
    if args.scipy_anchors:
        with step("scipy_cg") as info:
            chosen = anchors[:args.scipy_anchors]
            info["per_anchor_seconds_original_order"] = round(
                scipy_cg_per_anchor(adjacency, chosen, 0.99, args.max_iter, reorder=False), 4)
            info["per_anchor_seconds_reordered"] = round(
                scipy_cg_per_anchor(adjacency, chosen, 0.99, args.max_iter, reorder=True), 4)
            info["block_cg_speedup_vs_scipy"] = round(
                info["per_anchor_seconds_original_order"] / RESULTS["diffuse"]["per_anchor_seconds"], 2)
            if "diffuse_full_length" in RESULTS:
                info["full_length_block_cg_speedup_vs_scipy"] = round(
                    info["per_anchor_seconds_original_order"] / RESULTS["diffuse_full_length"]["per_anchor_seconds"], 2)
    print(json.dumps(RESULTS, indent=2), flush=True)
    if args.json:
        artifacts.save_json(args.json, RESULTS)


if __name__ == "__main__":
    main()
