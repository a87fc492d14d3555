"""Per-epoch training tuples (docs/method.md section 6; from labels: section 10).

One tuple per anchor and epoch: the anchor, one positive drawn uniformly from
``P+``, one negative drawn uniformly from the ``negatives_nearest`` members of
``P-`` that are nearest to the anchor in the *current* embedding (re-mined every
epoch after re-embedding the training pool).

The supervised reference builds them from class labels instead of mined pools
(:func:`select_labeled_triplets`, :func:`select_labeled_pairs`); only a run
that asks for labels calls these.

Pools are held as padded matrices (one row per anchor, ``-1`` = no member) so
every step is vectorized over the anchors.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

PAD = -1
# Anchors whose distances to every training item are held at once (nearest_other_class).
_ANCHOR_BLOCK = 2048
# Anchors whose gathered pool-member embeddings are held at once (nearest_pool_members):
# anchors x members x d floats, kept cache-sized. 2048 anchors x 50 members x 1280-d was
# 0.5 GB per block and took 14 s an epoch on 6,000 anchors; 64 takes 0.55 s, same distances.
_MEMBER_BLOCK = 64


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

    def item_rows(self) -> np.ndarray:
        """Item ids in the network's row layout: ``[anchors; positives; negatives]``."""
        return np.concatenate([self.anchor, self.positive, self.negative])


@dataclass(frozen=True)
class PairGroups:
    """N-pair batches: group ``g`` holds ``n`` pairs ``(anchor[g, i], positive[g, i])``
    of ``n`` distinct classes (the negatives of anchor ``i`` are the other positives)."""

    anchor: np.ndarray    # (groups, n) item ids
    positive: np.ndarray  # (groups, n)

    def __len__(self) -> int:
        return len(self.anchor)

    @property
    def group_size(self) -> int:
        return self.anchor.shape[1]

    def subset(self, index) -> "PairGroups":
        return PairGroups(self.anchor[index], self.positive[index])

    def item_rows(self) -> np.ndarray:
        """Item ids in the network's row layout: group after group, each ``[anchors; positives]``."""
        return np.hstack([self.anchor, self.positive]).ravel()


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
    for start in range(0, len(members), _MEMBER_BLOCK):
        block = slice(start, start + _MEMBER_BLOCK)
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
    """One tuple per anchor for this epoch (docs/method.md section 6), in anchor order.

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


# ------------------------------------------------------------ from class labels (supervised reference)


def _classes(labels: np.ndarray):
    """``(order, starts, counts, class_of, position)``: items sorted by class
    (ascending id within a class), where each class starts and its size, every
    item's class index and its position within its class."""
    labels = np.asarray(labels)
    order = np.argsort(labels, kind="stable")
    _, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
    class_of = np.empty(len(labels), dtype=np.int64)
    class_of[order] = np.repeat(np.arange(len(starts)), counts)
    position = np.empty(len(labels), dtype=np.int64)
    position[order] = np.arange(len(labels)) - starts[class_of[order]]
    return order, starts, counts, class_of, position


def labeled_anchors(labels: np.ndarray) -> np.ndarray:
    """Items that can anchor a labelled tuple: their class has another member."""
    _, _, counts, class_of, _ = _classes(labels)
    return np.flatnonzero(counts[class_of] >= 2)


