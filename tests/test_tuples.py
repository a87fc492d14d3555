import numpy as np
import pytest

from mom import tuples


def pool_columns(rows):
    """rows: (anchor, member, kind, rank, manifold_similarity)."""
    anchor, member, kind, rank, weight = zip(*rows)
    return dict(anchor=np.array(anchor), member=np.array(member), kind=np.array(kind),
                rank=np.array(rank), manifold_similarity=np.array(weight, np.float32))


def example_pools():
    rows = [
        (0, 5, "positive", 1, 0.9), (0, 6, "positive", 2, 0.4),
        # negatives of 0 listed out of rank order on purpose
        (0, 12, "negative", 3, 0.0), (0, 10, "negative", 1, 0.0), (0, 11, "negative", 2, 0.0),
        (0, 13, "negative", 4, 0.0),
        (1, 7, "positive", 1, 0.5), (1, 14, "negative", 1, 0.0),
        (2, 8, "positive", 1, 0.3),  # no negative: anchor 2 is dropped
    ]
    return tuples.build_pools(**pool_columns(rows))


def test_build_pools_orders_members_by_rank_and_drops_incomplete_anchors():
    pools = example_pools()
    assert pools.anchors.tolist() == [0, 1]
    assert pools.dropped_anchors.tolist() == [2]
    assert pools.positives.tolist() == [[5, 6], [7, -1]]
    assert np.allclose(pools.positive_weights, [[0.9, 0.4], [0.5, 0.0]])
    assert pools.negatives.tolist() == [[10, 11, 12, 13], [14, -1, -1, -1]]
    assert pools.items().tolist() == [0, 1, 5, 6, 7, 10, 11, 12, 13, 14]


def test_re_mining_picks_the_nearest_pool_members_in_the_current_embedding():
    pools = example_pools()
    embeddings = np.zeros((15, 2), np.float32)
    embeddings[0] = [1, 0]
    # current distances to anchor 0: 13 nearest, then 10, then 12, then 11 (pool
    # rank order is 10, 11, 12, 13 - the embedding, not the rank, decides).
    embeddings[13], embeddings[10], embeddings[12], embeddings[11] = [0.9, 0], [0.5, 0], [0, 0], [-1, 0]
    nearest = tuples.nearest_pool_members(pools, embeddings, k=2)
    assert nearest.tolist() == [[13, 10], [14, -1]]
    picked = set()
    for seed in range(200):
        chosen = tuples.select_tuples(pools, embeddings, np.random.default_rng(seed), negatives_nearest=2)
        assert chosen.negative[1] == 14
        picked.add(int(chosen.negative[0]))
    assert picked == {13, 10}
    # Moving the embedding changes the mined negatives.
    embeddings[11] = [1, 0.01]
    assert tuples.nearest_pool_members(pools, embeddings, k=2)[0].tolist() == [11, 13]


def test_positives_are_drawn_from_p_plus_with_their_weights():
    pools = example_pools()
    embeddings = np.random.default_rng(0).normal(size=(15, 3)).astype(np.float32)
    counts = {5: 0, 6: 0}
    for seed in range(400):
        chosen = tuples.select_tuples(pools, embeddings, np.random.default_rng(seed), negatives_nearest=10)
        counts[int(chosen.positive[0])] += 1
        expected_weight = {5: 0.9, 6: 0.4}[int(chosen.positive[0])]
        assert chosen.weight[0] == pytest.approx(expected_weight)
        assert chosen.positive[1] == 7 and chosen.weight[1] == pytest.approx(0.5)
        assert chosen.negative[0] in (10, 11, 12, 13)
    assert 150 < counts[5] < 250  # uniform over the two positives


def test_selection_is_deterministic_given_the_generator():
    pools = example_pools()
    embeddings = np.random.default_rng(1).normal(size=(15, 3)).astype(np.float32)
    first = tuples.select_tuples(pools, embeddings, np.random.default_rng(7))
    second = tuples.select_tuples(pools, embeddings, np.random.default_rng(7))
    for name in ("anchor", "positive", "negative", "weight"):
        assert np.array_equal(getattr(first, name), getattr(second, name))


def test_nearest_agrees_with_brute_force_on_random_pools(monkeypatch):
    rng = np.random.default_rng(3)
    n, rows = 200, []
    for anchor in range(60):
        members = rng.choice(np.delete(np.arange(n), anchor), size=rng.integers(1, 20), replace=False)
        rows += [(anchor, m, "negative", r + 1, 0.0) for r, m in enumerate(members)]
        rows.append((anchor, int(members[0] + 1) % n, "positive", 1, 0.5))
    pools = tuples.build_pools(**pool_columns(rows))
    embeddings = rng.normal(size=(n, 4)).astype(np.float32)
    monkeypatch.setattr(tuples, "_MEMBER_BLOCK", 7)
    nearest = tuples.nearest_pool_members(pools, embeddings, k=5)
    for row, anchor in enumerate(pools.anchors):
        members = [m for a, m, kind, _, _ in rows if a == anchor and kind == "negative"]
        distances = [np.sum((embeddings[m] - embeddings[anchor]) ** 2) for m in members]
        expected = [members[i] for i in np.argsort(distances, kind="stable")[:5]]
        assert [m for m in nearest[row] if m != -1] == expected


def test_bad_kind_is_rejected():
    with pytest.raises(ValueError, match="kind"):
        tuples.build_pools(**pool_columns([(0, 1, "maybe", 1, 0.0)]))


def test_unit_mean_weights_keep_relative_weights():
    pools = example_pools()
    scaled, mean = tuples.unit_mean_weights(pools)
    assert mean == pytest.approx((0.9 + 0.4 + 0.5) / 3)
    assert np.allclose(scaled.positive_weights, [[0.9 / mean, 0.4 / mean], [0.5 / mean, 0.0]])
    assert np.array_equal(scaled.positives, pools.positives)


