import numpy as np
import pytest
import scipy.sparse as sp
from scipy.sparse import csgraph

from mom.anchors import local_maxima, select_anchors, stationary_distribution
from mom.errors import InputError
from mom.graph import knn_search, reciprocal_graph, weighted_degree


def knn_graph(n=300, dim=8, k=10, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids, sims, _ = knn_search(x, k)
    return reciprocal_graph(ids, sims, gamma=3)


def test_stationary_equals_power_iteration_on_largest_component():
    graph = knn_graph()
    _, labels = csgraph.connected_components(graph, directed=False)
    largest = np.flatnonzero(labels == np.bincount(labels).argmax())
    sub = graph[largest][:, largest].toarray().astype(np.float64)
    transition = sub / sub.sum(axis=1, keepdims=True)
    walk = np.full(len(largest), 1 / len(largest))
    for _ in range(1000):
        walk = walk @ transition
    pi = stationary_distribution(graph)[largest]
    np.testing.assert_allclose(pi / pi.sum(), walk, atol=1e-6)


def test_stationary_is_left_eigenvector_with_isolated_nodes():
    graph = knn_graph(k=4)
    degree = weighted_degree(graph)
    assert (degree == 0).any(), "fixture should contain isolated nodes"
    pi = stationary_distribution(graph)
    assert np.isfinite(pi).all() and abs(pi.sum() - 1) < 1e-12
    assert (pi[degree == 0] == 0).all()
    safe = np.where(degree > 0, degree, 1)
    transition = sp.diags(1 / safe) @ graph.astype(np.float64)
    np.testing.assert_allclose(transition.T @ pi, pi, rtol=1e-12, atol=1e-15)


def test_graph_without_edges_gives_zeros_not_nan():
    pi = stationary_distribution(sp.csr_matrix((4, 4)))
    assert (pi == 0).all()
    items, _ = select_anchors(sp.csr_matrix((4, 4)), "stationary", 2)
    assert len(items) == 0


def test_local_maxima_match_definition():
    graph = knn_graph()
    pi = stationary_distribution(graph)
    mask = local_maxima(graph, pi)
    for i in range(graph.shape[0]):
        neighbours = graph.indices[graph.indptr[i]:graph.indptr[i + 1]]
        expected = len(neighbours) > 0 and all((pi[i], -i) > (pi[j], -j) for j in neighbours)
        assert mask[i] == expected


def test_tied_neighbours_give_one_maximum():
    graph = sp.csr_matrix(np.array([[0, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=float))
    mask = local_maxima(graph, stationary_distribution(graph))
    assert mask.tolist() == [True, False, False]


def test_stationary_strategy_takes_top_local_maxima():
    graph = knn_graph()
    pi = stationary_distribution(graph)
    maxima = np.flatnonzero(local_maxima(graph, pi))
    items, probability = select_anchors(graph, "stationary", 5)
    expected = maxima[np.lexsort((maxima, -pi[maxima]))][:5]
    np.testing.assert_array_equal(items, expected)
    np.testing.assert_array_equal(probability, pi[expected])
    all_items, _ = select_anchors(graph, "stationary", None)
    assert len(all_items) == len(maxima)


def test_all_and_random_strategies():
    graph = knn_graph()
    items, probability = select_anchors(graph, "all", None)
    assert sorted(items) == list(range(300))
    assert (np.diff(probability) <= 0).all()
    first, _ = select_anchors(graph, "random", 20, seed=3)
    again, _ = select_anchors(graph, "random", 20, seed=3)
    other, _ = select_anchors(graph, "random", 20, seed=4)
    np.testing.assert_array_equal(first, again)
    assert len(set(first)) == 20 and not np.array_equal(first, other)


@pytest.mark.parametrize("strategy,count", [("best", 3), ("random", 0), ("random", 301)])
def test_bad_options_are_errors(strategy, count):
    with pytest.raises(InputError):
        select_anchors(knn_graph(), strategy, count)


def test_strategy_auto_is_all_up_to_the_defaults_size_then_random():
    from mom.anchors import ALL_ANCHORS_MAX_ITEMS, resolve_strategy

    assert ALL_ANCHORS_MAX_ITEMS == 6000  # the embedded default keeps every item an anchor
    assert resolve_strategy("auto", 6000) == "all" and resolve_strategy("auto", 60) == "all"
    assert resolve_strategy("auto", 6001) == "random"
    assert resolve_strategy("stationary", 10) == "stationary"
