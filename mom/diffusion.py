"""Manifold similarity by diffusion on the graph (docs/method.md section 4, eqs. (2)-(4)).

For anchor i the manifold similarities are the solution ``f_i*`` of
``(I - alpha A_hat) f = (1 - alpha) e_i`` with ``A_hat = D^-1/2 A D^-1/2``,
i.e. column i of ``(1 - alpha)(I - alpha A_hat)^-1`` (never formed).

Many anchors are solved together: :func:`block_cg` runs one conjugate-gradient
recurrence per column (its own step lengths), all columns sharing each sparse
matrix times dense block product. Column j after t iterations is therefore
exactly what t iterations of textbook CG (x0 = 0) give for anchor j alone —
the authors' 20-iteration result — only computed faster.
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch
from scipy.sparse import csgraph

from mom.errors import InputError
from mom.graph import weighted_degree

log = logging.getLogger(__name__)


def normalized_adjacency(adjacency: sp.csr_matrix, dtype=np.float32) -> sp.csr_matrix:
    """``A_hat = D^-1/2 A D^-1/2`` (eq. (2)); rows/columns of degree-0 nodes are zero."""
    degree = weighted_degree(adjacency)
    inv_sqrt = np.zeros_like(degree)
    positive = degree > 0
    inv_sqrt[positive] = 1.0 / np.sqrt(degree[positive])
    scale = sp.diags(inv_sqrt)
    result = (scale @ adjacency.astype(np.float64) @ scale).astype(dtype).tocsr()
    result.sort_indices()
    return result


def locality_order(adjacency: sp.csr_matrix) -> np.ndarray:
    """A node permutation that puts graph neighbours close in memory.

    Reverse Cuthill-McKee: after ``A[order][:, order]`` the non-zeros gather
    near the diagonal, so a sparse product reads the dense block from nearby
    rows (cache hits) instead of from all over memory.
    """
    return csgraph.reverse_cuthill_mckee(adjacency.tocsr(), symmetric_mode=True).astype(np.int64)


def diffusion_system(a_hat: sp.csr_matrix, alpha: float) -> sp.csr_matrix:
    """The matrix ``I - alpha A_hat`` of eq. (3), sparse (diagonal stored), in ``a_hat``'s dtype.

    Symmetric positive definite for 0 < alpha < 1 (the eigenvalues of ``A_hat`` lie in [-1, 1]).
    """
    identity = sp.identity(a_hat.shape[0], dtype=a_hat.dtype, format="csr")
    system = (identity - a_hat.multiply(alpha)).astype(a_hat.dtype).tocsr()
    system.sort_indices()
    return system


@dataclass
class CGResult:
    """Solutions (n, b), per-column convergence (final relative residual, iterations), and
    ``support``: the sorted rows outside which the solution is exactly zero (None: all rows)."""

    solution: np.ndarray
    relative_residual: np.ndarray
    iterations: np.ndarray
    residual_history: list = field(default_factory=list)
    support: np.ndarray | None = None


class _Support:
    """Rows where the CG vectors can be non-zero, grown by one graph hop per product.

    With x0 = 0, after t iterations x, r and p lie in span{b, M b, ..., M^t b}:
    zero outside the t-hop neighbourhood of the right-hand sides' rows. Working
    on those rows only is exact, and while the neighbourhood is small (early
    iterations, anchors of one block close in the graph) it is far cheaper.
    Once it exceeds ``full_fraction`` of the rows, everything switches to plain
    full-length arithmetic.
    """

    def __init__(self, system: sp.csr_matrix, rhs: np.ndarray, full_fraction: float, threads: int = 1):
        self.system = system
        self.full_fraction = full_fraction
        self.threads = threads
        self.rows = np.flatnonzero(np.any(rhs != 0, axis=1))
        self.rows_matrix = system[self.rows]
        self.full = False

    def grow(self) -> None:
        """Extend to the rows one product away; keep ``rows_matrix = system[rows]``."""
        if self.full:
            return
        mask = np.zeros(self.system.shape[0], dtype=bool)
        mask[self.rows] = True
        mask[self.rows_matrix.indices] = True
        rows = np.flatnonzero(mask)
        if len(rows) > self.full_fraction * self.system.shape[0]:
            self.full, self.rows, self.rows_matrix = True, slice(None), self.system
        else:
            self.rows, self.rows_matrix = rows, self.system[rows]

    def product(self, block: np.ndarray) -> np.ndarray:
        """``system[rows] @ block``, split into row ranges of equal non-zeros over ``threads``
        threads (scipy's kernel releases the GIL; each range's result is the same)."""
        if self.threads <= 1 or self.rows_matrix.shape[0] < 4096:
            return self.rows_matrix @ block
        matrix = self.rows_matrix
        bounds = np.searchsorted(matrix.indptr, np.linspace(0, matrix.nnz, self.threads + 1)[1:-1])
        starts = np.concatenate([[0], bounds])
        ends = np.concatenate([bounds, [matrix.shape[0]]])
        out = np.empty((matrix.shape[0], block.shape[1]), dtype=np.result_type(matrix.dtype, block.dtype))

        def run(start_end):
            start, end = start_end
            out[start:end] = matrix[start:end] @ block

        list(_pool(self.threads).map(run, zip(starts, ends)))
        return out


_POOLS: dict = {}


def _pool(threads: int) -> ThreadPoolExecutor:
    if threads not in _POOLS:
        _POOLS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="spmm")
    return _POOLS[threads]


def block_cg(system: sp.csr_matrix, rhs: np.ndarray, max_iter: int, tol: float,
             full_fraction: float = 0.5, threads: int = 1) -> CGResult:
    """Solve ``system X = rhs`` (symmetric positive definite) column by column, all columns at once.

    Independent CG recurrences (x0 = 0) per column sharing one sparse x dense
    product per iteration, restricted to the rows the iterates can reach
    (:class:`_Support`; exact). A column stops moving once its residual norm is
    at most ``tol`` times its right-hand side's norm, or after ``max_iter``
    iterations. ``residual_history[t]`` is the mean relative residual over the
    columns after iteration t+1 (the reported convergence curve). Column dot
    products are accumulated in float64. ``threads`` splits the sparse products.
    """
    dtype = system.dtype
    x = np.zeros(rhs.shape, dtype=dtype)
    r = np.array(rhs, dtype=dtype, order="C")
    p = r.copy()
    support = _Support(system, rhs, full_fraction, threads)
    rs = column_dot(r, r)
    rhs_norm = np.sqrt(rs)
    rhs_norm[rhs_norm == 0] = 1.0
    done = np.sqrt(rs) <= tol * rhs_norm
    iterations = np.zeros(rhs.shape[1], dtype=np.int64)
    history = []
    for _ in range(max_iter):
        if done.all():
            break
        support.grow()
        rows = support.rows
        q = support.product(p)
        p_rows = p[rows]  # a view once the support is full, else a copy written back below
        pq = column_dot(p_rows, q)
        step_length = np.where(done | (pq <= 0), 0.0, rs / np.where(pq > 0, pq, 1.0)).astype(dtype)
        r_rows = r[rows]
        if support.full:
            update_x = torch.from_numpy(x)
        else:
            x_rows = x[rows]
            update_x = torch.from_numpy(x_rows)
        length = torch.from_numpy(step_length)
        # fused in-place updates (one pass each): x += a p, r -= a q
        update_x.addcmul_(torch.from_numpy(p_rows), length)
        torch.from_numpy(r_rows).addcmul_(torch.from_numpy(q), length, value=-1)
        rs_new = np.where(done, rs, column_dot(r_rows, r_rows))
        iterations += ~done
        done = done | (np.sqrt(rs_new) <= tol * rhs_norm)
        beta = np.where(rs > 0, rs_new / np.where(rs > 0, rs, 1.0), 0.0).astype(dtype)
        torch.from_numpy(p_rows).mul_(torch.from_numpy(beta)).add_(torch.from_numpy(r_rows))  # p = r + beta p
        if not support.full:
            x[rows], r[rows], p[rows] = x_rows, r_rows, p_rows
        rs = rs_new
        history.append(float(np.mean(np.sqrt(rs) / rhs_norm)))
    return CGResult(x, np.sqrt(rs) / rhs_norm, iterations, history, None if support.full else support.rows)


def column_dot(a: np.ndarray, b: np.ndarray, chunk: int = 32768) -> np.ndarray:
    """Per-column inner products of two (n, b) blocks: chunks in the blocks' dtype, summed in float64."""
    out = np.zeros(a.shape[1], dtype=np.float64)
    for start in range(0, a.shape[0], chunk):
        out += np.einsum("ij,ij->j", a[start:start + chunk], b[start:start + chunk])
    return out


