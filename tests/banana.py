"""Synthetic "banana" fixture: interleaved 2-D half-moons lifted onto a cap of the 32-D sphere.

Each curve is a half circle (alternately opening down and up, shifted along x
so neighbouring curves interleave like scikit-learn's two moons). The 2-D
points are placed on a small cap of the unit sphere (so inner products are
monotone in 2-D distance), randomly rotated into ``dim`` dimensions, jittered
and l2-normalized. The curve index is the label.
"""
from __future__ import annotations

import numpy as np


def banana_points(n_per_curve: int = 300, n_curves: int = 2, noise: float = 0.02, seed: int = 0):
    """2-D points (n, 2) and their curve index (n,)."""
    rng = np.random.default_rng(seed)
    points, labels = [], []
    for curve in range(n_curves):
        t = np.sort(rng.uniform(0, np.pi, n_per_curve))
        centre = 1.2 * curve  # curves 0 and 2 (both opening down) keep a gap of 0.4 between tips
        if curve % 2 == 0:
            xy = np.stack([centre + np.cos(t), np.sin(t)], axis=1)
        else:
            xy = np.stack([centre - np.cos(t), 0.5 - np.sin(t)], axis=1)
        points.append(xy + rng.normal(scale=noise, size=xy.shape))
        labels.append(np.full(n_per_curve, curve))
    return np.concatenate(points), np.concatenate(labels).astype(np.int64)


def banana_features(n_per_curve: int = 300, n_curves: int = 2, dim: int = 32, scale: float = 0.1,
                    noise: float = 0.02, jitter: float = 1e-3, seed: int = 0):
    """l2-normalized float32 features (n, dim), curve labels (n,), and the 2-D points."""
    points, labels = banana_points(n_per_curve, n_curves, noise, seed)
    rng = np.random.default_rng(seed + 1)
    lifted = np.zeros((len(points), dim))
    lifted[:, 0] = 1.0
    lifted[:, 1:3] = scale * (points - points.mean(axis=0))
    rotation, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    features = lifted @ rotation.T + rng.normal(scale=jitter, size=lifted.shape)
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    # shuffle so that item order carries no curve information
    order = rng.permutation(len(points))
    return features[order].astype(np.float32), labels[order], points[order]
