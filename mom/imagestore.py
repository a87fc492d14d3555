"""The packed pixel store that ``prepare`` writes and every later stage reads.

A split folder holds two files (DEVELOPERS.md, "Manifest columns"):

- ``pixels.npy``: one flat ``uint8`` array; item ``i`` is
  ``pixels[offset:offset + h * w * c].reshape(h, w, c)`` with ``c`` in {1, 3}
  (1 = grayscale, 3 = RGB).
- ``manifest.parquet``: one row per item, columns :data:`MANIFEST_SCHEMA`.

Images of different sizes share one file, so reading item ``i`` is one slice of
a memory map (fast random access for data loaders, no per-image decode).
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa

from mom import artifacts
from mom.artifacts.tables import column_kind
from mom.errors import InputError

MANIFEST_NAME = "manifest.parquet"
PIXELS_NAME = "pixels.npy"

MANIFEST_SCHEMA = pa.schema(
    [
        ("item", pa.int64()),
        ("source", pa.string()),
        ("split", pa.string()),
        ("origin", pa.string()),
        ("label", pa.int32()),
        ("class_name", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("channels", pa.int32()),
        ("offset", pa.int64()),
    ]
)

# Columns the caller supplies to write_image_store; the others are computed.
METADATA_COLUMNS = ("source", "split", "origin", "label", "class_name")
REQUIRED_METADATA = ("source", "split", "origin")
ALLOWED_CHANNELS = (1, 3)

# Bytes copied per chunk when the streamed pixels are not written in place.
_COPY_CHUNK = 1 << 24


class ImageStore:
    """Read access to one split folder: ``len(store)``, ``store[i]`` (uint8
    ``(h, w, c)``), the manifest, labels and class names."""

    def __init__(self, folder: Path, manifest: pa.Table, pixels: np.ndarray):
        self.folder = folder
        self.manifest = manifest
        self._pixels = pixels
        self._offsets = manifest.column("offset").to_numpy()
        self._shapes = np.stack(
            [manifest.column(name).to_numpy() for name in ("height", "width", "channels")], axis=1
        ).astype(np.int64) if len(manifest) else np.zeros((0, 3), np.int64)

    @classmethod
    def open(cls, folder: str | os.PathLike) -> "ImageStore":
        """Memory-map ``pixels.npy``, read the manifest and check they agree."""
        folder = Path(folder)
        manifest_path, pixels_path = folder / MANIFEST_NAME, folder / PIXELS_NAME
        for path in (manifest_path, pixels_path):
            if not path.is_file():
                raise InputError(f"{path}: file not found (run the prepare stage first)")
        manifest = artifacts.load_parquet(manifest_path)
        pixels = artifacts.load_npy(pixels_path, mmap=True)
        manifest = _checked_manifest(manifest, pixels, folder)
        return cls(folder, manifest, pixels)

    def __len__(self) -> int:
        return len(self._offsets)

    def __getstate__(self):
        # Pickled (e.g. into DataLoader workers started with spawn/forkserver)
        # as its folder: the memory map is reopened instead of copied.
        return {"folder": self.folder}

    def __setstate__(self, state):
        opened = ImageStore.open(state["folder"])
        self.__dict__.update(opened.__dict__)

    def __getitem__(self, index: int) -> np.ndarray:
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"item {index} out of range for a store of {len(self)} items")
        height, width, channels = self._shapes[index]
        start = self._offsets[index]
        return np.asarray(self._pixels[start:start + height * width * channels]).reshape(height, width, channels)

    def __iter__(self):
        for index in range(len(self)):
            yield self[index]

    @property
    def shapes(self) -> np.ndarray:
        """``int64 (n, 3)``: height, width, channels of every item."""
        return self._shapes

    @property
    def labels(self) -> np.ndarray:
        """``int64 (n,)`` labels, ``-1`` where unknown. For evaluation only."""
        return _labels_of(self.manifest)

    @property
    def class_names(self) -> dict[int, str]:
        """``{label: class name}`` for the labels present in this split, sorted by label."""
        labels = _labels_of(self.manifest)
        names = self.manifest.column("class_name").to_pylist()
        mapping: dict[int, str] = {}
        for label, name in zip(labels.tolist(), names):
            if label >= 0 and name is not None:
                mapping.setdefault(label, name)
        return dict(sorted(mapping.items()))

    @property
    def origins(self) -> list[str]:
        return self.manifest.column("origin").to_pylist()


def _labels_of(manifest: pa.Table) -> np.ndarray:
    column = manifest.column("label").fill_null(-1)
    return np.asarray(column.to_numpy(), dtype=np.int64)


def split_written(folder: str | os.PathLike) -> bool:
    """Whether ``prepare`` wrote this split: its folder exists (``prepare`` removes
    the folders of splits it did not write). A split folder without its files is
    damaged, and :meth:`ImageStore.open` says so."""
    return Path(folder).is_dir()


def _checked_manifest(manifest: pa.Table, pixels: np.ndarray, folder: Path) -> pa.Table:
    """The manifest cast to :data:`MANIFEST_SCHEMA`, or an InputError saying what
    is inconsistent with ``pixels``."""
    where = folder / MANIFEST_NAME
    missing = [name for name in MANIFEST_SCHEMA.names if name not in manifest.column_names]
    if missing:
        raise InputError(f"{where}: missing columns {missing} (expected {MANIFEST_SCHEMA.names})")
    wrong = [f"{field.name} holds {manifest.schema.field(field.name).type}, expected {field.type}"
             for field in MANIFEST_SCHEMA
             if column_kind(manifest.schema.field(field.name).type) != column_kind(field.type)
             and not pa.types.is_null(manifest.schema.field(field.name).type)]
    if wrong:
        raise InputError(f"{where}: column {wrong[0]}")
    try:
        manifest = manifest.select(MANIFEST_SCHEMA.names).cast(MANIFEST_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
        raise InputError(f"{where}: columns of the wrong type ({error})") from None
    if pixels.dtype != np.uint8 or pixels.ndim != 1:
        raise InputError(f"{folder / PIXELS_NAME}: expected a flat uint8 array, got {pixels.dtype} {pixels.shape}")
    n = len(manifest)
    items = manifest.column("item").to_numpy()
    if not np.array_equal(items, np.arange(n)):
        raise InputError(f"{where}: column item must be 0..{n - 1} in order")
    for name in ("height", "width", "channels", "offset"):
        if manifest.column(name).null_count:
            raise InputError(f"{where}: column {name} has null values")
    heights, widths, channels, offsets = (
        manifest.column(name).to_numpy().astype(np.int64) for name in ("height", "width", "channels", "offset")
    )
    if n and (heights.min() < 1 or widths.min() < 1):
        raise InputError(f"{where}: height and width must be at least 1")
    if n and not np.isin(channels, ALLOWED_CHANNELS).all():
        raise InputError(f"{where}: channels must be 1 or 3")
    sizes = heights * widths * channels
    expected = np.concatenate([[0], np.cumsum(sizes)])
    if not np.array_equal(offsets, expected[:-1]) or expected[-1] != pixels.size:
        raise InputError(
            f"{where}: offsets/sizes do not match {PIXELS_NAME} ({expected[-1]} bytes described, "
            f"{pixels.size} stored); the folder is damaged or half-written, rerun prepare"
        )
    return manifest


def as_hwc(image: np.ndarray) -> np.ndarray:
    """``image`` as a C-contiguous uint8 ``(h, w, c)`` array, c in {1, 3}."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise InputError(f"image store: images must be uint8, got {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in ALLOWED_CHANNELS or min(image.shape[:2]) < 1:
        raise InputError(f"image store: images must be (h, w) or (h, w, 1|3), got shape {image.shape}")
    return np.ascontiguousarray(image)


def write_image_store(
    folder: str | os.PathLike,
    images: Iterable[np.ndarray],
    columns: Mapping[str, Sequence],
) -> int:
    """Write ``images`` (uint8 ``(h, w)`` or ``(h, w, c)``) and their metadata
    as a split folder; return the number of items.

    ``columns`` maps each of ``source``, ``split``, ``origin`` (required) and
    ``label``, ``class_name`` (optional: null when absent or ``None``) to one
    value per image. Images are streamed to disk one at a time, so an iterator
    that decodes files lazily never holds the collection in memory. Both files
    are written atomically, the manifest last: a reader that finds them
    inconsistent (an interrupted rewrite) gets a clear error.
    """
    folder = Path(folder)
    unknown = sorted(set(columns) - set(METADATA_COLUMNS))
    if unknown:
        raise InputError(f"image store: unknown columns {unknown} (allowed: {list(METADATA_COLUMNS)})")
    missing = [name for name in REQUIRED_METADATA if name not in columns]
    if missing:
        raise InputError(f"image store: missing columns {missing}")
    folder.mkdir(parents=True, exist_ok=True)
    shapes = _write_pixels(folder / PIXELS_NAME, images)
    artifacts.save_parquet(folder / MANIFEST_NAME, _manifest_table(shapes, columns))
    return len(shapes)


def _npy_header(count: int) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False, "shape": (count,)}
    )
    return buffer.getvalue()