def top_k_columns(values: np.ndarray, exclude: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per column, the k largest positive entries excluding row ``exclude[j]``.

    Order: descending value, ties by ascending row. Columns with fewer than k
    positive entries are padded with id -1 and similarity 0 (unreachable nodes
    have manifold similarity 0 and are not neighbours). Every entry at least the
    column's k-th largest value is a candidate (:func:`_candidates`); the
    candidates are sorted exactly, so the result is that of a full sort.
    """
    n, width = values.shape
    ids = np.full((width, k), -1, dtype=np.int64)
    sims = np.zeros((width, k), dtype=np.float32)
    take = min(k, n - 1)
    if take <= 0:
        return ids, sims
    rows, cols = _candidates(values, exclude, take)
    for j, (start, end) in enumerate(zip(*_segments(cols, width))):
        chosen = rows[start:end]
        column = values[chosen, j]
        cut = max(np.partition(column, len(column) - take)[len(column) - take], np.finfo(values.dtype).tiny)
        keep = column >= cut
        chosen, column = chosen[keep], column[keep]
        order = np.lexsort((chosen, -column))[:k]
        ids[j, :len(order)] = chosen[order]
        sims[j, :len(order)] = column[order]
    return ids, sims


def _candidates(values: np.ndarray, exclude: np.ndarray, take: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, columns) of entries holding at least each column's ``take`` largest, the excluded rows left out,
    sorted by column then row.

    A threshold per column from every 16th row (a little below the sample's share of
    the top ``take``) keeps about 1.3 ``take`` entries in one pass; a column left with
    fewer than ``take`` candidates keeps all its entries instead (exact either way).
    """
    n, width = values.shape
    columns = np.arange(width)
    saved = values[exclude, columns].copy()
    values[exclude, columns] = -np.inf  # restored below
    try:
        sample = values[::16]
        want = min(len(sample), int(np.ceil(take * len(sample) / n * 1.25)) + 8)
        threshold = np.partition(sample, len(sample) - want, axis=0)[len(sample) - want]
        mask = values >= threshold
        mask[:, np.count_nonzero(mask, axis=0) < take] = True
        rows, cols = np.nonzero(mask)
        kept = values[rows, cols] > -np.inf
    finally:
        values[exclude, columns] = saved
    rows, cols = rows[kept], cols[kept]
    order = np.argsort(cols, kind="stable")
    return rows[order], cols[order]


def _segments(sorted_columns: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Start and end of each column's run in a column-sorted list."""
    bounds = np.searchsorted(sorted_columns, np.arange(width + 1))
    return bounds[:-1], bounds[1:]


@dataclass
class DiffusionResult:
    """Top-k manifold neighbours of each anchor (rows in anchor order) and convergence."""

    ids: np.ndarray
    similarities: np.ndarray
    relative_residual: np.ndarray
    iterations: np.ndarray
    residual_history: list


def manifold_neighbours(adjacency: sp.csr_matrix, anchors: np.ndarray, k: int, alpha: float = 0.99,
                        max_iter: int = 20, tol: float = 1e-6, block_size: int = 64,
                        reorder: bool = True, dtype=np.float32, progress=None,
                        full_fraction: float = 0.5, threads: int = 1, fused: bool = False) -> DiffusionResult:
    """``NN_k^m`` of every anchor (eq. (4)): the k nodes with the largest ``f_i*``, anchor excluded.

    ``f_i*`` solves eq. (3) by :func:`block_cg` for blocks of ``block_size``
    anchors. With ``reorder`` the system is permuted by :func:`locality_order`
    first and blocks gather anchors that are close in that order (same
    solution, faster: nearby rows in memory, overlapping neighbourhoods); ids
    are mapped back and rows come out in the given anchor order.
    ``full_fraction`` and ``threads`` are :func:`block_cg`'s (0: always full-length vectors).
    ``fused`` solves with :func:`mom.cg.fused_block_cg` instead (same recurrences in
    three compiled passes per iteration; equal to float rounding; needs numba).
    """
    n = adjacency.shape[0]
    if not 0 < alpha < 1:
        raise InputError(f"alpha={alpha}: must be in (0, 1)")
    if k < 1 or k >= n:
        raise InputError(f"k={k}: must be between 1 and the number of items minus 1 ({n - 1})")
    anchors = np.asarray(anchors, dtype=np.int64)
    solve = fused_solver() if fused else block_cg
    order = locality_order(adjacency) if reorder else np.arange(n)
    position = np.empty(n, dtype=np.int64)
    position[order] = np.arange(n)
    system = diffusion_system(normalized_adjacency(adjacency[order][:, order].tocsr(), dtype=dtype), alpha)
    schedule = np.argsort(position[anchors], kind="stable") if reorder else np.arange(len(anchors))
    ids = np.empty((len(anchors), k), dtype=np.int64)
    sims = np.empty((len(anchors), k), dtype=np.float32)
    residual = np.empty(len(anchors))
    iterations = np.empty(len(anchors), dtype=np.int64)
    history = []
    for start in range(0, len(anchors), block_size):
        rows_out = schedule[start:start + block_size]
        block = position[anchors[rows_out]]
        rhs = np.zeros((n, len(block)), dtype=dtype)
        rhs[block, np.arange(len(block))] = 1 - alpha
        result = solve(system, rhs, max_iter, tol, full_fraction, threads)
        block_ids, block_sims = support_top_k(result, block, k)
        ids[rows_out] = np.where(block_ids >= 0, order[np.maximum(block_ids, 0)], -1)
        sims[rows_out] = block_sims
        residual[rows_out] = result.relative_residual
        iterations[rows_out] = result.iterations
        history.append(result.residual_history)
        if progress is not None:
            progress(len(block))
    return DiffusionResult(ids, sims, residual, iterations, _mean_history(history, len(anchors), block_size))


def fused_solver():
    """:func:`mom.cg.fused_block_cg`, or a one-line error where numba is not installed."""
    try:
        from mom.cg import fused_block_cg
    except ImportError as error:
        raise InputError(f"the fused block CG needs numba ({error}): pip install numba, "
                         "or raise diffuse.fused_min_items above the number of items") from None
    return fused_block_cg


def support_top_k(result: CGResult, block: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`top_k_columns` of a block solution, looking only at its support rows."""
    if result.support is None:
        return top_k_columns(result.solution, block, k)
    rows = result.support
    local_ids, sims = top_k_columns(result.solution[rows], np.searchsorted(rows, block), k)
    return np.where(local_ids >= 0, rows[np.maximum(local_ids, 0)], -1), sims


def truncated_manifold_neighbours(adjacency: sp.csr_matrix, anchors: np.ndarray, neighbourhoods: np.ndarray,
                                  k: int, alpha: float = 0.99, max_iter: int = 20, tol: float = 1e-6,
                                  dtype=np.float32, progress=None) -> DiffusionResult:
    """Approximate ``NN_k^m``: eq. (3) solved on each anchor's Euclidean neighbourhood only.

    For anchor i the system ``(I - alpha A_hat) f = (1 - alpha) e_i`` is
    restricted to the nodes ``{i} + neighbourhoods[i]`` (``A_hat`` keeps the
    degrees of the whole graph; edges leaving the neighbourhood are dropped, so
    f is 0 outside it). Cheaper per anchor than the full solve when the
    neighbourhood is small; how well it agrees with the full solve is measured
    by :func:`neighbour_agreement`.
    """
    n = adjacency.shape[0]
    system = diffusion_system(normalized_adjacency(adjacency, dtype=dtype), alpha)
    anchors = np.asarray(anchors, dtype=np.int64)
    ids = np.full((len(anchors), k), -1, dtype=np.int64)
    sims = np.zeros((len(anchors), k), dtype=np.float32)
    residual = np.empty(len(anchors))
    iterations = np.empty(len(anchors), dtype=np.int64)
    for row, anchor in enumerate(anchors):
        nodes = np.union1d(neighbourhoods[row][neighbourhoods[row] >= 0], [anchor])
        local = system[nodes][:, nodes].tocsr()
        rhs = np.zeros((len(nodes), 1), dtype=dtype)
        at = int(np.searchsorted(nodes, anchor))
        rhs[at, 0] = 1 - alpha
        result = block_cg(local, rhs, max_iter, tol)
        local_ids, local_sims = top_k_columns(result.solution, np.array([at]), min(k, max(len(nodes) - 1, 1)))
        found = local_ids[0] >= 0
        ids[row, :found.sum()] = nodes[local_ids[0][found]]
        sims[row, :found.sum()] = local_sims[0][found]
        residual[row], iterations[row] = result.relative_residual[0], result.iterations[0]
        if progress is not None:
            progress(1)
    return DiffusionResult(ids, sims, residual, iterations, [])


def neighbour_agreement(approximate: np.ndarray, reference: np.ndarray) -> float:
    """Mean over anchors of ``|approx top-k  intersect  reference top-k| / |reference top-k|`` (ids -1 ignored)."""
    scores = []
    for approx_row, reference_row in zip(approximate, reference):
        truth = reference_row[reference_row >= 0]
        if len(truth):
            scores.append(np.intersect1d(approx_row[approx_row >= 0], truth).size / len(truth))
    return float(np.mean(scores)) if scores else 1.0


def _mean_history(histories: list, n_anchors: int, block_size: int) -> list:
    """Mean relative residual per iteration over all anchors (blocks weighted by size)."""
    length = max((len(h) for h in histories), default=0)
    weights = [min(block_size, n_anchors - i * block_size) for i in range(len(histories))]
    curve = []
    for t in range(length):
        # a block that stopped early keeps its last value
        values = [h[min(t, len(h) - 1)] if h else 0.0 for h in histories]
        curve.append(float(np.average(values, weights=weights)))
    return curve


def dense_manifold_similarity(adjacency: sp.csr_matrix, alpha: float) -> np.ndarray:
    """Reference ``(1 - alpha)(I - alpha A_hat)^-1`` as a dense float64 matrix — small graphs only (tests)."""
    n = adjacency.shape[0]
    if n > 5000:
        raise InputError(f"dense manifold similarity of {n} nodes would be {n}x{n}: use manifold_neighbours")
    a_hat = normalized_adjacency(adjacency, dtype=np.float64).toarray()
    return (1 - alpha) * np.linalg.inv(np.eye(n) - alpha * a_hat)
