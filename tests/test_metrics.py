import numpy as np
import pytest
from sklearn.cluster import KMeans

from mom import metrics


def brute_force_recall(embeddings, labels, k):
    distances = ((embeddings[:, None, :] - embeddings[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(distances, np.inf)
    hits = 0
    for query in range(len(embeddings)):
        nearest = np.argsort(distances[query], kind="stable")[:k]
        hits += any(labels[j] == labels[query] for j in nearest)
    return hits / len(embeddings)


def brute_force_nmi(labels, clusters):
    """NMI = I(L; C) / mean(H(L), H(C)) from the contingency table."""
    n = len(labels)
    joint = np.array([[np.sum((labels == a) & (clusters == b)) for b in np.unique(clusters)]
                      for a in np.unique(labels)], dtype=float) / n
    p_label, p_cluster = joint.sum(1), joint.sum(0)
    nonzero = joint > 0
    mutual = np.sum(joint[nonzero] * np.log(joint[nonzero] / np.outer(p_label, p_cluster)[nonzero]))
    entropy = lambda p: -np.sum(p * np.log(p))
    return mutual / ((entropy(p_label) + entropy(p_cluster)) / 2)


def test_recall_at_k_matches_brute_force():
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(150, 8)).astype(np.float32)
    labels = rng.integers(0, 6, size=150)
    recalls = metrics.recall_at_k(embeddings, labels, ks=(1, 2, 4, 8))
    for k in (1, 2, 4, 8):
        assert recalls[k] == pytest.approx(brute_force_recall(embeddings, labels, k))
    assert recalls[1] <= recalls[2] <= recalls[4] <= recalls[8]


def test_recall_excludes_the_query_itself():
    # Two far-apart pairs of distinct classes: each item's nearest other item has
    # another label, so Recall@1 is 0 (it would be 1 if the item found itself).
    embeddings = np.array([[0.0, 0.0], [0.1, 0.0], [10.0, 0.0], [10.1, 0.0]], np.float32)
    labels = np.array([0, 1, 2, 3])
    assert metrics.recall_at_k(embeddings, labels, ks=(1,))[1] == 0.0
    assert metrics.recall_at_k(embeddings, np.array([0, 0, 1, 1]), ks=(1,))[1] == 1.0


def test_nearest_neighbours_in_blocks_equal_one_block(monkeypatch):
    rng = np.random.default_rng(1)
    embeddings = rng.normal(size=(97, 5)).astype(np.float32)
    whole = metrics.nearest_neighbours(embeddings, 6)
    monkeypatch.setattr(metrics, "_BLOCK_ELEMENTS", 97 * 7)  # 7 queries per block
    assert np.array_equal(metrics.nearest_neighbours(embeddings, 6), whole)
    distances = ((embeddings[:, None] - embeddings[None]) ** 2).sum(-1)
    np.fill_diagonal(distances, np.inf)
    assert np.array_equal(whole, np.argsort(distances, axis=1, kind="stable")[:, :6])


def test_nmi_matches_contingency_definition_and_sklearn_kmeans():
    rng = np.random.default_rng(2)
    centres = rng.normal(scale=3, size=(4, 6))
    labels = rng.integers(0, 4, size=200)
    embeddings = centres[labels] + rng.normal(size=(200, 6))
    value = metrics.nmi_kmeans(embeddings, labels, n_clusters=4, seed=3, n_init=5)
    clusters = KMeans(n_clusters=4, random_state=3, n_init=5).fit_predict(embeddings)
    assert value == pytest.approx(brute_force_nmi(labels, clusters))
    assert 0.0 < value <= 1.0


def test_nmi_is_one_for_separated_clusters_and_low_for_noise():
    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(3), 30)
    separated = np.eye(3)[labels] * 100 + rng.normal(size=(90, 3))
    assert metrics.nmi_kmeans(separated, labels, 3, seed=0, n_init=3) == pytest.approx(1.0)
    noise = rng.normal(size=(90, 3))
    assert metrics.nmi_kmeans(noise, labels, 3, seed=0, n_init=3) < 0.2


def brute_force_f1(labels, clusters):
    """Pairwise precision / recall by visiting every unordered pair (O(n^2))."""
    same_both = same_cluster = same_class = 0
    for i in range(len(labels)):
        for j in range(i + 1, len(labels)):
            in_cluster, in_class = clusters[i] == clusters[j], labels[i] == labels[j]
            same_cluster += in_cluster
            same_class += in_class
            same_both += in_cluster and in_class
    precision, recall = same_both / same_cluster, same_both / same_class
    return 0.0 if same_both == 0 else 2 * precision * recall / (precision + recall)


def test_f1_hand_computed():
    # classes {0,1,2} {3,4}; clusters {0,1} {2,3,4}: pairs in one cluster 1 + 3 = 4,
    # of one class 3 + 1 = 4, in both: (0,1) and (3,4) = 2 -> P = R = F1 = 1/2
    labels = np.array([7, 7, 7, 9, 9])
    clusters = np.array([1, 1, 0, 0, 0])
    assert metrics.clustering_f1(labels, clusters) == pytest.approx(0.5)
    assert metrics.clustering_f1(labels, np.array([5, 5, 5, 2, 2])) == 1.0  # cluster ids are names only
    assert metrics.clustering_f1(labels, np.arange(5)) == 0.0  # singletons: no pair in a cluster


def test_f1_matches_brute_force_pair_count():
    rng = np.random.default_rng(4)
    for n, n_labels, n_clusters in [(60, 4, 5), (37, 7, 3), (25, 2, 9)]:
        labels = rng.integers(0, n_labels, size=n)
        clusters = rng.integers(0, n_clusters, size=n) * 10 - 3  # arbitrary cluster names
        assert metrics.clustering_f1(labels, clusters) == pytest.approx(brute_force_f1(labels, clusters), rel=1e-12)


def test_f1_is_symmetric_and_refuses_undefined_input():
    rng = np.random.default_rng(5)
    labels, clusters = rng.integers(0, 3, 40), rng.integers(0, 4, 40)
    assert metrics.clustering_f1(labels, clusters) == pytest.approx(metrics.clustering_f1(clusters, labels))
    with pytest.raises(ValueError, match="undefined"):
        metrics.clustering_f1(np.arange(4), np.arange(4))
    with pytest.raises(ValueError, match="one entry per item"):
        metrics.clustering_f1(np.zeros(3), np.zeros(4))


def test_f1_kmeans_scores_the_clustering_nmi_kmeans_scores():
    rng = np.random.default_rng(6)
    centres = rng.normal(scale=2, size=(4, 5))
    labels = rng.integers(0, 4, size=120)
    embeddings = centres[labels] + rng.normal(size=(120, 5))
    clusters = KMeans(n_clusters=4, random_state=1, n_init=3).fit_predict(embeddings)
    assert metrics.f1_kmeans(embeddings, labels, 4, seed=1, n_init=3) == pytest.approx(brute_force_f1(labels, clusters))
    assert metrics.nmi_kmeans(embeddings, labels, 4, seed=1, n_init=3) == pytest.approx(
        metrics.clustering_nmi(labels, clusters))
    separated = np.eye(4)[labels] * 100 + rng.normal(size=(120, 4))
    assert metrics.f1_kmeans(separated, labels, 4, seed=0, n_init=3) == pytest.approx(1.0)


# ---------------------------------------------------------------- retrieval


def test_average_precision_hand_worked():
    # Positives at 0-based ranks 0 and 2, two positives in all:
    # first: (1 + 1/1)/2 * 1/2 = 0.5 ; second: (1/2 + 2/3)/2 * 1/2 = 7/24.
    assert metrics.average_precision([0, 2], 2) == pytest.approx(0.5 + 7 / 24)
    assert metrics.average_precision([0, 1, 2], 3) == pytest.approx(1.0)
    # A positive never retrieved contributes nothing: half of the recall is lost.
    assert metrics.average_precision([0], 2) == pytest.approx(0.5)


def test_junk_is_removed_from_the_ranking():
    ranking = np.array([7, 3, 9, 4, 1])
    # positives 9 and 1, junk 3 and 4: without junk the ranking is [7, 9, 1].
    ranks = metrics.positive_ranks(ranking, positives=[9, 1], junk=[3, 4])
    assert ranks.tolist() == [1, 2]
    # AP = [(0/1 + 1/2)/2 + (1/2 + 2/3)/2] / 2 = (3/12 + 7/12) / 2
    expected = 10 / 24
    result = metrics.mean_average_precision([ranking], [[9, 1]], [[3, 4]])
    assert result["map"] == pytest.approx(expected)
    # Without the junk handling the positives would sit at ranks 2 and 4.
    no_junk = metrics.mean_average_precision([ranking], [[9, 1]])
    assert no_junk["map"] == pytest.approx(((0 / 2 + 1 / 3) / 2 + (1 / 4 + 2 / 5) / 2) / 2)


def test_queries_without_positives_are_excluded():
    rankings = [np.array([0, 1, 2]), np.array([0, 1, 2])]
    result = metrics.mean_average_precision(rankings, [[0], []], [[], [1]])
    assert result["n_queries"] == 1
    assert result["map"] == pytest.approx(1.0)
    assert np.isnan(result["per_query"][1])


def straightforward_ap(ranking, positives, junk):
    """Walk the ranking, skip junk, trapezoid between consecutive recall points."""
    positives, junk = set(positives), set(junk) - set(positives)
    recall_points, precision_points = [0.0], [1.0]
    found = seen = 0
    for item in ranking:
        if item in junk:
            continue
        seen += 1
        if item in positives:
            precision_just_before = found / (seen - 1) if seen > 1 else 1.0
            found += 1
            recall_points += [recall_points[-1], found / len(positives)]
            precision_points += [precision_just_before, found / seen]
    area = 0.0
    for i in range(1, len(recall_points), 2):
        width = recall_points[i + 1] - recall_points[i]
        area += width * (precision_points[i] + precision_points[i + 1]) / 2
    return area


def test_map_agrees_with_straightforward_implementation_on_random_rankings():
    rng = np.random.default_rng(4)
    rankings, positives, junk, expected = [], [], [], []
    for _ in range(60):
        ranking = rng.permutation(80)
        chosen = rng.permutation(80)
        query_positives = chosen[: rng.integers(1, 15)]
        query_junk = chosen[40: 40 + rng.integers(0, 10)]
        rankings.append(ranking)
        positives.append(query_positives)
        junk.append(query_junk)
        expected.append(straightforward_ap(ranking, query_positives, query_junk))
    result = metrics.mean_average_precision(rankings, positives, junk)
    assert np.allclose(result["per_query"], expected, atol=1e-6)
    assert result["map"] == pytest.approx(np.mean(expected), abs=1e-6)


def test_mean_precision_at_k():
    ranking = np.array([5, 0, 6, 1, 2, 3, 4])
    # junk 6 removed: [5, 0, 1, 2, 3, 4]; positives 5, 1 at 1-based ranks 1, 3.
    values = metrics.mean_precision_at_k([ranking], [[5, 1]], [[6]], ks=(1, 2, 5))
    assert values[1] == pytest.approx(1.0)
    assert values[2] == pytest.approx(1 / 2)
    # k = 5 exceeds the last positive's rank 3: denominator 3 (revisited benchmark).
    assert values[5] == pytest.approx(2 / 3)


def test_revisited_protocols_combine_easy_hard_junk():
    ranking = np.array([10, 11, 12, 13, 14])
    easy, hard, junk = [[11]], [[13]], [[10]]
    result = metrics.revisited_evaluation([ranking], easy, hard, junk, ks=(1,))
    # Easy: ignore 10 and 13 -> [11, 12, 14]: 11 first.
    assert result["easy"]["map"] == pytest.approx(1.0)
    # Medium: ignore 10 -> [11, 12, 13, 14]: positives at ranks 0 and 2.
    assert result["medium"]["map"] == pytest.approx(0.5 + 7 / 24)
    # Hard: ignore 10 and 11 -> [12, 13, 14]: 13 at rank 1: (0/1 + 1/2) / 2.
    assert result["hard"]["map"] == pytest.approx(0.25)


def test_rank_database_orders_by_similarity():
    database = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], np.float32)
    queries = np.array([[0.0, 1.0], [1.0, 0.0]], np.float32)
    assert metrics.rank_database(queries, database).tolist() == [[1, 2, 0], [0, 2, 1]]