def _write_pixels(path: Path, images: Iterable[np.ndarray]) -> list[tuple[int, int, int]]:
    """Stream images into a flat-uint8 ``.npy``; return their shapes.

    The header's length does not depend on the count (it is padded to 64-byte
    alignment), so a placeholder is written first and overwritten at the end.
    """
    placeholder = _npy_header(0)
    shapes: list[tuple[int, int, int]] = []
    total = 0
    with artifacts.atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(placeholder)
            for image in images:
                image = as_hwc(image)
                handle.write(image.tobytes())
                shapes.append(image.shape)
                total += image.size
            header = _npy_header(total)
            if len(header) != len(placeholder):  # never for realistic sizes; stay correct anyway
                handle.flush()
                _rewrite_with_header(tmp, len(placeholder), header)
            else:
                handle.seek(0)
                handle.write(header)
    return shapes


def _rewrite_with_header(path: Path, old_header_length: int, header: bytes) -> None:
    moved = path.with_name(path.name + ".body")
    os.replace(path, moved)
    try:
        with open(moved, "rb") as source, open(path, "wb") as target:
            target.write(header)
            source.seek(old_header_length)
            while chunk := source.read(_COPY_CHUNK):
                target.write(chunk)
    finally:
        moved.unlink(missing_ok=True)


