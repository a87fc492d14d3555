import numpy as np
import pytest
import scipy.sparse as sp
from scipy.sparse.linalg import cg

from mom.diffusion import (block_cg, dense_manifold_similarity, diffusion_system, manifold_neighbours,
                           normalized_adjacency, top_k_columns)
from mom.errors import InputError
from mom.graph import knn_search, reciprocal_graph

ALPHA = 0.99


def knn_graph(n=150, dim=8, k=8, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids, sims, _ = knn_search(x, k)
    return reciprocal_graph(ids, sims, gamma=3)


def unit_rhs(n, anchors):
    rhs = np.zeros((n, len(anchors)))
    rhs[anchors, np.arange(len(anchors))] = 1 - ALPHA
    return rhs


def test_normalized_adjacency_handles_degree_zero():
    graph = knn_graph(k=4)
    a_hat = normalized_adjacency(graph, dtype=np.float64).toarray()
    dense = graph.toarray().astype(np.float64)
    degree = dense.sum(axis=1)
    assert (degree == 0).any()
    assert np.isfinite(a_hat).all()
    assert (a_hat[degree == 0] == 0).all() and (a_hat[:, degree == 0] == 0).all()
    ok = degree > 0
    expected = dense[np.ix_(ok, ok)] / np.sqrt(np.outer(degree[ok], degree[ok]))
    np.testing.assert_allclose(a_hat[np.ix_(ok, ok)], expected, rtol=1e-12)


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-10), (np.float32, 1e-6)])
def test_converged_block_cg_equals_dense_inverse(dtype, tol):
    graph = knn_graph()
    reference = dense_manifold_similarity(graph, ALPHA)
    anchors = np.array([0, 3, 77, 149, 42])
    result = block_cg(diffusion_system(normalized_adjacency(graph, dtype=dtype), ALPHA), unit_rhs(150, anchors), 2000, tol)
    assert (result.relative_residual <= tol).all()
    for column, anchor in enumerate(anchors):
        expected = reference[:, anchor]
        error = np.linalg.norm(result.solution[:, column] - expected) / np.linalg.norm(expected)
        assert error < 1e-4


def test_manifold_similarity_is_symmetric():
    graph = knn_graph()
    result = block_cg(diffusion_system(normalized_adjacency(graph, dtype=np.float64), ALPHA), unit_rhs(150, np.arange(150)),
                      2000, 1e-12)
    np.testing.assert_allclose(result.solution, result.solution.T, atol=1e-9)


def test_twenty_iterations_equal_reference_cg_per_anchor():
    """The authors stop at 20 iterations (x0 = 0): column j of the block is exactly
    what scipy's single-vector CG gives for anchor j after 20 iterations, and it is
    not yet the converged solution on this graph."""
    graph = knn_graph()
    a_hat = normalized_adjacency(graph, dtype=np.float64)
    system = sp.identity(150) - ALPHA * a_hat
    anchors = np.array([1, 50, 99])
    result = block_cg(diffusion_system(a_hat, ALPHA), unit_rhs(150, anchors), 20, 1e-30)
    assert (result.iterations == 20).all()
    assert len(result.residual_history) == 20
    reference = dense_manifold_similarity(graph, ALPHA)
    for column, anchor in enumerate(anchors):
        rhs = unit_rhs(150, [anchor])[:, 0]
        single, _ = cg(system, rhs, x0=np.zeros(150), rtol=1e-30, atol=0, maxiter=20)
        np.testing.assert_allclose(result.solution[:, column], single, rtol=1e-9, atol=1e-12)
        residual = np.linalg.norm(rhs - system @ single) / np.linalg.norm(rhs)
        assert abs(result.relative_residual[column] - residual) < 1e-9
        assert np.linalg.norm(result.solution[:, column] - reference[:, anchor]) > 1e-6


def test_top_k_excludes_anchor_and_breaks_ties_by_id():
    values = np.array([[5.0, 1.0], [3.0, 0.0], [3.0, 2.0], [0.0, 2.0], [1.0, -1.0]])
    ids, sims = top_k_columns(values, np.array([0, 2]), 3)
    np.testing.assert_array_equal(ids, [[1, 2, 4], [3, 0, -1]])
    np.testing.assert_array_equal(sims, [[3, 3, 1], [2, 1, 0]])


@pytest.mark.parametrize("k", [1, 7, 60, 299, 400])
def test_top_k_equals_a_full_sort(k):
    """Brute force: per column, all positive entries but the anchor sorted by (-value, row), the first k."""
    rng = np.random.default_rng(k)
    values = np.round(rng.normal(size=(300, 9)), 1)  # many ties, negatives
    values[rng.random(values.shape) < 0.3] = 0  # unreached rows
    values[:, 8] = 0.5  # one column all tied
    values = values.astype(np.float32)
    before = values.copy()
    exclude = rng.integers(0, 300, 9)
    ids, sims = top_k_columns(values, exclude, k)
    np.testing.assert_array_equal(values, before)  # input unchanged
    for j in range(9):
        rows = [row for row in range(300) if row != exclude[j] and values[row, j] > 0]
        expected = sorted(rows, key=lambda row: (-values[row, j], row))[:k]
        np.testing.assert_array_equal(ids[j, :len(expected)], expected)
        assert (ids[j, len(expected):] == -1).all() and (sims[j, len(expected):] == 0).all()
        np.testing.assert_array_equal(sims[j, :len(expected)], values[expected, j])


