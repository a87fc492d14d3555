"""Synthetic CNN-like features for the scale benchmarks: items on noisy smooth manifolds.

Two modes (:data:`MODES`):

- ``giant``: one 4-D manifold in a 32-D subspace with noise 0.1; its reciprocal
  30-NN graph is one component holding all but a handful of the items, as a
  large photo collection's CNN features give (every diffusion reaches the whole
  graph).
- ``clusters``: separate 2-D manifolds of ``manifold_items`` items each in a
  16-D subspace, noise 0.05: the graph falls apart into roughly one component
  per manifold (diffusion stays within one tenth of the graph at 1M).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mom import artifacts

MODES = {
    "giant": {"manifold_items": 0, "intrinsic": 4, "subspace": 32, "noise": 0.1},
    "clusters": {"manifold_items": 100_000, "intrinsic": 2, "subspace": 16, "noise": 0.05},
}
LABEL_BINS = 4  # giant mode: a label is the bin of the first manifold coordinate (purity is still defined)


def synthetic_collection(path: Path, n: int, dim: int, manifolds: int, intrinsic: int, subspace: int,
                         noise: float, seed: int, chunk: int = 32768) -> tuple[np.memmap, np.ndarray]:
    """Deterministic l2-normalized items on noisy smooth manifolds, written to an ``.npy`` file.

    Each manifold is a random ``intrinsic``-dimensional torus: a random centre
    plus, per intrinsic coordinate u_j, three random harmonics
    ``a cos(m u_j) + b sin(m u_j)`` (m = 1, 2, 3), all inside one random
    ``subspace``-dimensional subspace around a common direction (CNN features
    live in a narrow cone). Items: a random manifold, uniform coordinates,
    isotropic noise of norm ``noise`` in all ``dim`` dimensions, l2-normalized,
    in random order (so graph neighbours are scattered in memory).
    Returns the memory-mapped features and int64 labels: the manifold, or with
    one manifold the bin of the first coordinate (:data:`LABEL_BINS` bins).
    """
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((dim, subspace + 1)))
    common, basis = basis[:, 0].astype(np.float32), basis[:, 1:].T.astype(np.float32)
    centres = rng.standard_normal((manifolds, subspace)).astype(np.float32) * (0.5 / np.sqrt(subspace))
    harmonics = rng.standard_normal((intrinsic, 6, manifolds, subspace)).astype(np.float32) * (
        0.25 / np.sqrt(subspace))
    labels = np.empty(n, dtype=np.int64)
    with artifacts.open_npy_for_writing(path, (n, dim), np.float32) as out:
        for start in range(0, n, chunk):
            size = min(chunk, n - start)
            local = np.random.default_rng([seed, start])
            manifold = local.integers(0, manifolds, size)
            low = centres[manifold].copy()
            for axis in range(intrinsic):
                u = local.uniform(0, 2 * np.pi, size).astype(np.float32)
                if axis == 0:
                    first = u
                for m in range(3):
                    low += np.cos((m + 1) * u)[:, None] * harmonics[axis, 2 * m][manifold]
                    low += np.sin((m + 1) * u)[:, None] * harmonics[axis, 2 * m + 1][manifold]
            block = common + low @ basis
            block += local.standard_normal((size, dim), dtype=np.float32) * (noise / np.sqrt(dim))
            block /= np.linalg.norm(block, axis=1, keepdims=True)
            out[start:start + size] = block
            labels[start:start + size] = manifold if manifolds > 1 else (first * (LABEL_BINS / (2 * np.pi))).astype(
                np.int64).clip(0, LABEL_BINS - 1)
    return artifacts.load_npy(path, mmap=True), labels


def mode_collection(path: Path, n: int, mode: str, dim: int = 512, seed: int = 0) -> tuple[np.memmap, np.ndarray]:
    """:func:`synthetic_collection` with the settings of ``mode`` (:data:`MODES`)."""
    settings = MODES[mode]
    manifolds = 1 if not settings["manifold_items"] else max(1, n // settings["manifold_items"])
    return synthetic_collection(path, n, dim, manifolds, settings["intrinsic"], settings["subspace"],
                                settings["noise"], seed)
