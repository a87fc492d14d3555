import numpy as np
import pytest

from mom import whitening
from mom.errors import InputError


def correlated_data(n=2000, d=6, seed=0):
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d, d))
    return rng.normal(size=(n, d)) @ mixing + rng.normal(size=d) * 3


def test_pca_whitening_makes_training_covariance_identity():
    X = correlated_data()
    mean, projection = whitening.learn_pca_whitening(X, eps=1e-9)
    assert projection.shape == (6, 6)
    Z = (X - mean) @ projection.T
    assert np.allclose(Z.mean(axis=0), 0, atol=1e-4)
    assert np.allclose(np.cov(Z.T, bias=True), np.eye(6), atol=1e-3)


def test_pca_whitening_keeps_leading_dims_in_order_of_variance():
    X = correlated_data()
    _, full = whitening.learn_pca_whitening(X)
    mean, reduced = whitening.learn_pca_whitening(X, dim=3)
    assert reduced.shape == (3, 6)
    assert np.allclose(reduced, full[:3])
    # The kept directions are the top principal components of X.
    covariance = np.cov(X.T, bias=True)
    top = np.linalg.eigh(covariance)[1][:, ::-1][:, :3]
    kept_directions = reduced / np.linalg.norm(reduced, axis=1, keepdims=True)
    assert np.allclose(np.abs(kept_directions @ top), np.eye(3), atol=1e-4)


def test_lw_whitens_matching_pair_differences():
    rng = np.random.default_rng(1)
    d, n_groups, per_group = 5, 300, 4
    centres = rng.normal(size=(n_groups, d)) * 4
    within = rng.normal(size=(d, d))  # anisotropic within-group noise
    X = np.repeat(centres, per_group, axis=0) + rng.normal(size=(n_groups * per_group, d)) @ within
    groups = np.arange(len(X)) // per_group
    pairs = np.array([(i, j) for i in range(len(X)) for j in range(len(X))
                      if i != j and groups[i] == groups[j] and j - i in (1, 2)])
    mean, projection = whitening.learn_lw_whitening(X, pairs, eps=1e-9)
    assert projection.shape == (d, d)
    differences = X[pairs[:, 0]] - X[pairs[:, 1]]
    projected = differences @ projection.T
    assert np.allclose(projected.T @ projected / len(pairs), np.eye(d), atol=1e-3)
    # The rotation orders the rows by decreasing variance of the projected data.
    variances = ((X - mean) @ projection.T).var(axis=0)
    assert np.all(np.diff(variances) <= 1e-6)


def test_lw_keeps_requested_dims_and_checks_pairs():
    X = correlated_data(n=300, d=8)
    pairs = np.stack([np.arange(0, 299), np.arange(1, 300)], axis=1)
    _, full = whitening.learn_lw_whitening(X, pairs)
    _, reduced = whitening.learn_lw_whitening(X, pairs, dim=4)
    assert reduced.shape == (4, 8)
    assert np.allclose(reduced, full[:4])
    with pytest.raises(ValueError, match="pair indices"):
        whitening.learn_lw_whitening(X, np.array([[0, 300]]))
    with pytest.raises(ValueError, match="dim"):
        whitening.learn_lw_whitening(X, pairs, dim=9)


def test_rank_deficient_pairs_stay_finite():
    X = correlated_data(n=100, d=6)
    pairs = np.array([[0, 1], [2, 3]])  # two pairs: covariance of rank 2
    mean, projection = whitening.learn_lw_whitening(X, pairs)
    assert np.all(np.isfinite(projection))


def test_apply_whitening_is_l2_normalized_and_identity_is_plain_normalization():
    X = correlated_data(n=50, d=4)
    mean, projection = whitening.learn_pca_whitening(X, dim=2)
    out = whitening.apply_whitening(X, mean, projection)
    assert out.shape == (50, 2) and out.dtype == np.float32
    assert np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)
    expected = ((X - mean) @ projection.T)
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    assert np.allclose(out, expected, atol=1e-5)
    mean0, identity = whitening.identity_whitening(4)
    assert np.allclose(whitening.apply_whitening(X, mean0, identity), X / np.linalg.norm(X, axis=1, keepdims=True), atol=1e-6)


def test_learning_is_deterministic():
    X = correlated_data(n=200, d=5)
    first = whitening.learn_pca_whitening(X)
    second = whitening.learn_pca_whitening(X.copy())
    assert all(np.array_equal(a, b) for a, b in zip(first, second))


def test_whitening_file_roundtrip_is_byte_deterministic(tmp_path):
    X = correlated_data(n=100, d=5)
    mean, projection = whitening.learn_pca_whitening(X, dim=3)
    for name in ("a", "b"):
        whitening.save_whitening(tmp_path / f"{name}.npz", mean, projection, "pca")
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    loaded_mean, loaded_projection, method = whitening.load_whitening(tmp_path / "a.npz")
    assert np.array_equal(loaded_mean, mean) and np.array_equal(loaded_projection, projection) and method == "pca"
    (tmp_path / "bad.npz").write_bytes(b"nope")
    with pytest.raises(InputError, match="not an .npz archive"):
        whitening.load_whitening(tmp_path / "bad.npz")
