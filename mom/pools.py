"""Positive and negative pools of every anchor (docs/method.md section 5, eqs. (5)-(6)).

Neighbour lists come in as (anchors, m) id arrays, self excluded, sorted by
descending similarity (ties: smaller id first), padded with -1 where fewer
neighbours exist: the Euclidean lists from :func:`mom.graph.neighbours_of`,
the manifold lists from :func:`mom.diffusion.manifold_neighbours`. So
``NN_k^e`` / ``NN_k^m`` are the first k valid entries of a list, the anchor
itself never included (on both sides, so the set differences are unaffected).
Pools are returned flat: ``(anchor_row, member, rank)`` with rank starting at 1.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mom.errors import InputError

POSITIVE_VARIANTS = ("manifold", "euclidean")
NEGATIVE_VARIANTS = ("manifold", "random")


@dataclass
class Pool:
    """Members of one kind for many anchors.

    Anchor ``anchor_row[i]`` (a row of the anchor list) has ``member[i]`` at ``rank[i]``.
    """

    anchor_row: np.ndarray
    member: np.ndarray
    rank: np.ndarray

    @classmethod
    def from_lists(cls, lists: list[np.ndarray]) -> "Pool":
        sizes = np.array([len(members) for members in lists], dtype=np.int64)
        rows = np.repeat(np.arange(len(lists), dtype=np.int64), sizes)
        members = np.concatenate(lists).astype(np.int64) if lists else np.zeros(0, np.int64)
        ranks = np.concatenate([np.arange(1, size + 1, dtype=np.int32) for size in sizes]) if lists else \
            np.zeros(0, np.int32)
        return cls(rows, members, ranks)

    def sizes(self, n_anchors: int) -> np.ndarray:
        return np.bincount(self.anchor_row, minlength=n_anchors)


def first_k(neighbours: np.ndarray, k: int) -> np.ndarray:
    """``NN_k``: the first k valid ids of one sorted, -1-padded neighbour list."""
    valid = neighbours[neighbours >= 0]
    return valid[:k]


def check_depth(neighbours: np.ndarray, k: int, what: str, option: str) -> None:
    if neighbours.shape[1] < k:
        raise InputError(f"{option}={k}: the {what} neighbour lists hold only {neighbours.shape[1]} "
                         f"neighbours per anchor; lower {option} or keep more neighbours upstream")


def manifold_positives(manifold_ids: np.ndarray, euclidean_ids: np.ndarray, k: int, cap: int) -> Pool:
    """Eq. (5): ``P+ = NN_k^m \\ NN_k^e``, in descending manifold similarity, at most ``cap``."""
    check_depth(manifold_ids, k, "manifold", "k_pos")
    check_depth(euclidean_ids, k, "Euclidean", "k_pos")
    return ordered_difference(manifold_ids, euclidean_ids, k, cap)


def manifold_negatives(manifold_ids: np.ndarray, euclidean_ids: np.ndarray, k: int, cap: int) -> Pool:
    """Eq. (6): ``P- = NN_k^e \\ NN_k^m``, in descending Euclidean similarity, at most ``cap``."""
    check_depth(manifold_ids, k, "manifold", "k_neg")
    check_depth(euclidean_ids, k, "Euclidean", "k_neg")
    return ordered_difference(euclidean_ids, manifold_ids, k, cap)


def ordered_difference(kept_ids: np.ndarray, removed_ids: np.ndarray, k: int, cap: int) -> Pool:
    """Per anchor, the first ``k`` of ``kept_ids`` that are not among the first ``k``
    of ``removed_ids``, in ``kept_ids`` order, at most ``cap``."""
    lists = []
    for kept, removed in zip(kept_ids, removed_ids):
        candidates = first_k(kept, k)
        lists.append(candidates[~np.isin(candidates, first_k(removed, k))][:cap])
    return Pool.from_lists(lists)


def euclidean_positives(euclidean_ids: np.ndarray, k: int) -> Pool:
    """Baseline positives (paper Table 1): ``NN_k^e`` (k = 5), in descending Euclidean similarity."""
    check_depth(euclidean_ids, k, "Euclidean", "baseline_k")
    return Pool.from_lists([first_k(euclidean, k) for euclidean in euclidean_ids])


def random_negatives(anchors: np.ndarray, euclidean_ids: np.ndarray, n_items: int, k: int, count: int,
                     seed: int) -> Pool:
    """Baseline negatives: ``count`` items drawn uniformly without replacement from the items
    outside ``{anchor} + NN_k^e(anchor)``, with ``numpy.random.default_rng(seed)``, anchor by
    anchor in anchor order, members in draw order (fewer when fewer items are eligible)."""
    check_depth(euclidean_ids, k, "Euclidean", "baseline_k")
    rng = np.random.default_rng(seed)
    lists = []
    for anchor, euclidean in zip(anchors, euclidean_ids):
        excluded = np.append(first_k(euclidean, k), anchor)
        draw = rng.choice(n_items, size=min(n_items, count + len(excluded)), replace=False)
        lists.append(draw[~np.isin(draw, excluded)][:count])
    return Pool.from_lists(lists)


def pool_variants(anchors: np.ndarray, manifold_ids: np.ndarray, euclidean_ids: np.ndarray, n_items: int,
                  k_pos: int, k_neg: int, positive_cap: int, negative_cap: int, baseline_k: int,
                  seed: int) -> dict[str, Pool]:
    """Every pool variant of the paper's Table 1, by name: ``manifold_positives``
    (P+), ``euclidean_positives`` (baseline NN), ``manifold_negatives`` (P-),
    ``random_negatives`` (baseline)."""
    return {
        "manifold_positives": manifold_positives(manifold_ids, euclidean_ids, k_pos, positive_cap),
        "euclidean_positives": euclidean_positives(euclidean_ids, baseline_k),
        "manifold_negatives": manifold_negatives(manifold_ids, euclidean_ids, k_neg, negative_cap),
        "random_negatives": random_negatives(anchors, euclidean_ids, n_items, baseline_k, negative_cap, seed),
    }


def select_pools(positives: str, negatives: str, variants: dict[str, Pool]) -> tuple[Pool, Pool]:
    """The (positive, negative) pools of the chosen variants among :func:`pool_variants`'s."""
    if positives not in POSITIVE_VARIANTS:
        raise InputError(f"positives={positives!r}: allowed values are {', '.join(POSITIVE_VARIANTS)}")
    if negatives not in NEGATIVE_VARIANTS:
        raise InputError(f"negatives={negatives!r}: allowed values are {', '.join(NEGATIVE_VARIANTS)}")
    return variants[f"{positives}_positives"], variants[f"{negatives}_negatives"]