def test_neighbour_overlap_against_brute_force():
    rng = np.random.default_rng(3)
    first, second = rng.normal(size=(40, 5)), rng.normal(size=(40, 5))
    k = 4

    def brute(x):
        distances = ((x[:, None] - x[None]) ** 2).sum(-1)
        np.fill_diagonal(distances, np.inf)
        return [set(np.argsort(row, kind="stable")[:k]) for row in distances]

    expected = np.mean([len(a & b) / k for a, b in zip(brute(first), brute(second))])
    assert metrics.neighbour_overlap(first, second, k) == pytest.approx(expected)
    assert metrics.neighbour_overlap(first, first, k) == 1.0


def test_manifold_agreement_against_brute_force():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(30, 4))
    manifold = np.array([rng.permutation(np.delete(np.arange(30), i))[:6] for i in range(30)])
    manifold[0, 3:] = -1  # fewer manifold neighbours found
    k = 5
    distances = ((x[:, None] - x[None]) ** 2).sum(-1)
    np.fill_diagonal(distances, np.inf)
    expected = np.mean([len(set(np.argsort(distances[i])[:k]) & set(manifold[i, :k]) - {-1}) / k for i in range(30)])
    assert metrics.manifold_agreement(x, manifold, k) == pytest.approx(expected)
    exact = metrics.nearest_neighbours(x.astype(np.float32), k)
    assert metrics.manifold_agreement(x, exact, k) == 1.0
