import numpy as np
import pyarrow as pa
import pytest
import scipy.sparse as sp

from mom import artifacts
from mom.errors import InputError


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.npy"
    with pytest.raises(RuntimeError):
        with artifacts.atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_writers_are_deterministic(tmp_path):
    table = pa.table({"item": pa.array([0, 1], pa.int64()), "x": pa.array([0.5, 1.5], pa.float32())})
    matrix = sp.random(20, 20, density=0.2, random_state=0, format="csr")
    for run in ("a", "b"):
        artifacts.save_parquet(tmp_path / f"{run}.parquet", table)
        artifacts.save_csr(tmp_path / f"{run}.npz", matrix)
        artifacts.save_npy(tmp_path / f"{run}.npy", np.arange(6, dtype=np.float32))
        artifacts.save_json(tmp_path / f"{run}.json", {"x": np.float32(1.5), "n": np.int64(3)})
    for suffix in ("parquet", "npz", "npy", "json"):
        assert (tmp_path / f"a.{suffix}").read_bytes() == (tmp_path / f"b.{suffix}").read_bytes()
    assert (artifacts.load_csr(tmp_path / "a.npz") != matrix).nnz == 0


def test_open_npy_for_writing_roundtrip(tmp_path):
    with artifacts.open_npy_for_writing(tmp_path / "f.npy", (3, 2), np.float32) as out:
        out[:] = 7
    assert artifacts.load_npy(tmp_path / "f.npy").sum() == 42


def test_missing_input_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="file not found"):
        artifacts.load_npy(tmp_path / "nope.npy")
