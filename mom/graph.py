"""Euclidean k-nearest-neighbour search and the reciprocal kNN graph (docs/method.md section 2).

Self-neighbour convention (explicit, as docs/method.md asks): ``k`` counts the item
itself, like the authors' code — with ``k = 30`` every item has ``k - 1 = 29``
*other* candidates for its edges. :func:`knn_search` always returns other
items only (rank 1 = nearest other item), ``k - 1`` of them when
``count_self=True`` and ``k`` of them when ``count_self=False``.

An item is never its own neighbour, even when it has exact duplicates: a
duplicate has similarity 1 and may come before the item itself in the search
results, so the item is removed by id (or, when a tie pushed it out of the
results altogether, the last result is dropped).

Devices: with the GPU build of faiss, exact and IVF search can run on every
visible GPU (:func:`resolve_search_device`); faiss has no GPU HNSW, so HNSW
stays on the CPU. GPU search finds the same neighbours up to floating-point
rounding and ties, which are ordered as on the CPU (:func:`drop_self`). The GPU
path was never run in this project (no GPU in its CI).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import faiss
import numpy as np
import scipy.sparse as sp
from scipy.sparse import csgraph

from mom.errors import InputError

log = logging.getLogger(__name__)

SEARCH_METHODS = ("auto", "exact", "hnsw", "ivf")
SEARCH_DEVICES = ("cpu", "cuda", "auto")
GPU_MAX_K = 2048  # faiss GPU indexes return at most this many results per query


@dataclass(frozen=True)
class SearchSettings:
    """How to find neighbours: ``exact`` brute force, or approximate ``hnsw``/``ivf``.

    ``auto`` is exact up to ``exact_max_items`` items and HNSW above.
    """

    method: str = "auto"
    exact_max_items: int = 200_000
    hnsw_m: int = 32
    hnsw_ef_construction: int = 80
    hnsw_ef_search: int = 64
    hnsw_self_entry: bool = True
    ivf_nlist: int = 4096
    ivf_nprobe: int = 64
    batch_size: int = 16384
    seed: int = 0
    device: str = "cpu"  # cpu | cuda, as resolve_search_device gives it

    def resolve(self, n_items: int) -> str:
        if self.method not in SEARCH_METHODS:
            raise InputError(f"search: unknown method {self.method!r}; allowed: {', '.join(SEARCH_METHODS)}")
        if self.method == "auto":
            return "exact" if n_items <= self.exact_max_items else "hnsw"
        return self.method


def visible_gpus() -> int:
    """GPUs faiss can search on: 0 with the CPU-only build (no ``get_num_gpus``, or it says 0)."""
    get_num_gpus = getattr(faiss, "get_num_gpus", None)
    return int(get_num_gpus()) if get_num_gpus is not None else 0


def resolve_search_device(requested: str, gpus_available: int) -> str:
    """``cpu`` or ``cuda`` for the ``device`` option: ``auto`` is cuda when faiss sees a GPU."""
    if requested not in SEARCH_DEVICES:
        raise InputError(f"device: {requested!r} is not one of {', '.join(SEARCH_DEVICES)}")
    if requested == "auto":
        return "cuda" if gpus_available > 0 else "cpu"
    if requested == "cuda" and gpus_available < 1:
        raise InputError("device: cuda needs the GPU build of faiss (faiss-gpu, not faiss-cpu) and a visible GPU; "
                         "found none (use cpu or auto)")
    return requested


def method_device(method: str, device: str) -> str:
    """Where ``method`` searches on the resolved ``device``: faiss has no GPU HNSW."""
    return "cpu" if method == "hnsw" else device


def check_features(features: np.ndarray, name: str = "features") -> None:
    """Raise :class:`InputError` unless ``features`` is a finite 2-D float matrix."""
    if features.ndim != 2:
        raise InputError(f"{name}: expected a 2-D array (items x dims), got shape {features.shape}")
    if not np.issubdtype(features.dtype, np.floating):
        raise InputError(f"{name}: expected floating point values, got {features.dtype}")
    bad_rows = []
    for start in range(0, features.shape[0], 65536):
        block = np.asarray(features[start:start + 65536])
        bad = np.flatnonzero(~np.isfinite(block).all(axis=1))
        bad_rows.extend((bad + start).tolist())
    if bad_rows:
        shown = ", ".join(str(row) for row in bad_rows[:10])
        more = f" and {len(bad_rows) - 10} more" if len(bad_rows) > 10 else ""
        raise InputError(f"{name}: NaN or inf values in rows {shown}{more}; fix or drop these items")


def neighbours_per_item(k: int, count_self: bool) -> int:
    """Number of *other* items in ``NN_k``: ``k - 1`` when the item counts itself."""
    return k - 1 if count_self else k


def check_k(k: int, n_items: int, option: str = "k") -> None:
    if k < 1:
        raise InputError(f"{option}={k}: must be at least 1")
    if k >= n_items:
        raise InputError(f"{option}={k}: must be smaller than the number of items ({n_items})")


def drop_self(ids: np.ndarray, sims: np.ndarray, own, n_keep: int) -> tuple[np.ndarray, np.ndarray]:
    """Remove each query's own id from rows of search results with one spare column.

    Row r belongs to item ``own + r`` (``own`` an int) or ``own[r]`` (an array). Results are re-sorted by descending
    similarity, ties by ascending id, so the output does not depend on faiss's
    tie order. Where the item is absent (duplicates filled the list) the last
    column is dropped instead. Missing results (id -1) keep id -1.
    """
    own = (np.arange(own, own + ids.shape[0]) if np.isscalar(own) else np.asarray(own))[:, None]
    sims = np.where(ids < 0, -np.inf, sims).astype(np.float32)
    ids, sims = _sort_rows(ids, sims)
    is_self = ids == own
    missing = ~is_self.any(axis=1)
    is_self[missing, -1] = True
    keep = ~is_self
    ids = ids[keep].reshape(ids.shape[0], -1)[:, :n_keep]
    sims = sims[keep].reshape(ids.shape[0], -1)[:, :n_keep]
    return ids, sims


def _sort_rows(ids: np.ndarray, sims: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows sorted by descending similarity, ties by ascending id.

    faiss returns rows already sorted by similarity, so only rows holding a tie
    (or out of order) are re-sorted.
    """
    unsorted = (np.diff(sims, axis=1) >= 0).any(axis=1)
    ids, sims = ids.copy(), sims.copy()
    for row in np.flatnonzero(unsorted):
        order = np.lexsort((ids[row], -sims[row]))
        ids[row], sims[row] = ids[row][order], sims[row][order]
    return ids, sims


