"""Anchor selection: stationary distribution, 1-hop local maxima, top N (docs/method.md section 3)."""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from mom.errors import InputError
from mom.graph import weighted_degree

STRATEGIES = ("stationary", "all", "random")
AUTO = "auto"
# strategy auto: every item an anchor up to this many items (the embedded default's
# 6,000, its tuned fine-grained setting), random anchors above, so that the cost of
# diffusion and of a training epoch stays bounded as the collection grows.
ALL_ANCHORS_MAX_ITEMS = 6000


def resolve_strategy(strategy: str, n_items: int) -> str:
    """``strategy``, with ``auto`` = ``all`` up to :data:`ALL_ANCHORS_MAX_ITEMS`
    items, ``random`` above."""
    if strategy != AUTO:
        return strategy
    return "all" if n_items <= ALL_ANCHORS_MAX_ITEMS else "random"


def stationary_distribution(adjacency: sp.csr_matrix) -> np.ndarray:
    """Stationary distribution of the random walk ``P = D^-1 A``, in closed form.

    On a connected graph with symmetric ``A`` the unique solution of
    ``pi P = pi`` is ``pi_i = d_i / sum_j d_j`` (``d = A 1``, weighted degree).
    With several components the walk has one stationary distribution per
    component; we return ``d_i / sum_j d_j`` over the whole graph, i.e. each
    component's distribution weighted by its share of the total degree. On any
    component C, ``pi[C] / pi[C].sum()`` is that component's own distribution
    (what the authors' power iteration computes on the largest one).
    Isolated nodes (degree 0, no transition defined) get probability 0; a
    graph without edges gives all zeros. Never NaN. float64.
    """
    degree = weighted_degree(adjacency)
    total = degree.sum()
    return degree / total if total > 0 else np.zeros_like(degree)


def priority_rank(probability: np.ndarray) -> np.ndarray:
    """Rank of every node by descending probability, ties by ascending id (0 = first)."""
    order = np.lexsort((np.arange(len(probability)), -probability))
    rank = np.empty(len(probability), dtype=np.int64)
    rank[order] = np.arange(len(probability))
    return rank


def local_maxima(adjacency: sp.csr_matrix, probability: np.ndarray) -> np.ndarray:
    """Boolean mask of the 1-hop local maxima of ``probability`` on the graph.

    Node i is a local maximum when it comes before every graph neighbour in
    the order (descending probability, then ascending id): so of two tied
    neighbours only the smaller id counts. Isolated nodes are excluded (they
    have no neighbourhood and no manifold around them).
    """
    rank = priority_rank(probability)
    degree = np.diff(adjacency.indptr)
    has_edges = degree > 0
    best_neighbour = np.full(len(rank), np.iinfo(np.int64).max)
    if adjacency.nnz:
        starts = adjacency.indptr[:-1][has_edges]
        best_neighbour[has_edges] = np.minimum.reduceat(rank[adjacency.indices], starts)
    return has_edges & (rank < best_neighbour)


def select_anchors(adjacency: sp.csr_matrix, strategy: str, count: int | None, seed: int = 0
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Anchor ids and their stationary probabilities, in rank order.

    - ``stationary``: local maxima of :func:`stationary_distribution`, the top
      ``count`` by probability (ties: smaller id); fewer when there are fewer
      local maxima.
    - ``all``: every item, ordered by descending probability (ties: smaller id).
    - ``random``: ``count`` items drawn uniformly without replacement
      (``numpy.random.default_rng(seed)``), in draw order.
    ``count=None`` means no limit (``stationary``/``all``).
    """
    n = adjacency.shape[0]
    probability = stationary_distribution(adjacency)
    if strategy not in STRATEGIES:
        raise InputError(f"strategy={strategy!r}: allowed values are {', '.join(STRATEGIES)}")
    if count is not None and count < 1:
        raise InputError(f"count={count}: must be at least 1")
    if strategy == "random":
        if count is None or count > n:
            raise InputError(f"count={count}: random anchors need a count between 1 and the number of items ({n})")
        items = np.random.default_rng(seed).choice(n, size=count, replace=False).astype(np.int64)
        return items, probability[items]
    order = np.argsort(priority_rank(probability), kind="stable")
    if strategy == "stationary":
        order = order[local_maxima(adjacency, probability)[order]]
    if count is not None:
        order = order[:count]
    return order.astype(np.int64), probability[order]