def pool_purity(anchors: np.ndarray, pool: Pool, labels: np.ndarray, same_label: bool) -> dict:
    """Fraction of (anchor, member) pairs whose labels agree (``same_label``) or differ.

    Evaluation only. Pairs where either label is unknown (-1) are left out and
    counted separately. ``purity`` is None when no pair has both labels.
    """
    anchor_labels = labels[anchors[pool.anchor_row]]
    member_labels = labels[pool.member]
    known = (anchor_labels >= 0) & (member_labels >= 0)
    agree = anchor_labels[known] == member_labels[known]
    hits = int(agree.sum() if same_label else (~agree).sum())
    return {
        "pairs": int(len(pool.member)),
        "labelled_pairs": int(known.sum()),
        "purity": hits / int(known.sum()) if known.any() else None,
    }


def pool_stats(pool: Pool, n_anchors: int) -> dict:
    sizes = pool.sizes(n_anchors)
    return {
        "members": int(sizes.sum()),
        "mean_per_anchor": float(sizes.mean()) if n_anchors else 0.0,
        "anchors_without_members": int((sizes == 0).sum()),
    }


def stored_similarities(anchor_rows: np.ndarray, members: np.ndarray, neighbour_ids: np.ndarray,
                        neighbour_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The stored similarity of each (anchor row, member) pair and whether it was stored.

    ``neighbour_ids``/``neighbour_values`` are (anchors, depth) lists padded with -1;
    pairs not in them get 0 and ``found`` False (e.g. baseline positives beyond the
    kept manifold neighbours).
    """
    n_keys = int(max(neighbour_ids.max(initial=0), members.max(initial=0))) + 1
    stored = neighbour_ids >= 0
    keys = (np.nonzero(stored)[0] * n_keys + neighbour_ids[stored]).astype(np.int64)
    order = np.argsort(keys)
    keys, values = keys[order], neighbour_values[stored][order]
    wanted = anchor_rows.astype(np.int64) * n_keys + members
    if len(keys) == 0:
        return np.zeros(len(wanted), np.float32), np.zeros(len(wanted), bool)
    at = np.minimum(np.searchsorted(keys, wanted), len(keys) - 1)
    found = keys[at] == wanted
    return np.where(found, values[at], 0).astype(np.float32), found


def pair_inner_products(features, left: np.ndarray, right: np.ndarray, chunk: int = 16384) -> np.ndarray:
    """``y_left[i] . y_right[i]`` for every pair, a chunk of rows at a time (bounded memory
    when ``features`` is a memory map of a large collection)."""
    out = np.empty(len(left), dtype=np.float32)
    for start in range(0, len(left), chunk):
        a = np.asarray(features[left[start:start + chunk]], dtype=np.float32)
        b = np.asarray(features[right[start:start + chunk]], dtype=np.float32)
        out[start:start + chunk] = np.einsum("ij,ij->i", a, b)
    return out