@pytest.mark.parametrize("reorder", [True, False])
def test_manifold_neighbours_equal_dense_top_k(reorder):
    graph = knn_graph()
    reference = dense_manifold_similarity(graph, ALPHA)
    anchors = np.array([4, 8, 15, 16, 23, 42, 108])
    result = manifold_neighbours(graph, anchors, k=20, max_iter=3000, tol=1e-12, block_size=3,
                                 reorder=reorder, dtype=np.float64)
    for row, anchor in enumerate(anchors):
        column = reference[:, anchor].copy()
        column[anchor] = -np.inf
        expected = np.argsort(-column, kind="stable")[:20]
        np.testing.assert_array_equal(result.ids[row], expected)
        np.testing.assert_allclose(result.similarities[row], column[expected], rtol=1e-5)
    assert (result.relative_residual <= 1e-12).all()


def test_isolated_anchor_and_small_component_have_no_nan():
    graph = knn_graph(k=4)
    degree = np.diff(graph.indptr)
    isolated = int(np.flatnonzero(degree == 0)[0])
    result = manifold_neighbours(graph, np.array([isolated, 0]), k=10)
    assert np.isfinite(result.similarities).all() and np.isfinite(result.relative_residual).all()
    assert (result.ids[0] == -1).all() and (result.similarities[0] == 0).all()


def test_neighbours_stay_in_the_anchor_component():
    block = knn_graph(n=60, seed=1)
    graph = sp.block_diag([block, block]).tocsr()
    result = manifold_neighbours(graph, np.array([5, 65]), k=80, max_iter=200, tol=1e-10)
    valid0 = result.ids[0][result.ids[0] >= 0]
    valid1 = result.ids[1][result.ids[1] >= 0]
    assert (valid0 < 60).all() and (valid1 >= 60).all()
    np.testing.assert_array_equal(valid0 + 60, valid1)


def test_bad_options():
    graph = knn_graph()
    with pytest.raises(InputError, match="alpha"):
        manifold_neighbours(graph, np.array([0]), k=5, alpha=1.0)
    with pytest.raises(InputError, match="k=150"):
        manifold_neighbours(graph, np.array([0]), k=150)


def test_support_tracking_is_exact():
    """Working only on the rows the iterates can reach gives the same iterates as full-length CG."""
    block = knn_graph(n=80, seed=2)
    graph = sp.block_diag([block, block, block]).tocsr()  # anchors' neighbourhoods stay small
    system = diffusion_system(normalized_adjacency(graph, dtype=np.float64), ALPHA)
    rhs = unit_rhs(240, np.array([3, 100]))
    tracked = block_cg(system, rhs, 20, 1e-30, full_fraction=1.0)
    full = block_cg(system, rhs, 20, 1e-30, full_fraction=0.0)
    assert tracked.support is not None and len(tracked.support) <= 160 and full.support is None
    np.testing.assert_allclose(tracked.solution, full.solution, rtol=1e-12, atol=1e-15)
    outside = np.setdiff1d(np.arange(240), tracked.support)
    assert (tracked.solution[outside] == 0).all()


def test_truncation_to_the_whole_graph_equals_the_full_solve_and_small_truncation_is_reported():
    from mom.diffusion import neighbour_agreement, truncated_manifold_neighbours
    graph = knn_graph()
    anchors = np.array([3, 30, 130])
    full = manifold_neighbours(graph, anchors, k=10, dtype=np.float64, max_iter=20)
    everything = np.tile(np.arange(150), (3, 1))
    whole = truncated_manifold_neighbours(graph, anchors, everything, k=10, dtype=np.float64, max_iter=20)
    np.testing.assert_array_equal(whole.ids, full.ids)
    np.testing.assert_allclose(whole.similarities, full.similarities, rtol=1e-6)
    assert neighbour_agreement(whole.ids, full.ids) == 1.0
    x = np.random.default_rng(0).normal(size=(150, 8)).astype(np.float32)  # same features as knn_graph()
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    from mom.graph import neighbours_of
    near, _ = neighbours_of(x, anchors, 40)
    truncated = truncated_manifold_neighbours(graph, anchors, near, k=10, dtype=np.float64)
    agreement = neighbour_agreement(truncated.ids, full.ids)
    assert 0 < agreement <= 1
    assert set(truncated.ids[0][truncated.ids[0] >= 0]) <= set(near[0])


def test_threaded_products_give_the_same_iterates():
    graph = knn_graph(n=5000, k=10, seed=3)
    system = diffusion_system(normalized_adjacency(graph, dtype=np.float32), ALPHA)
    rhs = unit_rhs(5000, np.array([1, 2, 3000])).astype(np.float32)
    single = block_cg(system, rhs, 20, 0, full_fraction=0.0, threads=1)
    threaded = block_cg(system, rhs, 20, 0, full_fraction=0.0, threads=3)
    np.testing.assert_array_equal(single.solution, threaded.solution)
