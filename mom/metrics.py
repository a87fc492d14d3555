"""Evaluation measures of docs/method.md section 8.

- Recall@K, and NMI and F1 of k-means: the fine-grained protocol (CUB-200-2011 style).
- Average precision with junk items, mAP, mP@k and the revisited Easy / Medium /
  Hard protocols: the retrieval protocol (Oxford / Paris, revisited). AP is
  computed the way the revisited benchmark's evaluation code does it: the area
  under the precision-recall curve by the trapezoid rule between consecutive
  recall points, with junk items removed from the ranking first.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from sklearn.cluster import KMeans
from sklearn.metrics import normalized_mutual_info_score

# Rows of the (queries x items) distance block computed at once in recall_at_k:
# about 2**25 float32 values (128 MiB), whatever the collection size.
_BLOCK_ELEMENTS = 2**25


def nearest_neighbours(embeddings: np.ndarray, k: int) -> np.ndarray:
    """Indices (n, k) of the k nearest other items of every item, nearest first.

    Euclidean distance (for l2-normalized rows the same order as descending dot
    product); the item itself is excluded. Computed in blocks of queries so the
    full n x n distance matrix never exists.
    """
    embeddings = np.asarray(embeddings, dtype=np.float32)
    n = embeddings.shape[0]
    if not 0 < k < n:
        raise ValueError(f"k must be in 1..{n - 1} for {n} items, got {k}")
    squared_norms = np.einsum("ij,ij->i", embeddings, embeddings)
    block = max(1, _BLOCK_ELEMENTS // n)
    result = np.empty((n, k), dtype=np.int64)
    for start in range(0, n, block):
        stop = min(start + block, n)
        # ||q - x||^2 = ||q||^2 + ||x||^2 - 2 q.x ; ||q||^2 is constant per row.
        distances = squared_norms[None, :] - 2.0 * embeddings[start:stop] @ embeddings.T
        distances[np.arange(stop - start), np.arange(start, stop)] = np.inf
        candidates = np.argpartition(distances, k - 1, axis=1)[:, :k]
        candidate_distances = np.take_along_axis(distances, candidates, axis=1)
        order = np.lexsort((candidates, candidate_distances), axis=1)
        result[start:stop] = np.take_along_axis(candidates, order, axis=1)
    return result


def recall_at_k(embeddings: np.ndarray, labels: np.ndarray, ks: Sequence[int] = (1, 2, 4, 8)) -> dict[int, float]:
    """Recall@K (docs/method.md section 8): the fraction of items that have at least
    one item of their own class among their K nearest *other* items.

    Every item is a query against all the others. Returns ``{K: recall}``.
    """
    labels = np.asarray(labels)
    ks = sorted(int(k) for k in ks)
    if len(labels) != len(embeddings):
        raise ValueError(f"{len(embeddings)} embeddings but {len(labels)} labels")
    neighbours = nearest_neighbours(embeddings, ks[-1])
    same_class = labels[neighbours] == labels[:, None]
    hit_within = np.logical_or.accumulate(same_class, axis=1)
    return {k: float(hit_within[:, k - 1].mean()) for k in ks}


def kmeans_clusters(embeddings: np.ndarray, n_clusters: int, seed: int, n_init: int) -> np.ndarray:
    """Cluster assignment by scikit-learn's KMeans (Lloyd, k-means++ seeding)."""
    kmeans = KMeans(n_clusters=n_clusters, random_state=seed, n_init=n_init)
    return kmeans.fit_predict(np.asarray(embeddings, dtype=np.float64))


def nmi_kmeans(embeddings: np.ndarray, labels: np.ndarray, n_clusters: int, seed: int, n_init: int) -> float:
    """NMI between the labels and a k-means clustering (docs/method.md section 8).

    scikit-learn ``KMeans(n_clusters, random_state=seed, n_init=n_init)``;
    NMI normalized by the arithmetic mean of the two entropies (scikit-learn's
    default, the usual choice in the metric-learning literature).
    """
    return clustering_nmi(labels, kmeans_clusters(embeddings, n_clusters, seed, n_init))


def clustering_nmi(labels: np.ndarray, clusters: np.ndarray) -> float:
    """NMI of a clustering against the labels, arithmetic-mean normalization."""
    return float(normalized_mutual_info_score(np.asarray(labels), np.asarray(clusters), average_method="arithmetic"))