def exact_search(queries: np.ndarray, base: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force inner-product search (faiss, BLAS), no copy of ``base`` into an index."""
    sims, ids = faiss.knn(np.ascontiguousarray(queries, dtype=np.float32),
                          np.ascontiguousarray(base, dtype=np.float32), k,
                          metric=faiss.METRIC_INNER_PRODUCT)
    return ids.astype(np.int64), sims


def build_index(features: np.ndarray, method: str, settings: SearchSettings) -> faiss.Index:
    """An inner-product index holding ``features``: HNSW or IVF-Flat (approximate), or
    flat (exact, on GPUs only: on the CPU exact search needs no index, see :func:`exact_search`)."""
    n = features.shape[0]
    index = empty_index(features, method, settings)
    if method_device(method, settings.device) == "cuda":
        index = to_gpus(index, method)
    if method == "hnsw":
        # one call: faiss links each batch of an HNSW add among itself, so adding in
        # batches wrecks the graph (recall 0.997 -> 0.98 at 16k-item batches on 20k items)
        index.add(np.ascontiguousarray(features, dtype=np.float32))
    else:
        for start in range(0, n, settings.batch_size):
            index.add(np.ascontiguousarray(features[start:start + settings.batch_size], dtype=np.float32))
    return index


def empty_index(features: np.ndarray, method: str, settings: SearchSettings) -> faiss.Index:
    """The CPU index of ``method``, trained (IVF) but empty."""
    n, dim = features.shape
    if method == "exact":
        return faiss.IndexFlatIP(dim)
    if method == "hnsw":
        index = faiss.IndexHNSWFlat(dim, settings.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = settings.hnsw_ef_construction
        index.hnsw.efSearch = settings.hnsw_ef_search
    elif method == "ivf":
        nlist = max(1, min(settings.ivf_nlist, n // 39))
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(settings.seed)
        sample = np.sort(rng.choice(n, size=min(n, nlist * 64), replace=False))
        index.cp.seed = settings.seed
        index.train(np.ascontiguousarray(features[sample], dtype=np.float32))
        index.nprobe = min(settings.ivf_nprobe, nlist)
    else:
        raise InputError(f"search: no index for method {method!r}")
    return index


def to_gpus(index: faiss.Index, method: str) -> faiss.Index:
    """A copy of the (empty) CPU ``index`` on every visible GPU, each searching part of the queries."""
    gpu_index = faiss.index_cpu_to_all_gpus(index)
    if method == "ivf":  # the copy to several GPUs may not carry nprobe over
        faiss.GpuParameterSpace().set_index_parameter(gpu_index, "nprobe", index.nprobe)
    return gpu_index


def hnsw_self_search(index: faiss.IndexHNSW, block: np.ndarray, first_id: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Neighbours of indexed items, each search entering the HNSW base layer at the item itself.

    The item's own node is the best possible entry point, so the descent through
    the upper layers is skipped: faster, and no greedy search gets stuck far from
    its target (which on curve-like data loses whole neighbourhoods).
    """
    count = block.shape[0]
    entry = np.arange(first_id, first_id + count, dtype=np.int32)
    # the HNSW search works with distances; for inner product these are negated similarities
    entry_distance = -np.einsum("ij,ij->i", block, block).astype(np.float32)
    sims = np.empty((count, k), dtype=np.float32)
    ids = np.empty((count, k), dtype=np.int64)
    index.search_level_0(count, faiss.swig_ptr(block), k, faiss.swig_ptr(entry), faiss.swig_ptr(entry_distance),
                         faiss.swig_ptr(sims), faiss.swig_ptr(ids), 1, 1)
    return sims, ids


def knn_search(features: np.ndarray, k: int, count_self: bool = True,
               settings: SearchSettings = SearchSettings(), progress=None) -> tuple[np.ndarray, np.ndarray, str]:
    """The Euclidean neighbours ``NN_k^e`` of every item, self excluded.

    Returns ``(ids, similarities, method)``: ``ids`` int64 (n, m) with
    ``m = neighbours_per_item(k, count_self)``, sorted by descending inner
    product ``y_i . y_j`` (ties: smaller id first); ``method`` is the search
    actually used. Approximate search may return fewer than m results for some
    items (id -1, similarity -inf).
    """
    n = features.shape[0]
    check_k(k, n)
    n_other = neighbours_per_item(k, count_self)
    method = settings.resolve(n)
    device = method_device(method, settings.device)
    if device != settings.device:
        log.info("%s search has no GPU implementation in faiss: it runs on the CPU", method)
    if device == "cuda" and n_other + 1 > GPU_MAX_K:
        raise InputError(f"k={k}: faiss searches at most {GPU_MAX_K} neighbours per item on a GPU; use device cpu")
    index = None if method == "exact" and device == "cpu" else build_index(features, method, settings)
    ids = np.empty((n, n_other), dtype=np.int64)
    sims = np.empty((n, n_other), dtype=np.float32)
    for start in range(0, n, settings.batch_size):
        block = np.ascontiguousarray(features[start:start + settings.batch_size], dtype=np.float32)
        if index is None:
            block_ids, block_sims = exact_search(block, features, n_other + 1)
        elif method == "hnsw" and settings.hnsw_self_entry:
            block_sims, block_ids = hnsw_self_search(index, block, start, n_other + 1)
        else:
            block_sims, block_ids = index.search(block, n_other + 1)
        block_ids, block_sims = drop_self(block_ids.astype(np.int64), block_sims, start, n_other)
        ids[start:start + len(block)] = block_ids
        sims[start:start + len(block)] = block_sims
        if progress is not None:
            progress(len(block))
    return ids, sims, method


def search_recall(features: np.ndarray, ids: np.ndarray, sample: np.ndarray, count_self: bool = True) -> float:
    """Recall@m of the neighbour lists ``ids`` against exact search, averaged over ``sample``.

    m is the width of ``ids`` (the other items of ``NN_k``).
    """
    n_other = ids.shape[1]
    exact_ids, _ = exact_search(np.asarray(features[sample]), features, n_other + 1)
    hits = 0
    for row, item in enumerate(sample):
        truth = exact_ids[row][exact_ids[row] != item][:n_other]
        hits += np.intersect1d(truth, ids[item]).size
    return hits / (len(sample) * n_other)


def euclidean_similarity(inner_products: np.ndarray, gamma: float) -> np.ndarray:
    """``s_e = [y_i . y_j]_+ ^ gamma`` (docs/method.md notation)."""
    return np.power(np.maximum(inner_products, 0), gamma, dtype=np.float32)


def reciprocal_graph(ids: np.ndarray, sims: np.ndarray, gamma: float) -> sp.csr_matrix:
    """Adjacency of eq. (1): ``a_ij = s_e(y_i, y_j)`` iff i and j are in each other's ``NN_k``.

    ``ids``/``sims`` are the neighbour lists of :func:`knn_search` (self
    excluded, id -1 for missing). Symmetric, zero diagonal, float32, CSR with
    sorted indices. Mutual neighbours with non-positive inner product have
    weight 0 and are therefore not edges. Where the two searches computed a
    pair's similarity with different rounding, the smaller value is kept so the
    matrix is exactly symmetric.
    """
    n = ids.shape[0]
    rows = np.repeat(np.arange(n, dtype=np.int64), ids.shape[1])
    cols = ids.ravel()
    weights = euclidean_similarity(sims.ravel(), gamma)
    valid = (cols >= 0) & (cols != rows) & (weights > 0)
    directed = sp.csr_matrix((weights[valid], (rows[valid], cols[valid])), shape=(n, n), dtype=np.float32)
    adjacency = directed.minimum(directed.T).tocsr()
    adjacency.eliminate_zeros()
    adjacency.sort_indices()
    return adjacency


def weighted_degree(adjacency: sp.csr_matrix) -> np.ndarray:
    """``d = A 1`` accumulated in float64 (scipy's own ``sum`` accumulates in the matrix dtype)."""
    adjacency = sp.csr_matrix(adjacency)
    rows = np.repeat(np.arange(adjacency.shape[0]), np.diff(adjacency.indptr))
    return np.bincount(rows, weights=adjacency.data.astype(np.float64), minlength=adjacency.shape[0])


def graph_report(adjacency: sp.csr_matrix) -> dict:
    """Edges, degree statistics, isolated nodes and connected components of a graph."""
    n = adjacency.shape[0]
    degree = np.diff(adjacency.indptr)
    weighted = weighted_degree(adjacency)
    n_components, labels = csgraph.connected_components(adjacency, directed=False)
    sizes = np.bincount(labels)
    return {
        "nodes": int(n),
        "edges": int(adjacency.nnz // 2),
        "degree": {
            "mean": float(degree.mean()) if n else 0.0,
            "min": int(degree.min()) if n else 0,
            "median": float(np.median(degree)) if n else 0.0,
            "max": int(degree.max()) if n else 0,
        },
        "weighted_degree": {
            "mean": float(weighted.mean()) if n else 0.0,
            "max": float(weighted.max()) if n else 0.0,
        },
        "isolated_nodes": int((degree == 0).sum()),
        "components": {
            "count": int(n_components),
            "count_without_isolated": int((sizes > 1).sum()),
            "largest": int(sizes.max()) if n else 0,
            "largest_fraction": float(sizes.max() / n) if n else 0.0,
        },
    }


def neighbours_of(features: np.ndarray, items: np.ndarray, n_other: int, batch_size: int = 1024
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Exact ``n_other`` nearest *other* items of each of ``items`` (brute force, all features).

    Same order and self/duplicate handling as :func:`knn_search`. Cheap for a
    few thousand anchors even at 1M items (one matrix product per batch).
    """
    n = features.shape[0]
    check_k(n_other, n, "k")
    items = np.asarray(items, dtype=np.int64)
    ids = np.empty((len(items), n_other), dtype=np.int64)
    sims = np.empty((len(items), n_other), dtype=np.float32)
    for start in range(0, len(items), batch_size):
        batch = items[start:start + batch_size]
        block_ids, block_sims = exact_search(np.asarray(features[batch]), features, n_other + 1)
        ids[start:start + len(batch)], sims[start:start + len(batch)] = drop_self(block_ids, block_sims, batch, n_other)
    return ids, sims
