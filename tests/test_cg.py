"""The fused block CG (mom/cg.py) against brute-force definitions and against block_cg."""
import numpy as np
import pytest
import scipy.sparse as sp
from scipy.sparse.linalg import cg

pytest.importorskip("numba")

from mom.cg import fused_block_cg, grow_rows, spmm_dot, update_residual, update_solution_and_direction  # noqa: E402
from mom.diffusion import (block_cg, dense_manifold_similarity, diffusion_system, manifold_neighbours,  # noqa: E402
                           normalized_adjacency)
from test_diffusion import ALPHA, knn_graph, unit_rhs  # noqa: E402


def random_csr(n=3000, density=0.003, dtype=np.float32, seed=0):
    return sp.random(n, n, density=density, format="csr", dtype=dtype, random_state=seed)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_product_equals_scipy_bit_for_bit_and_dots_equal_float64_sums(dtype):
    matrix = random_csr(dtype=dtype)
    rng = np.random.default_rng(1)
    p = rng.normal(size=(3000, 7)).astype(dtype)
    q = np.full_like(p, np.nan)
    rows = np.sort(rng.choice(3000, 2500, replace=False))
    dots = spmm_dot(matrix.indptr, matrix.indices, matrix.data, p, q, rows)
    np.testing.assert_array_equal(q[rows], (matrix @ p)[rows])  # same summation order as scipy
    outside = np.setdiff1d(np.arange(3000), rows)
    assert np.isnan(q[outside]).all()  # rows outside the list are not touched
    expected = (p[rows].astype(np.float64) * q[rows].astype(np.float64)).sum(axis=0)
    np.testing.assert_allclose(dots, expected, rtol=1e-12)


def test_updates_equal_their_definitions():
    rng = np.random.default_rng(2)
    x, p, r, q = (rng.normal(size=(5000, 5)).astype(np.float32) for _ in range(4))
    step, beta = rng.random(5).astype(np.float32), rng.random(5).astype(np.float32)
    rows = np.arange(0, 5000, 3)
    r_expected = r.copy()
    r_expected[rows] = r[rows] - step * q[rows]
    dots = update_residual(r, q, step, rows)
    np.testing.assert_array_equal(r, r_expected)
    np.testing.assert_allclose(dots, (r[rows].astype(np.float64) ** 2).sum(axis=0), rtol=1e-12)
    x_expected, p_expected = x.copy(), p.copy()
    x_expected[rows] = x[rows] + step * p[rows]
    p_expected[rows] = r[rows] + beta * p[rows]
    update_solution_and_direction(x, p, r, step, beta, rows)
    np.testing.assert_array_equal(x, x_expected)
    np.testing.assert_array_equal(p, p_expected)


def test_grow_rows_adds_the_one_hop_neighbours():
    matrix = random_csr(n=500, density=0.01, seed=3)
    rows = np.array([4, 77, 300])
    expected = np.union1d(rows, matrix[rows].indices)
    np.testing.assert_array_equal(grow_rows(matrix.indptr, matrix.indices, rows, 500), expected)


def test_twenty_fused_iterations_equal_scipy_cg_per_anchor():
    graph = knn_graph()
    a_hat = normalized_adjacency(graph, dtype=np.float64)
    system = sp.identity(150) - ALPHA * a_hat
    anchors = np.array([1, 50, 99])
    result = fused_block_cg(diffusion_system(a_hat, ALPHA), unit_rhs(150, anchors), 20, 1e-30)
    assert (result.iterations == 20).all() and len(result.residual_history) == 20
    for column, anchor in enumerate(anchors):
        rhs = unit_rhs(150, [anchor])[:, 0]
        single, _ = cg(system, rhs, x0=np.zeros(150), rtol=1e-30, atol=0, maxiter=20)
        np.testing.assert_allclose(result.solution[:, column], single, rtol=1e-9, atol=1e-12)
        residual = np.linalg.norm(rhs - system @ single) / np.linalg.norm(rhs)
        assert abs(result.relative_residual[column] - residual) < 1e-9


def test_converged_fused_cg_equals_dense_inverse():
    graph = knn_graph()
    reference = dense_manifold_similarity(graph, ALPHA)
    anchors = np.array([0, 3, 77, 149, 42])
    system = diffusion_system(normalized_adjacency(graph, dtype=np.float32), ALPHA)
    result = fused_block_cg(system, unit_rhs(150, anchors), 2000, 1e-6)
    assert (result.relative_residual <= 1e-6).all()
    for column, anchor in enumerate(anchors):
        expected = reference[:, anchor]
        assert np.linalg.norm(result.solution[:, column] - expected) / np.linalg.norm(expected) < 1e-4


def test_fused_equals_block_cg_with_support_tracking_and_any_thread_count():
    block = knn_graph(n=80, seed=2)
    graph = sp.block_diag([block, block, block, knn_graph(n=3000, k=10, seed=3)]).tocsr()
    system = diffusion_system(normalized_adjacency(graph, dtype=np.float32), ALPHA)
    rhs = unit_rhs(3240, np.array([3, 100, 1000, 3000])).astype(np.float32)
    for fraction in (1.0, 0.5, 0.0):
        reference = block_cg(system, rhs, 20, 1e-6, full_fraction=fraction)
        fused = fused_block_cg(system, rhs, 20, 1e-6, full_fraction=fraction, threads=1)
        np.testing.assert_allclose(fused.solution, reference.solution, rtol=1e-4, atol=1e-9)
        np.testing.assert_array_equal(fused.iterations, reference.iterations)
        if reference.support is None:
            assert fused.support is None
        else:
            np.testing.assert_array_equal(fused.support, reference.support)
        threaded = fused_block_cg(system, rhs, 20, 1e-6, full_fraction=fraction, threads=2)
        np.testing.assert_array_equal(threaded.solution, fused.solution)


@pytest.mark.parametrize("reorder", [True, False])
def test_fused_manifold_neighbours_equal_dense_top_k(reorder):
    graph = knn_graph()
    reference = dense_manifold_similarity(graph, ALPHA)
    anchors = np.array([4, 8, 15, 16, 23, 42, 108])
    result = manifold_neighbours(graph, anchors, k=20, max_iter=3000, tol=1e-12, block_size=3,
                                 reorder=reorder, dtype=np.float64, fused=True)
    for row, anchor in enumerate(anchors):
        column = reference[:, anchor].copy()
        column[anchor] = -np.inf
        expected = np.argsort(-column, kind="stable")[:20]
        np.testing.assert_array_equal(result.ids[row], expected)
        np.testing.assert_allclose(result.similarities[row], column[expected], rtol=1e-5)
