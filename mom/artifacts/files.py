"""Atomic, deterministic writing and checked reading of the file formats stages exchange.

Every writer goes through :func:`atomic_path`: the data is written to a
temporary file in the destination folder and renamed over the destination only
when complete, so an interrupted stage never leaves a half-written output.
Writers avoid timestamps and unordered containers so that the same inputs give
the same bytes (DVC's cache and early cut-off rely on it).

Every reader refuses, in one :class:`~mom.errors.InputError` line naming the
file, a missing or empty file, a file of another format, a truncated one and
pickled (object) content, which it never loads. The readers of one artifact
(``mom.artifacts.tables``, ``mom.artifacts.arrays``, ``mom.artifacts.reports``)
add that artifact's contract on top.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import scipy.sparse as sp

from mom.errors import InputError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` on success.

    On any exception the destination is untouched and the temporary file is
    removed. A kill (SIGKILL, power loss) before the rename leaves the
    destination untouched and the temporary file behind, with a ``.tmp-``
    prefix that no reader looks at; the next successful write of the same
    destination removes such leftovers (they would otherwise sit inside a DVC
    directory output and change its hash).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".tmp-{path.name}-"
    fd, tmp = tempfile.mkstemp(prefix=prefix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp_path, 0o644)
        os.replace(tmp_path, path)
        _remove_leftovers(path.parent, prefix)
    finally:
        tmp_path.unlink(missing_ok=True)


def _remove_leftovers(folder: Path, prefix: str) -> None:
    """Delete temporaries of earlier, killed writes of one destination
    (``prefix`` = ``.tmp-<name>-``). DVC runs one writer per output at a time."""
    for leftover in folder.glob(_glob_escape(prefix) + "*"):
        leftover.unlink(missing_ok=True)


def _glob_escape(text: str) -> str:
    return "".join(f"[{char}]" if char in "*?[" else char for char in text)


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, np.ascontiguousarray(array), allow_pickle=False)


@contextlib.contextmanager
def open_npy_for_writing(path: str | os.PathLike, shape: tuple[int, ...], dtype) -> Iterator[np.memmap]:
    """A writable memory map of a new ``.npy`` file, published atomically on exit.

    For outputs too large to hold in memory (features of a million images).
    """
    with atomic_path(path) as tmp:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
        yield array
        array.flush()
        del array


NPY_MAGIC = b"\x93NUMPY"
PARQUET_MAGIC = b"PAR1"
RERUN = "rerun the stage that writes it"


def require_file(path: str | os.PathLike) -> Path:
    """``path`` as a Path, or an InputError when it is missing, not a file or empty."""
    path = Path(path)
    if not path.is_file():
        where = "a folder, not a file" if path.is_dir() else "file not found"
        raise InputError(f"{path}: {where} (run the stage that writes it first)")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: empty file (an interrupted write or transfer; {RERUN})")
    return path


def npy_header(path: str | os.PathLike) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of an ``.npy`` file, read from its header only; an
    InputError for anything else, for object (pickled) content and for a file
    shorter or longer than its header says."""
    path = require_file(path)
    with open(path, "rb") as handle:
        if handle.read(len(NPY_MAGIC)) != NPY_MAGIC:
            raise InputError(f"{path}: not a .npy file (no NumPy header)")
        handle.seek(0)
        try:
            version = np.lib.format.read_magic(handle)
            read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in read:
                raise ValueError(f"unsupported .npy version {version}")
            shape, _, dtype = read[version](handle)
        except (ValueError, TypeError, SyntaxError, EOFError, OSError) as error:
            raise InputError(f"{path}: not a readable .npy header ({_first_line(error)})") from None
        offset = handle.tell()
    if dtype.hasobject:
        raise InputError(f"{path}: holds Python objects (pickled data), refused without loading: "
                         "expected a numeric array")
    expected = offset + math.prod(shape) * dtype.itemsize
    size = path.stat().st_size
    if size != expected:
        state = "truncated" if size < expected else "longer than its header says"
        raise InputError(f"{path}: {state}: {size} bytes, its header {shape} {dtype} needs {expected} ({RERUN})")
    return tuple(shape), dtype


def load_npy(path: str | os.PathLike, mmap: bool = False) -> np.ndarray:
    """The array of an ``.npy`` file (memory-mapped read-only with ``mmap``),
    after :func:`npy_header`'s checks."""
    npy_header(path)
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise InputError(f"{path}: not a readable .npy file ({_first_line(error)})") from None


def _first_line(error: BaseException, limit: int = 160) -> str:
    line = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
    return line if len(line) <= limit else line[:limit] + "..."


def save_parquet(path: str | os.PathLike, table: pa.Table) -> None:
    """Write a Parquet table (no pandas metadata, fixed compression)."""
    table = table.replace_schema_metadata(None)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", write_statistics=False)


