"""Per-epoch training tuples (method.md section 6).

One tuple per anchor and epoch: the anchor, one positive drawn uniformly from
``P+``, one negative drawn uniformly from the ``negatives_nearest`` members of
``P-`` that are nearest to the anchor in the *current* embedding (re-mined every
epoch after re-embedding the training pool).

Pools are held as padded matrices (one row per anchor, ``-1`` = no member) so
every step is vectorized over the anchors.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

PAD = -1
# Anchors whose gathered pool embeddings are held at once (memory bound).
_ANCHOR_BLOCK = 2048


@dataclass(frozen=True)
class Pools:
    anchors: np.ndarray           # (a,) int64 item ids
    positives: np.ndarray         # (a, Lp) int64, PAD-padded, in pool rank order
    positive_weights: np.ndarray  # (a, Lp) float32: s_m(anchor, positive)
    negatives: np.ndarray         # (a, Ln) int64, PAD-padded, in pool rank order
    dropped_anchors: np.ndarray   # anchors with an empty P+ or P- (no tuple possible)

    def items(self) -> np.ndarray:
        """Sorted ids of every item a tuple can use: the training pool to embed."""
        members = np.concatenate([self.anchors, self.positives.ravel(), self.negatives.ravel()])
        return np.unique(members[members != PAD])


@dataclass(frozen=True)
class Tuples:
    anchor: np.ndarray    # (t,) item ids
    positive: np.ndarray  # (t,)
    negative: np.ndarray  # (t,)
    weight: np.ndarray    # (t,) float32: the positive's manifold similarity

    def __len__(self) -> int:
        return len(self.anchor)

    def subset(self, index) -> "Tuples":
        return Tuples(self.anchor[index], self.positive[index], self.negative[index], self.weight[index])


def _padded_rows(anchor_rows: np.ndarray, n_anchors: int, *columns: np.ndarray) -> list[np.ndarray]:
    """Scatter member columns (already sorted by anchor row, then rank) into
    (n_anchors, longest pool) matrices."""
    counts = np.bincount(anchor_rows, minlength=n_anchors)
    width = max(int(counts.max(initial=0)), 1)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    slot = np.arange(len(anchor_rows)) - starts[anchor_rows]
    out = []
    for column, fill in columns:
        matrix = np.full((n_anchors, width), fill, dtype=column.dtype)
        matrix[anchor_rows, slot] = column
        out.append(matrix)
    return out


def build_pools(anchor, member, kind, rank, manifold_similarity) -> Pools:
    """Pools from the columns of ``pools.parquet`` (one row per pool member).

    Members are kept in ascending ``rank`` order; anchors whose ``P+`` or ``P-``
    is empty cannot form a tuple and are listed in ``dropped_anchors``.
    """
    anchor = np.asarray(anchor, dtype=np.int64)
    member = np.asarray(member, dtype=np.int64)
    kind = np.asarray(kind).astype(str)
    rank = np.asarray(rank, dtype=np.int64)
    weight = np.asarray(manifold_similarity, dtype=np.float32)
    unknown = set(np.unique(kind)) - {"positive", "negative"}
    if unknown:
        raise ValueError(f"pool kind must be 'positive' or 'negative', found {sorted(unknown)}")
    all_anchors = np.unique(anchor)
    is_positive = kind == "positive"
    usable = np.intersect1d(anchor[is_positive], anchor[~is_positive])
    dropped = np.setdiff1d(all_anchors, usable)

    def padded(selection, *columns):
        keep = selection & np.isin(anchor, usable)
        rows = np.searchsorted(usable, anchor[keep])
        order = np.lexsort((member[keep], rank[keep], rows))
        return _padded_rows(rows[order], len(usable), *[(c[keep][order], f) for c, f in columns])

    positives, positive_weights = padded(is_positive, (member, PAD), (weight, np.float32(0)))
    (negatives,) = padded(~is_positive, (member, PAD))
    return Pools(usable, positives, positive_weights, negatives, dropped)


def nearest_pool_members(pools: Pools, embeddings: np.ndarray, k: int) -> np.ndarray:
    """For each anchor, its ``k`` members of ``P-`` nearest in ``embeddings``
    (rows indexed by item id), nearest first; PAD where the pool is shorter.
    Ties are broken by pool rank (stable sort)."""
    valid = pools.negatives != PAD
    members = np.where(valid, pools.negatives, 0)
    distances = np.empty(members.shape, dtype=np.float32)
    for start in range(0, len(members), _ANCHOR_BLOCK):
        block = slice(start, start + _ANCHOR_BLOCK)
        differences = embeddings[members[block]] - embeddings[pools.anchors[block]][:, None, :]
        distances[block] = np.einsum("amd,amd->am", differences, differences)
    distances = np.where(valid, distances, np.inf)
    order = np.argsort(distances, axis=1, kind="stable")[:, :k]
    nearest = np.take_along_axis(pools.negatives, order, axis=1)
    return np.where(np.take_along_axis(valid, order, axis=1), nearest, PAD)


def _uniform_pick(rng: np.random.Generator, candidates: np.ndarray) -> np.ndarray:
    """One uniformly drawn non-PAD column index per row (candidates left-packed)."""
    counts = (candidates != PAD).sum(axis=1)
    return np.floor(rng.random(len(candidates)) * counts).astype(np.int64)


def select_tuples(pools: Pools, embeddings: np.ndarray, rng: np.random.Generator, negatives_nearest: int = 10) -> Tuples:
    """One tuple per anchor for this epoch (method.md section 6), in anchor order.

    ``embeddings``: the current network's embedding of the training pool, row i
    = item i (rows of items outside the pool are never read).
    """
    if negatives_nearest < 1:
        raise ValueError(f"negatives_nearest must be >= 1, got {negatives_nearest}")
    rows = np.arange(len(pools.anchors))
    positive_column = _uniform_pick(rng, pools.positives)
    nearest = nearest_pool_members(pools, np.asarray(embeddings, dtype=np.float32), negatives_nearest)
    negative_column = _uniform_pick(rng, nearest)
    return Tuples(
        anchor=pools.anchors.copy(),
        positive=pools.positives[rows, positive_column],
        negative=nearest[rows, negative_column],
        weight=pools.positive_weights[rows, positive_column],
    )


def unit_mean_weights(pools: Pools) -> tuple[Pools, float]:
    """Pools whose positive weights are divided by their mean over all (anchor,
    positive) pairs; returns ``(pools, mean)``.

    Manifold similarities ``s_m`` are tiny (the diffusion's right-hand side is
    ``(1 - alpha) e_i``: values around 1e-3), so the weighted loss would
    otherwise train at an effectively ~1000x smaller learning rate than the
    unweighted one. A single constant keeps the relative weights of eq. (8)'s
    weighted variant exactly and makes the learning rate comparable.
    """
    valid = pools.positives != PAD
    mean = float(pools.positive_weights[valid].mean()) if valid.any() else 1.0
    if not mean > 0:
        raise ValueError("positive weights (manifold similarities) must have a positive mean")
    scaled = np.where(valid, pools.positive_weights / mean, 0).astype(np.float32)
    return replace(pools, positive_weights=scaled), mean
