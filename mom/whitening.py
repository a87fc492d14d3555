"""Whitening of descriptors (docs/method.md section 7).

A whitening is a pair ``(mean (d,), projection (d_out, d))`` applied as
``y <- l2normalize(projection @ (y - mean))``. Rows of ``projection`` are
ordered by decreasing variance so keeping the first ``d_out`` rows is the usual
dimensionality reduction.
"""
from __future__ import annotations

import os
import zipfile

import numpy as np

from mom import artifacts
from mom.errors import InputError

# zip entries get a fixed date so the same whitening gives the same bytes
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


def _symmetric_inverse_sqrt(matrix: np.ndarray, eps: float) -> np.ndarray:
    """``(M + eps * mean_eigenvalue * I)^(-1/2)`` of a symmetric PSD matrix.

    The relative ridge keeps a rank-deficient covariance (fewer pairs than
    dimensions, duplicated descriptors) invertible without changing a
    well-conditioned one noticeably.
    """
    eigenvalues, eigenvectors = np.linalg.eigh(matrix)
    eigenvalues = np.maximum(eigenvalues, 0.0) + eps * max(eigenvalues.mean(), np.finfo(float).tiny)
    return (eigenvectors / np.sqrt(eigenvalues)) @ eigenvectors.T


def _descending_eigh(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    eigenvalues, eigenvectors = np.linalg.eigh(matrix)
    order = np.argsort(eigenvalues)[::-1]
    eigenvectors = eigenvectors[:, order]
    # Fix each eigenvector's sign (largest component positive): same bytes every run.
    signs = np.sign(eigenvectors[np.abs(eigenvectors).argmax(axis=0), np.arange(eigenvectors.shape[1])])
    return eigenvalues[order], eigenvectors * np.where(signs == 0, 1.0, signs)


def _check_dim(dim: int | None, d: int) -> int:
    if dim is None:
        return d
    if not 1 <= dim <= d:
        raise ValueError(f"whitening dim must be in 1..{d}, got {dim}")
    return int(dim)


def learn_pca_whitening(X: np.ndarray, dim: int | None = None, eps: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """PCA whitening learned on unlabeled descriptors X (n, d).

    ``C = cov(X)``, ``C = V diag(l) V^T``; projection ``diag(l + eps*mean(l))^(-1/2) V^T``
    keeps the ``dim`` leading components. Returns (mean, projection), float32.
    """
    X = np.asarray(X, dtype=np.float64)
    d = X.shape[1]
    dim = _check_dim(dim, d)
    mean = X.mean(axis=0)
    centred = X - mean
    covariance = centred.T @ centred / len(X)
    eigenvalues, eigenvectors = _descending_eigh(covariance)
    eigenvalues = np.maximum(eigenvalues, 0.0) + eps * max(eigenvalues.mean(), np.finfo(float).tiny)
    projection = (eigenvectors / np.sqrt(eigenvalues)).T
    return mean.astype(np.float32), projection[:dim].astype(np.float32)


def learn_lw_whitening(
    X: np.ndarray, pairs: np.ndarray, dim: int | None = None, eps: float = 1e-6
) -> tuple[np.ndarray, np.ndarray]:
    """Learned whitening Lw (Radenovic et al.) from matching pairs, no labels.

    ``pairs`` (m, 2): row indices of X that match (here: each anchor with its
    manifold neighbours). Steps:
      1. ``C_S = mean over pairs of (x_i - x_j)(x_i - x_j)^T``; ``P1 = C_S^(-1/2)``
         (symmetric inverse square root) whitens the matching-pair differences.
      2. PCA (rotation only) of the P1-projected centred descriptors. For random
         pairs the covariance of non-matching differences is twice the data
         covariance, so this is the PCA of the projected non-matching
         differences without sampling them (as the authors' code does).
    Projection ``V^T P1``: V is orthogonal, so the matching differences stay
    whitened (``P C_S P^T = I``) and the leading rows carry the most
    non-matching variance. The mean is that of the descriptors.
    """
    X = np.asarray(X, dtype=np.float64)
    pairs = np.asarray(pairs, dtype=np.int64)
    d = X.shape[1]
    dim = _check_dim(dim, d)
    if pairs.ndim != 2 or pairs.shape[1] != 2 or len(pairs) == 0:
        raise ValueError("pairs must be a non-empty (m, 2) array of row indices")
    if pairs.min() < 0 or pairs.max() >= len(X):
        raise ValueError(f"pair indices must lie in 0..{len(X) - 1}")
    differences = X[pairs[:, 0]] - X[pairs[:, 1]]
    within_covariance = differences.T @ differences / len(differences)
    pair_whitening = _symmetric_inverse_sqrt(within_covariance, eps)
    mean = X.mean(axis=0)
    projected = (X - mean) @ pair_whitening.T
    _, rotation = _descending_eigh(projected.T @ projected / len(X))
    projection = rotation.T @ pair_whitening
    return mean.astype(np.float32), projection[:dim].astype(np.float32)


def apply_whitening(X: np.ndarray, mean: np.ndarray, projection: np.ndarray) -> np.ndarray:
    """``l2normalize(P (x - mean))`` for every row x of X (docs/method.md section 7)."""
    whitened = (np.asarray(X, dtype=np.float32) - mean) @ np.asarray(projection, dtype=np.float32).T
    norms = np.linalg.norm(whitened, axis=1, keepdims=True)
    return (whitened / np.maximum(norms, 1e-12)).astype(np.float32)


def identity_whitening(d: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``none`` method: zero mean, identity projection (apply = l2-normalize)."""
    return np.zeros(d, dtype=np.float32), np.eye(d, dtype=np.float32)


def save_whitening(path: str | os.PathLike, mean: np.ndarray, projection: np.ndarray, method: str) -> None:
    """Write ``mean``, ``projection`` and ``method`` as an ``.npz`` that
    ``np.load`` reads, atomically and byte-deterministically (``np.savez``
    stamps the zip entries with the current time)."""
    arrays = {
        "mean": np.asarray(mean, dtype=np.float32),
        "projection": np.asarray(projection, dtype=np.float32),
        "method": np.array(method),
    }
    with artifacts.atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as archive:
            for name, array in arrays.items():
                with archive.open(zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_DATE), "w") as handle:
                    np.lib.format.write_array(handle, array, allow_pickle=False)


def load_whitening(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, str]:
    """``(mean, projection, method)`` from :func:`save_whitening`'s file."""
    arrays = artifacts.load_npz(path, ("mean", "projection", "method"))
    mean, projection, method = arrays["mean"], arrays["projection"], arrays["method"]
    if method.ndim != 0 or method.dtype.kind != "U":
        raise InputError(f"{path}: 'method' must be a string, got {method.dtype} {method.shape}")
    for name, array in (("mean", mean), ("projection", projection)):
        if not np.issubdtype(array.dtype, np.floating):
            raise InputError(f"{path}: '{name}' must be floating point, got {array.dtype}")
        if not np.isfinite(array).all():
            raise InputError(f"{path}: '{name}' has NaN or inf values (rerun whiten)")
    if projection.ndim != 2 or projection.shape[0] == 0 or mean.shape != (projection.shape[1],):
        raise InputError(f"{path}: projection {projection.shape} does not fit mean {mean.shape}")
    return mean, projection, str(method)