def _same_class_positives(labels: np.ndarray, anchors: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For each anchor, one other member of its class, drawn uniformly."""
    order, starts, counts, class_of, position = _classes(labels)
    classes = class_of[anchors]
    draw = np.floor(rng.random(len(anchors)) * (counts[classes] - 1)).astype(np.int64)
    draw += draw >= position[anchors]  # skip the anchor itself
    return order[starts[classes] + draw]


def nearest_other_class(labels: np.ndarray, embeddings: np.ndarray, anchors: np.ndarray, k: int) -> np.ndarray:
    """For each anchor, its ``k`` nearest items of another class in
    ``embeddings`` (squared Euclidean distance, ties by id), nearest first."""
    labels = np.asarray(labels)
    embeddings = np.asarray(embeddings, dtype=np.float32)
    k = min(int(k), len(labels) - 1)
    squared_norms = np.einsum("ij,ij->i", embeddings, embeddings)
    ids = np.arange(len(labels))
    nearest = np.empty((len(anchors), k), dtype=np.int64)
    for start in range(0, len(anchors), _ANCHOR_BLOCK):
        block = anchors[start:start + _ANCHOR_BLOCK]
        # ||a - x||^2 up to the anchor's own ||a||^2, constant along a row
        distances = squared_norms[None, :] - 2.0 * embeddings[block] @ embeddings.T
        distances[labels[None, :] == labels[block][:, None]] = np.inf
        candidates = np.argpartition(distances, k - 1, axis=1)[:, :k]
        order = np.lexsort((candidates, np.take_along_axis(distances, candidates, axis=1)), axis=1)
        nearest[start:start + len(block)] = np.take_along_axis(candidates, order, axis=1)
    return nearest


def select_labeled_triplets(labels: np.ndarray, embeddings: np.ndarray, rng: np.random.Generator,
                            negatives_nearest: int = 10) -> Tuples:
    """One triplet per labelled anchor (every item whose class has another
    member), in id order: a positive drawn uniformly from the anchor's class,
    a negative drawn uniformly among the ``negatives_nearest`` items of other
    classes nearest to it in the current ``embeddings`` (MoM's tuple rule with
    the class as ``P+`` and the other classes as ``P-``). Weights are 1."""
    if negatives_nearest < 1:
        raise ValueError(f"negatives_nearest must be >= 1, got {negatives_nearest}")
    labels = np.asarray(labels)
    if len(np.unique(labels)) < 2:
        raise ValueError("labelled triplets need at least two classes")
    anchors = labeled_anchors(labels)
    positives = _same_class_positives(labels, anchors, rng)
    nearest = nearest_other_class(labels, embeddings, anchors, negatives_nearest)
    negatives = nearest[np.arange(len(anchors)), _uniform_pick(rng, nearest)]
    return Tuples(anchors, positives, negatives, np.ones(len(anchors), dtype=np.float32))


def npair_group_size(labels: np.ndarray, batch_size: int) -> int:
    """Pairs per N-pair group: one per class, at most ``batch_size``."""
    return min(len(np.unique(np.asarray(labels)[labeled_anchors(labels)])), int(batch_size))


def select_labeled_pairs(labels: np.ndarray, rng: np.random.Generator, group_size: int) -> PairGroups:
    """N-pair groups for one epoch: every labelled anchor once, with a positive
    drawn uniformly from its class; groups of ``group_size`` pairs of distinct
    classes.

    Each class's anchors are shuffled; the ``r``-th anchors of all classes form
    round ``r``, whose classes are put in a random order and cut into groups of
    ``group_size``; a round's last, incomplete group is left out (with balanced
    classes and ``group_size`` = the number of classes, nothing is)."""
    labels = np.asarray(labels)
    if group_size < 2:
        raise ValueError(f"an N-pair group needs at least 2 classes, got {group_size}")
    anchors = labeled_anchors(labels)
    positives = _same_class_positives(labels, anchors, rng)
    _, _, _, class_of, _ = _classes(labels)
    classes = class_of[anchors]
    shuffled = np.lexsort((rng.random(len(anchors)), classes))  # by class, random within
    round_of = np.empty(len(anchors), dtype=np.int64)
    round_of[shuffled] = np.arange(len(anchors)) - np.searchsorted(classes[shuffled], classes[shuffled])
    class_rank = rng.random((int(round_of.max(initial=-1)) + 1, int(classes.max(initial=-1)) + 1))
    sequence = np.lexsort((class_rank[round_of, classes], round_of))
    rounds = round_of[sequence]
    in_round = np.arange(len(sequence)) - np.searchsorted(rounds, rounds)
    round_sizes = np.bincount(rounds)
    kept = sequence[in_round < round_sizes[rounds] // group_size * group_size]
    return PairGroups(anchors[kept].reshape(-1, group_size), positives[kept].reshape(-1, group_size))


# ------------------------------------------------------------ where an epoch's tuples come from
# A source has ``items()`` (the training pool), ``select(embeddings, rng)``,
# ``needs_embeddings`` (False: ``select`` ignores them) and ``layout``
# (``triplet``: :class:`Tuples`, ``npair``: :class:`PairGroups`).


@dataclass(frozen=True)
class PoolTuples:
    """MoM: tuples from the mined pools (:func:`select_tuples`)."""

    pools: Pools
    negatives_nearest: int = 10
    needs_embeddings = True
    layout = "triplet"

    def items(self) -> np.ndarray:
        return self.pools.items()

    def select(self, embeddings: np.ndarray, rng: np.random.Generator) -> Tuples:
        return select_tuples(self.pools, embeddings, rng, self.negatives_nearest)


class _Labeled:
    """Anchors of a labelled source: every item whose class has another member."""

    labels: np.ndarray

    @property
    def anchors(self) -> np.ndarray:
        return labeled_anchors(self.labels)

    @property
    def dropped_anchors(self) -> np.ndarray:
        return np.setdiff1d(np.arange(len(self.labels)), self.anchors)


@dataclass(frozen=True)
class LabeledTriplets(_Labeled):
    """Supervised triplets from the class of every item id (:func:`select_labeled_triplets`)."""

    labels: np.ndarray
    negatives_nearest: int = 10
    needs_embeddings = True
    layout = "triplet"

    def items(self) -> np.ndarray:
        return np.arange(len(self.labels))

    def select(self, embeddings: np.ndarray, rng: np.random.Generator) -> Tuples:
        return select_labeled_triplets(self.labels, embeddings, rng, self.negatives_nearest)


@dataclass(frozen=True)
class LabeledPairs(_Labeled):
    """Supervised N-pair groups from the class of every item id (:func:`select_labeled_pairs`);
    drawn without the current embedding."""

    labels: np.ndarray
    group_size: int
    needs_embeddings = False
    layout = "npair"

    def items(self) -> np.ndarray:
        return labeled_anchors(self.labels)

    def select(self, embeddings, rng: np.random.Generator) -> PairGroups:
        return select_labeled_pairs(self.labels, rng, self.group_size)