def _same_group_pairs(counts: np.ndarray) -> int:
    """Unordered pairs inside groups of the given sizes: ``sum n (n - 1) / 2``."""
    counts = np.asarray(counts, dtype=np.int64)
    return int(np.sum(counts * (counts - 1) // 2))


def clustering_f1(labels: np.ndarray, clusters: np.ndarray) -> float:
    """Pairwise F1 of a clustering against the labels (docs/method.md section 8).

    Over unordered pairs of distinct items: precision = pairs in one cluster
    that share a class / pairs in one cluster; recall = the same / pairs that
    share a class; F1 = their harmonic mean = ``2 TP / (pairs in one cluster +
    pairs of one class)``. Counted from the contingency table in
    ``O(n + classes x clusters)``.
    """
    labels, clusters = np.asarray(labels), np.asarray(clusters)
    if labels.shape != clusters.shape or labels.ndim != 1:
        raise ValueError(f"labels {labels.shape} and clusters {clusters.shape} need one entry per item")
    _, label_index = np.unique(labels, return_inverse=True)
    _, cluster_index = np.unique(clusters, return_inverse=True)
    joint = np.zeros((label_index.max(initial=-1) + 1, cluster_index.max(initial=-1) + 1), dtype=np.int64)
    np.add.at(joint, (label_index, cluster_index), 1)
    true_positives = _same_group_pairs(joint)
    same_cluster, same_class = _same_group_pairs(joint.sum(axis=0)), _same_group_pairs(joint.sum(axis=1))
    if same_cluster + same_class == 0:
        raise ValueError("pairwise F1 is undefined: no two items share a class or a cluster")
    return 2.0 * true_positives / (same_cluster + same_class)


def f1_kmeans(embeddings: np.ndarray, labels: np.ndarray, n_clusters: int, seed: int, n_init: int) -> float:
    """Pairwise F1 (:func:`clustering_f1`) of the k-means clustering that
    :func:`nmi_kmeans` scores: the same :func:`kmeans_clusters` call."""
    return clustering_f1(labels, kmeans_clusters(embeddings, n_clusters, seed, n_init))


def kmeans_description(n_clusters: int, seed: int, n_init: int) -> dict:
    """What :func:`nmi_kmeans` ran, for the metrics file."""
    return {
        "implementation": "sklearn.cluster.KMeans (lloyd, k-means++ init)",
        "n_clusters": int(n_clusters),
        "seed": int(seed),
        "n_init": int(n_init),
        "nmi_average": "arithmetic",
    }


# --------------------------------------------------------------------------
# Retrieval: AP with junk, mAP, mP@k, revisited protocols.


def positive_ranks(ranking: np.ndarray, positives, junk=()) -> np.ndarray:
    """0-based positions of the positives in ``ranking`` once the junk items are
    removed from it (a junk item neither helps nor hurts).

    ``ranking`` lists database ids, best first. Returned sorted ascending.
    """
    ranking = np.asarray(ranking)
    is_positive = np.isin(ranking, np.asarray(positives, dtype=ranking.dtype))
    is_junk = np.isin(ranking, np.asarray(junk, dtype=ranking.dtype)) & ~is_positive
    kept_positive = is_positive[~is_junk]
    return np.flatnonzero(kept_positive)


def average_precision(ranks: np.ndarray, n_positives: int) -> float:
    """AP from the 0-based ranks of the retrieved positives (junk removed).

    Trapezoid rule between consecutive recall points: the j-th positive (j from
    0) at rank r adds ``1/n_positives`` of recall, with the precision averaged
    between just before it (``j / r``, taken as 1 at r = 0) and at it
    (``(j + 1) / (r + 1)``). Positives missing from the ranking count as never
    retrieved (``n_positives`` may exceed ``len(ranks)``).
    """
    ranks = np.sort(np.asarray(ranks, dtype=np.float64))
    if n_positives <= 0:
        raise ValueError("average precision needs at least one positive")
    found = np.arange(len(ranks), dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision_before = np.where(ranks == 0, 1.0, found / ranks)
    precision_at = (found + 1.0) / (ranks + 1.0)
    return float(np.sum(precision_before + precision_at) / (2.0 * n_positives))


def precision_at_k(ranks: np.ndarray, ks: Sequence[int]) -> np.ndarray:
    """Precision at each k, as the revisited benchmark defines it: the
    denominator is ``min(k, rank of the last positive)`` (1-based), so a query
    with fewer positives than k is not penalised for it."""
    ranks_1based = np.sort(np.asarray(ranks)) + 1
    if len(ranks_1based) == 0:
        return np.zeros(len(ks))
    last = ranks_1based[-1]
    values = []
    for k in ks:
        cutoff = min(int(k), int(last))
        values.append(np.count_nonzero(ranks_1based <= cutoff) / cutoff)
    return np.asarray(values, dtype=np.float64)


def _as_rows(rankings) -> list[np.ndarray]:
    return [np.asarray(row) for row in rankings]


def mean_average_precision(rankings, positives, junk=None) -> dict:
    """mAP over queries (docs/method.md section 8).

    ``rankings[q]``: database ids ranked for query q; ``positives[q]`` and
    ``junk[q]``: id lists. Queries without positives are excluded from the mean
    (their AP is NaN in ``per_query``). Returns ``{"map", "per_query",
    "n_queries"}`` where ``n_queries`` counts the queries that were averaged.
    """
    rankings = _as_rows(rankings)
    junk = junk if junk is not None else [()] * len(rankings)
    if not len(rankings) == len(positives) == len(junk):
        raise ValueError("rankings, positives and junk need one entry per query")
    per_query = np.full(len(rankings), np.nan)
    for query, (ranking, query_positives, query_junk) in enumerate(zip(rankings, positives, junk)):
        if len(query_positives) == 0:
            continue
        ranks = positive_ranks(ranking, query_positives, query_junk)
        per_query[query] = average_precision(ranks, len(query_positives))
    valid = ~np.isnan(per_query)
    mean = float(per_query[valid].mean()) if valid.any() else float("nan")
    return {"map": mean, "per_query": per_query, "n_queries": int(valid.sum())}


def mean_precision_at_k(rankings, positives, junk=None, ks: Sequence[int] = (1, 5, 10)) -> dict[int, float]:
    """mP@k over the queries that have positives (revisited benchmark's
    definition, see :func:`precision_at_k`); junk removed from the ranking."""
    rankings = _as_rows(rankings)
    junk = junk if junk is not None else [()] * len(rankings)
    rows = []
    for ranking, query_positives, query_junk in zip(rankings, positives, junk):
        if len(query_positives) == 0:
            continue
        rows.append(precision_at_k(positive_ranks(ranking, query_positives, query_junk), ks))
    if not rows:
        return {int(k): float("nan") for k in ks}
    means = np.mean(rows, axis=0)
    return {int(k): float(value) for k, value in zip(ks, means)}


def revisited_ground_truth(easy, hard, junk) -> dict[str, tuple[list, list]]:
    """(positives, ignored) per query for the revisited protocols:
    Easy: positives easy, ignored junk + hard; Medium: positives easy + hard,
    ignored junk; Hard: positives hard, ignored junk + easy."""
    def union(*lists):
        return [np.concatenate([np.asarray(x, dtype=np.int64) for x in parts]) for parts in zip(*lists)]

    return {
        "easy": ([np.asarray(x, dtype=np.int64) for x in easy], union(junk, hard)),
        "medium": (union(easy, hard), [np.asarray(x, dtype=np.int64) for x in junk]),
        "hard": ([np.asarray(x, dtype=np.int64) for x in hard], union(junk, easy)),
    }


def protocol_evaluation(rankings, protocols: dict[str, tuple[list, list]],
                        ks: Sequence[int] = (1, 5, 10)) -> dict[str, dict]:
    """mAP and mP@k per protocol; ``protocols``: name -> (positives, ignored)
    per query (e.g. :func:`revisited_ground_truth`, or
    :func:`mom.datasets.retrieval.protocol_lists` of a ground-truth table)."""
    results = {}
    for protocol, (positives, ignored) in protocols.items():
        average = mean_average_precision(rankings, positives, ignored)
        results[protocol] = {
            "map": average["map"],
            "n_queries": average["n_queries"],
            "mp_at_k": mean_precision_at_k(rankings, positives, ignored, ks),
        }
    return results


def revisited_evaluation(rankings, easy, hard, junk, ks: Sequence[int] = (1, 5, 10)) -> dict[str, dict]:
    """mAP and mP@k for each revisited protocol (Easy / Medium / Hard)."""
    return protocol_evaluation(rankings, revisited_ground_truth(easy, hard, junk), ks)


def rank_database(queries: np.ndarray, database: np.ndarray, block: int = 256) -> np.ndarray:
    """Database ids ranked for each query by descending dot product
    (l2-normalized descriptors), ties broken by id. Shape (n_queries, n_db)."""
    queries = np.asarray(queries, dtype=np.float32)
    database = np.asarray(database, dtype=np.float32)
    rankings = np.empty((len(queries), len(database)), dtype=np.int64)
    ids = np.arange(len(database))
    for start in range(0, len(queries), block):
        scores = queries[start:start + block] @ database.T
        for row, score in enumerate(scores):
            rankings[start + row] = np.lexsort((ids, -score))
    return rankings


# Label-free measures of an embedding on held-out images (evaluate, without labels).

def neighbour_overlap(first: np.ndarray, second: np.ndarray, k: int) -> float:
    """Mean over items of ``|NN_k(first) & NN_k(second)| / k``: how many of an
    item's k nearest other items two embeddings of the same items share (1: the
    same neighbourhoods, 0: none in common). It measures change, not quality."""
    a, b = nearest_neighbours(first, k), nearest_neighbours(second, k)
    shared = [len(np.intersect1d(row_a, row_b, assume_unique=True)) for row_a, row_b in zip(a, b)]
    return float(np.mean(shared) / k)


def manifold_agreement(embeddings: np.ndarray, manifold_ids: np.ndarray, k: int) -> float:
    """Mean over items of the fraction of their k Euclidean nearest neighbours
    in ``embeddings`` that are among their first k manifold neighbours
    ``manifold_ids[i, :k]`` (-1 = none; rows in item order). 1: the embedding's
    Euclidean neighbours are exactly the manifold neighbours."""
    euclidean = nearest_neighbours(embeddings, k)
    manifold = np.asarray(manifold_ids)[:, :k]
    hits = [len(np.intersect1d(row_e, row_m[row_m >= 0], assume_unique=True)) for row_e, row_m in zip(euclidean, manifold)]
    return float(np.mean(hits) / k)