# ------------------------------------------------------------ from class labels (HDML's supervised reference)

LABELS = np.array([2, 0, 2, 1, 0, 2, 1, 7, 0, 2])  # class 7 has one image: no anchor, still a negative


def test_labeled_anchors_skip_single_image_classes():
    assert tuples.labeled_anchors(LABELS).tolist() == [0, 1, 2, 3, 4, 5, 6, 8, 9]
    source = tuples.LabeledTriplets(LABELS)
    assert source.anchors.tolist() == [0, 1, 2, 3, 4, 5, 6, 8, 9] and source.dropped_anchors.tolist() == [7]
    assert source.items().tolist() == list(range(10))


def test_nearest_other_class_matches_brute_force():
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(10, 3)).astype(np.float32)
    anchors = np.array([0, 3, 7, 9])
    nearest = tuples.nearest_other_class(LABELS, embeddings, anchors, k=4)
    for row, anchor in enumerate(anchors):
        others = [j for j in range(10) if LABELS[j] != LABELS[anchor]]
        by_distance = sorted(others, key=lambda j: (float(((embeddings[j] - embeddings[anchor]) ** 2).sum()), j))
        assert nearest[row].tolist() == by_distance[:4]


def test_labeled_triplets_draw_positives_of_the_class_and_nearest_negatives_of_others():
    rng = np.random.default_rng(1)
    embeddings = rng.normal(size=(10, 3)).astype(np.float32)
    drawn_positives = {anchor: set() for anchor in tuples.labeled_anchors(LABELS)}
    for seed in range(60):
        chosen = tuples.select_labeled_triplets(LABELS, embeddings, np.random.default_rng(seed), negatives_nearest=2)
        assert chosen.anchor.tolist() == [0, 1, 2, 3, 4, 5, 6, 8, 9]
        assert (LABELS[chosen.positive] == LABELS[chosen.anchor]).all() and (chosen.positive != chosen.anchor).all()
        nearest = tuples.nearest_other_class(LABELS, embeddings, chosen.anchor, 2)
        assert all(n in row for n, row in zip(chosen.negative, nearest.tolist()))
        assert (chosen.weight == 1).all()
        for anchor, positive in zip(chosen.anchor, chosen.positive):
            drawn_positives[anchor].add(int(positive))
    # every other member of the class is drawn at some point (uniform draw)
    for anchor, drawn in drawn_positives.items():
        assert drawn == {j for j in range(10) if LABELS[j] == LABELS[anchor] and j != anchor}
    first = tuples.select_labeled_triplets(LABELS, embeddings, np.random.default_rng(5))
    second = tuples.select_labeled_triplets(LABELS, embeddings, np.random.default_rng(5))
    assert all(np.array_equal(getattr(first, f), getattr(second, f)) for f in ("anchor", "positive", "negative"))


def test_labeled_pairs_form_groups_of_distinct_classes():
    labels = np.repeat([0, 1, 2], 4)  # balanced: every anchor is used once
    groups = tuples.select_labeled_pairs(labels, np.random.default_rng(0), group_size=3)
    assert groups.anchor.shape == (4, 3) and groups.group_size == 3
    assert sorted(groups.anchor.ravel().tolist()) == list(range(12))
    for anchors, positives in zip(groups.anchor, groups.positive):
        assert sorted(labels[anchors].tolist()) == [0, 1, 2]
        assert (labels[positives] == labels[anchors]).all() and (positives != anchors).all()
    assert groups.item_rows().tolist()[:6] == [*groups.anchor[0], *groups.positive[0]]
    assert groups.subset([1]).anchor.tolist() == [groups.anchor[1].tolist()]


def test_labeled_pairs_leave_out_incomplete_groups():
    # class sizes 3, 2, 4, 1 (class 7: no pair): rounds hold classes {0,1,2}, {0,1,2}, {0,2}, {2};
    # groups of 2 keep 2 + 2 + 2 + 0 pairs
    groups = tuples.select_labeled_pairs(LABELS, np.random.default_rng(3), group_size=2)
    assert groups.anchor.shape == (3, 2)
    for anchors in groups.anchor:
        assert len(set(LABELS[anchors].tolist())) == 2
    assert len(set(groups.anchor.ravel().tolist())) == 6
    assert tuples.npair_group_size(LABELS, batch_size=42) == 3 and tuples.npair_group_size(LABELS, 2) == 2
    with pytest.raises(ValueError, match="at least 2 classes"):
        tuples.select_labeled_pairs(LABELS, np.random.default_rng(0), group_size=1)
    source = tuples.LabeledPairs(LABELS, 3)
    assert not source.needs_embeddings and source.items().tolist() == [0, 1, 2, 3, 4, 5, 6, 8, 9]


def test_nearest_does_not_depend_on_the_block_size(monkeypatch):
    """The block only bounds memory: every block size gives the same members in the same order."""
    rng = np.random.default_rng(5)
    n = 300
    rows = [(anchor, int(m), "negative", r + 1, 0.0)
            for anchor in range(100) for r, m in enumerate(rng.choice(np.delete(np.arange(n), anchor), 30, replace=False))]
    rows += [(anchor, (anchor + 1) % n, "positive", 1, 0.5) for anchor in range(100)]
    pools = tuples.build_pools(**pool_columns(rows))
    embeddings = rng.normal(size=(n, 96)).astype(np.float32)
    results = []
    for block in (1, 13, 64, 1000):
        monkeypatch.setattr(tuples, "_MEMBER_BLOCK", block)
        results.append(tuples.nearest_pool_members(pools, embeddings, k=10))
    assert all(np.array_equal(results[0], other) for other in results[1:])
