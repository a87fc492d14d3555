"""Fused block conjugate gradient: :func:`mom.diffusion.block_cg` in three memory passes per iteration.

The same recurrences as :func:`mom.diffusion.block_cg` (one CG per column,
x0 = 0, the same step lengths, stopping rule and support tracking), with the
work of an iteration fused into three compiled, multi-threaded passes over the
rows the iterates can reach:

1. ``q = M p`` (sparse x dense block, float32) together with the column dots ``p.q``;
2. ``r -= a q`` together with the column dots ``r.r``;
3. ``x += a p`` and ``p = r + beta p``.

The dense block ``p`` is read in place (no copies of support rows, no
temporary blocks), and each row of the block is touched while it is in cache.
Column dots are accumulated in float64 over fixed chunks of rows, so the
result does not depend on the number of threads. The sparse product
accumulates each row's terms in index order in the matrix dtype, like scipy's;
the column dots round differently from :func:`mom.diffusion.column_dot`, so
the iterates agree with :func:`block_cg`'s to float rounding, not bit for bit.

Needs numba (compiled on first use, cached beside this file).
"""
from __future__ import annotations

import numba
import numpy as np
import scipy.sparse as sp

CHUNK_ROWS = 2048  # rows per chunk of the column-dot partial sums (fixed: results independent of threads)


@numba.njit(parallel=True, cache=True, nogil=True)
def spmm_dot(indptr, indices, data, p, q, rows):
    """``q[rows] = (M p)[rows]`` for CSR ``M``; returns the column dots ``p[rows].q[rows]`` (float64).

    Each row's terms are summed in index order in the block's dtype (as scipy does)."""
    width = p.shape[1]
    chunks = (len(rows) + CHUNK_ROWS - 1) // CHUNK_ROWS
    partial = np.zeros((chunks, width))
    for chunk in numba.prange(chunks):
        row_sum = np.empty(width, dtype=p.dtype)
        for t in range(chunk * CHUNK_ROWS, min((chunk + 1) * CHUNK_ROWS, len(rows))):
            i = rows[t]
            row_sum[:] = 0
            for s in range(indptr[i], indptr[i + 1]):
                value, column = data[s], indices[s]
                for j in range(width):
                    row_sum[j] += value * p[column, j]
            for j in range(width):
                q[i, j] = row_sum[j]
                partial[chunk, j] += np.float64(p[i, j]) * np.float64(row_sum[j])
    return _sum_rows(partial, width)


@numba.njit(parallel=True, cache=True, nogil=True)
def update_residual(r, q, step, rows):
    """``r[rows] -= step q[rows]`` (per column); returns the column dots ``r[rows].r[rows]`` (float64)."""
    width = r.shape[1]
    chunks = (len(rows) + CHUNK_ROWS - 1) // CHUNK_ROWS
    partial = np.zeros((chunks, width))
    for chunk in numba.prange(chunks):
        for t in range(chunk * CHUNK_ROWS, min((chunk + 1) * CHUNK_ROWS, len(rows))):
            i = rows[t]
            for j in range(width):
                value = r[i, j] - step[j] * q[i, j]
                r[i, j] = value
                partial[chunk, j] += np.float64(value) * np.float64(value)
    return _sum_rows(partial, width)


@numba.njit(parallel=True, cache=True, nogil=True)
def update_solution_and_direction(x, p, r, step, beta, rows):
    """``x[rows] += step p[rows]``, then ``p[rows] = r[rows] + beta p[rows]`` (per column)."""
    width = x.shape[1]
    for t in numba.prange(len(rows)):
        i = rows[t]
        for j in range(width):
            direction = p[i, j]
            x[i, j] += step[j] * direction
            p[i, j] = r[i, j] + beta[j] * direction


@numba.njit(cache=True)
def _sum_rows(partial, width):
    total = np.zeros(width)
    for chunk in range(partial.shape[0]):  # fixed order: same sum for any thread count
        for j in range(width):
            total[j] += partial[chunk, j]
    return total


@numba.njit(cache=True)
def grow_rows(indptr, indices, rows, n):
    """``rows`` and every node one edge away from them, sorted."""
    mask = np.zeros(n, dtype=np.bool_)
    for i in rows:
        mask[i] = True
        for s in range(indptr[i], indptr[i + 1]):
            mask[indices[s]] = True
    return np.flatnonzero(mask)


def fused_block_cg(system: sp.csr_matrix, rhs: np.ndarray, max_iter: int, tol: float,
                   full_fraction: float = 0.5, threads: int = 0):
    """:func:`mom.diffusion.block_cg` with the fused passes (same arguments and result;
    ``threads`` 0 = numba's default)."""
    from mom.diffusion import CGResult  # the result type lives with the reference implementation

    if threads:
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    n = system.shape[0]
    dtype = system.dtype
    system = sp.csr_matrix(system)
    indptr, indices, data = system.indptr, system.indices, system.data
    # zero blocks are allocated lazily by the OS: rows outside the support are never touched
    x, r, p, q = (np.zeros(rhs.shape, dtype=dtype) for _ in range(4))
    rows = np.flatnonzero(np.asarray(rhs).any(axis=1))
    r[rows] = p[rows] = rhs[rows]
    full = False
    rs = (r[rows].astype(np.float64) ** 2).sum(axis=0)
    rhs_norm = np.sqrt(rs)
    rhs_norm[rhs_norm == 0] = 1.0
    done = np.sqrt(rs) <= tol * rhs_norm
    iterations = np.zeros(rhs.shape[1], dtype=np.int64)
    history = []
    for _ in range(max_iter):
        if done.all():
            break
        if not full:
            rows = grow_rows(indptr, indices, rows, n)
            full = len(rows) > full_fraction * n
            if full:
                rows = np.arange(n)
        pq = spmm_dot(indptr, indices, data, p, q, rows)
        step = np.where(done | (pq <= 0), 0.0, rs / np.where(pq > 0, pq, 1.0)).astype(dtype)
        rs_new = np.where(done, rs, update_residual(r, q, step, rows))
        iterations += ~done
        done = done | (np.sqrt(rs_new) <= tol * rhs_norm)
        beta = np.where(rs > 0, rs_new / np.where(rs > 0, rs, 1.0), 0.0).astype(dtype)
        update_solution_and_direction(x, p, r, step, beta, rows)
        rs = rs_new
        history.append(float(np.mean(np.sqrt(rs) / rhs_norm)))
    return CGResult(x, np.sqrt(rs) / rhs_norm, iterations, history, None if full else rows)