def _manifest_table(shapes: list[tuple[int, int, int]], columns: Mapping[str, Sequence]) -> pa.Table:
    n = len(shapes)
    for name, values in columns.items():
        if len(values) != n:
            raise InputError(f"image store: column {name} has {len(values)} values for {n} images")
    dims = np.asarray(shapes, dtype=np.int64).reshape(n, 3)
    sizes = dims.prod(axis=1)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64) if n else np.zeros(0, np.int64)
    data = {
        "item": np.arange(n, dtype=np.int64),
        "source": list(columns["source"]),
        "split": list(columns["split"]),
        "origin": list(columns["origin"]),
        "label": _optional(columns, "label", n),
        "class_name": _optional(columns, "class_name", n),
        "height": dims[:, 0].astype(np.int32),
        "width": dims[:, 1].astype(np.int32),
        "channels": dims[:, 2].astype(np.int32),
        "offset": offsets,
    }
    arrays = [pa.array(data[field.name], type=field.type) for field in MANIFEST_SCHEMA]
    return pa.Table.from_arrays(arrays, schema=MANIFEST_SCHEMA)


def _optional(columns: Mapping[str, Sequence], name: str, n: int) -> list:
    values = columns.get(name)
    if values is None:
        return [None] * n
    return [None if value is None or (name == "label" and int(value) < 0) else value for value in values]
