"""The arrays stages pass each other: features (``.npy``) and the graph (``.npz``).

- Features (``extract``: ``<split>.npy``): ``(n, d)`` floating point (float32 as
  written), row i = item i of the split's manifest, l2-normalized, finite.
- The graph (``graph``: ``adjacency.npz``, :func:`mom.artifacts.files.save_csr`):
  square CSR, exactly symmetric, zero diagonal, finite positive weights.

Readers raise one :class:`~mom.errors.InputError` line naming the file.
"""
from __future__ import annotations

import os

import numpy as np
import scipy.sparse as sp

from mom.artifacts.files import load_csr, load_npy, save_csr, save_npy
from mom.errors import InputError

write_features = save_npy
write_adjacency = save_csr


def read_features(path: str | os.PathLike, n_items: int | None = None, mmap: bool = False,
                  check_finite: bool = False, owner: str = "") -> np.ndarray:
    """A 2-D floating point feature matrix; ``n_items``: the row count the
    other inputs give (``owner`` names them); ``check_finite``: refuse NaN/inf
    (one pass over the file, in blocks)."""
    features = load_npy(path, mmap=mmap)
    if features.ndim != 2 or 0 in features.shape:
        raise InputError(f"{path}: expected a non-empty 2-D array (items x dims), got shape {features.shape}")
    if not np.issubdtype(features.dtype, np.floating):
        raise InputError(f"{path}: expected floating point features (float32), got {features.dtype}")
    if n_items is not None and features.shape[0] != n_items:
        raise InputError(f"{path}: {features.shape[0]} rows, {owner or 'the other inputs'} has {n_items} items "
                         "(rerun extract)")
    if check_finite:
        check_finite_rows(path, features)
    return features


def check_finite_rows(path, features: np.ndarray, block: int = 65536) -> None:
    """Refuse NaN or inf values, naming up to ten rows that hold them."""
    bad_rows: list[int] = []
    for start in range(0, features.shape[0], block):
        chunk = np.asarray(features[start:start + block])
        bad_rows.extend((np.flatnonzero(~np.isfinite(chunk).all(axis=1)) + start).tolist())
    if bad_rows:
        shown = ", ".join(str(row) for row in bad_rows[:10])
        more = f" and {len(bad_rows) - 10} more" if len(bad_rows) > 10 else ""
        raise InputError(f"{path}: NaN or inf values in rows {shown}{more}; fix or drop these items")


def read_adjacency(path: str | os.PathLike, n_items: int | None = None) -> sp.csr_matrix:
    """The graph's adjacency: square, symmetric, zero diagonal, finite weights
    > 0; ``n_items`` nodes when given."""
    adjacency = load_csr(path)
    n = adjacency.shape[0]
    if adjacency.shape[1] != n or n == 0:
        raise InputError(f"{path}: adjacency of shape {adjacency.shape}, expected a non-empty square matrix")
    if n_items is not None and n != n_items:
        raise InputError(f"{path}: a graph of {n} nodes, the features have {n_items} items (rerun graph)")
    if not np.issubdtype(adjacency.dtype, np.floating):
        raise InputError(f"{path}: weights of type {adjacency.dtype}, expected floating point")
    if not np.isfinite(adjacency.data).all() or (adjacency.data <= 0).any():
        raise InputError(f"{path}: weights must be finite and positive (rerun graph)")
    if adjacency.diagonal().any():
        raise InputError(f"{path}: the graph has self-loops (non-zero diagonal; rerun graph)")
    if (adjacency != adjacency.T).nnz:
        raise InputError(f"{path}: the adjacency is not symmetric (rerun graph)")
    return adjacency
