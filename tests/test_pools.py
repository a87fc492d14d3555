import numpy as np
import pytest

from banana import banana_features
from mom.anchors import select_anchors
from mom.diffusion import manifold_neighbours
from mom.errors import InputError
from mom.graph import knn_search, neighbours_of, reciprocal_graph
from mom.pools import (Pool, euclidean_positives, manifold_negatives, manifold_positives, pool_purity,
                       random_negatives, pool_variants, select_pools)


def random_lists(n_anchors=30, n_items=200, depth=60, seed=0):
    rng = np.random.default_rng(seed)
    euclidean = np.stack([rng.permutation(n_items)[:depth] for _ in range(n_anchors)])
    manifold = np.stack([rng.permutation(n_items)[:depth] for _ in range(n_anchors)])
    manifold[:, -5:] = -1  # padding: fewer manifold neighbours than the depth
    return euclidean, manifold


def as_lists(pool, n_anchors):
    return [pool.member[pool.anchor_row == row].tolist() for row in range(n_anchors)]


def test_pools_equal_brute_force_set_differences():
    euclidean, manifold = random_lists()
    k, cap = 40, 7
    positives = as_lists(manifold_positives(manifold, euclidean, k, cap), 30)
    negatives = as_lists(manifold_negatives(manifold, euclidean, k, cap), 30)
    for row in range(30):
        nn_e = [j for j in euclidean[row] if j >= 0][:k]
        nn_m = [j for j in manifold[row] if j >= 0][:k]
        assert positives[row] == [j for j in nn_m if j not in nn_e][:cap]  # manifold order
        assert negatives[row] == [j for j in nn_e if j not in nn_m][:cap]  # Euclidean order


def test_ranks_start_at_one_per_anchor():
    euclidean, manifold = random_lists()
    pool = manifold_positives(manifold, euclidean, 40, 50)
    for row in range(30):
        ranks = pool.rank[pool.anchor_row == row]
        assert ranks.tolist() == list(range(1, len(ranks) + 1))


def test_baselines():
    euclidean, _ = random_lists()
    anchors = np.arange(100, 130)
    positives = as_lists(euclidean_positives(euclidean, 5), 30)
    assert positives == euclidean[:, :5].tolist()
    negatives = random_negatives(anchors, euclidean, 200, 5, 50, seed=1)
    again = random_negatives(anchors, euclidean, 200, 5, 50, seed=1)
    np.testing.assert_array_equal(negatives.member, again.member)
    for row, members in enumerate(as_lists(negatives, 30)):
        assert len(members) == 50 == len(set(members))
        assert not set(members) & (set(euclidean[row, :5]) | {anchors[row]})


def test_too_shallow_lists_are_errors():
    euclidean, manifold = random_lists(depth=20)
    with pytest.raises(InputError, match="k_neg=100"):
        manifold_negatives(manifold, euclidean, 100, 50)
    with pytest.raises(InputError, match="positives="):
        select_pools("labels", "random", pool_variants(np.arange(30), manifold, euclidean, 200, 10, 10, 5, 5, 5, 0))


def test_purity_counts_only_labelled_pairs():
    pool = Pool(np.array([0, 0, 1, 1]), np.array([1, 2, 3, 0]), np.array([1, 2, 1, 2], dtype=np.int32))
    labels = np.array([7, 7, 8, -1])
    anchors = np.array([0, 2])
    assert pool_purity(anchors, pool, labels, same_label=True) == {"pairs": 4, "labelled_pairs": 3, "purity": 1 / 3}
    assert pool_purity(anchors, pool, labels, same_label=False)["purity"] == 2 / 3
    assert pool_purity(anchors, pool, np.full(4, -1), same_label=True)["purity"] is None


def test_banana_positives_follow_the_curve_and_negatives_come_from_other_curves():
    features, curve, points = banana_features(n_per_curve=300, n_curves=3)
    ids, sims, _ = knn_search(features, 10)
    graph = reciprocal_graph(ids, sims, gamma=3)
    assert (curve[np.repeat(np.arange(900), np.diff(graph.indptr))] == curve[graph.indices]).all()
    anchors, _ = select_anchors(graph, "all", None)
    diffusion = manifold_neighbours(graph, anchors, k=100)
    euclidean, _ = neighbours_of(features, anchors, 100)
    variants = pool_variants(anchors, diffusion.ids, euclidean, len(features), k_pos=50, k_neg=100,
                             positive_cap=50, negative_cap=100, baseline_k=5, seed=0)
    positives, negatives = select_pools("manifold", "manifold", variants)
    # positives: along the anchor's own curve, beyond its Euclidean neighbours
    assert (curve[anchors[positives.anchor_row]] == curve[positives.member]).all()
    row = int(np.bincount(positives.anchor_row).argmax())
    anchor = anchors[row]
    reach = np.linalg.norm(points[euclidean[row, :50]] - points[anchor], axis=1).max()
    members = positives.member[positives.anchor_row == row]
    distance = np.linalg.norm(points[members] - points[anchor], axis=1)  # in the 2-D plane (features add jitter)
    assert len(members) > 0 and distance.min() >= 0.9 * reach and np.median(distance) >= reach
    # negatives: every other-curve item among the 100 Euclidean neighbours, and
    # far more concentrated on other curves than the Euclidean neighbourhood itself
    other_curve = curve[euclidean] != curve[anchors][:, None]
    for row in np.flatnonzero(other_curve.any(axis=1)):
        assert set(euclidean[row][other_curve[row]]) <= set(negatives.member[negatives.anchor_row == row])
    negative_other = curve[anchors[negatives.anchor_row]] != curve[negatives.member]
    assert other_curve.sum() > 0
    assert negative_other.mean() > 5 * other_curve.mean()


def test_stored_similarities_against_a_dictionary():
    from mom.pools import stored_similarities

    rng = np.random.default_rng(0)
    ids = np.array([[3, 7, -1], [7, 1, 4]])
    values = rng.random(ids.shape).astype(np.float32)
    rows, members = np.array([0, 0, 1, 1, 1, 0]), np.array([7, 4, 4, 3, 7, 3])
    table = {(r, m): values[r, c] for r in range(2) for c, m in enumerate(ids[r]) if m >= 0}
    got, found = stored_similarities(rows, members, ids, values)
    for (r, m), g, f in zip(zip(rows, members), got, found):
        assert f == ((r, m) in table) and g == table.get((r, m), 0)


def test_pair_inner_products_in_chunks():
    from mom.pools import pair_inner_products

    rng = np.random.default_rng(1)
    features = rng.standard_normal((20, 5)).astype(np.float32)
    left, right = rng.integers(0, 20, 33), rng.integers(0, 20, 33)
    expected = (features[left] * features[right]).sum(axis=1)
    assert np.allclose(pair_inner_products(features, left, right, chunk=7), expected, atol=1e-5)