def load_parquet(path: str | os.PathLike, columns: list[str] | None = None) -> pa.Table:
    """A Parquet file's table (``columns``: only those); another format, a
    truncated file or unreadable content is one InputError line."""
    path = require_file(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(len(PARQUET_MAGIC))
        handle.seek(max(size - len(PARQUET_MAGIC), 0))
        tail = handle.read()
    if head != PARQUET_MAGIC:
        raise InputError(f"{path}: not a Parquet file")
    if tail != PARQUET_MAGIC or size < 3 * len(PARQUET_MAGIC):
        raise InputError(f"{path}: truncated Parquet file (no footer; {RERUN})")
    try:
        if columns is not None:
            present = pq.read_schema(path).names
            missing = [name for name in columns if name not in present]
            if missing:
                raise InputError(f"{path}: missing columns {missing} (it has {present})")
        return pq.read_table(path, columns=columns)
    except (pa.ArrowException, OSError, ValueError) as error:
        if isinstance(error, InputError):
            raise
        raise InputError(f"{path}: not a readable Parquet file ({_first_line(error)})") from None


def save_csr(path: str | os.PathLike, matrix: sp.spmatrix) -> None:
    """Write a CSR matrix in scipy's ``.npz`` layout, byte-deterministically
    (``scipy.sparse.save_npz`` stamps the zip entries with the current time)."""
    matrix = sp.csr_matrix(matrix)
    matrix.sort_indices()
    arrays = {
        "indices": matrix.indices,
        "indptr": matrix.indptr,
        "format": np.array(b"csr"),
        "shape": np.array(matrix.shape),
        "data": matrix.data,
    }
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as archive:
            for name, array in arrays.items():
                info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                with archive.open(info, "w") as handle:
                    np.lib.format.write_array(handle, np.asarray(array), allow_pickle=False)


def load_npz(path: str | os.PathLike, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The arrays ``names`` of an ``.npz`` archive; an InputError for another
    format, a truncated or damaged archive, a missing array and object (pickled)
    content, which is never loaded."""
    path = require_file(path)
    if not zipfile.is_zipfile(path):
        raise InputError(f"{path}: not an .npz archive (or a truncated one; {RERUN})")
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [name for name in names if name not in archive.files]
            if missing:
                raise InputError(f"{path}: missing arrays {missing} (it has {sorted(archive.files)})")
            return {name: archive[name] for name in names}
    except InputError:
        raise
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as error:
        reason = _first_line(error)
        if "allow_pickle" in reason or "Object arrays" in reason:
            reason = "holds Python objects (pickled data), refused without loading"
        raise InputError(f"{path}: not a readable .npz archive ({reason})") from None


def load_csr(path: str | os.PathLike) -> sp.csr_matrix:
    """A CSR matrix written by :func:`save_csr` (structure checked, values not:
    :func:`mom.artifacts.arrays.read_adjacency` adds the graph's contract)."""
    arrays = load_npz(path, ("format", "shape", "indptr", "indices", "data"))
    try:
        kind = arrays["format"].item()
    except ValueError:
        kind = None
    kind = kind.decode() if isinstance(kind, bytes) else kind
    if kind != "csr":
        raise InputError(f"{path}: a sparse matrix in {kind!r} format, expected 'csr'")
    shape, indptr, indices, data = (arrays[name] for name in ("shape", "indptr", "indices", "data"))
    if shape.shape != (2,) or not np.issubdtype(shape.dtype, np.integer) or shape.min() < 0:
        raise InputError(f"{path}: shape {shape.tolist()} is not a matrix shape")
    rows, columns = (int(value) for value in shape)
    for name, array in (("indptr", indptr), ("indices", indices)):
        if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
            raise InputError(f"{path}: {name} must be a 1-D integer array, got {array.dtype} {array.shape}")
    if data.ndim != 1 or len(data) != len(indices):
        raise InputError(f"{path}: data {data.shape} and indices {indices.shape} differ in length")
    if len(indptr) != rows + 1 or indptr[0] != 0 or indptr[-1] != len(indices) or (np.diff(indptr) < 0).any():
        raise InputError(f"{path}: indptr does not describe {rows} rows of {len(indices)} stored values")
    if len(indices) and (indices.min() < 0 or indices.max() >= columns):
        raise InputError(f"{path}: column indices outside 0..{columns - 1}")
    return sp.csr_matrix((data, indices, indptr), shape=(rows, columns))


def save_json(path: str | os.PathLike, data: dict) -> None:
    text = json.dumps(to_jsonable(data), indent=2, sort_keys=False) + "\n"
    save_text(path, text)


def load_json(path: str | os.PathLike) -> dict:
    """A JSON object from a file; anything else is one InputError line."""
    path = require_file(path)
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a JSON file (not UTF-8 text)") from None
    except json.JSONDecodeError as error:
        raise InputError(f"{path}: not valid JSON (line {error.lineno}: {error.msg}; {RERUN})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object, got a {type(data).__name__}")
    return data


def save_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_figure(path: str | os.PathLike, figure) -> None:
    """Save a matplotlib figure as PNG without timestamps in its metadata."""
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})


def to_jsonable(value):
    """Convert numpy scalars/arrays (recursively) into plain JSON types."""
    if isinstance(value, dict):
        return {str(key): to_jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(item) for item in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value
