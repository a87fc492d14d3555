"""Fashion-MNIST from its released IDX files (the Debian package
``dataset-fashion-mnist`` installs them in ``/usr/share/datasets/fashion-mnist``).

Both the ``train`` (60,000) and ``t10k`` (10,000) files are pooled: 70,000
28x28 grayscale images, 7,000 per class. Four splits:

- ``train``: ``per_class`` images of each of ``train_classes`` from the
  ``train`` file, the unlabeled training collection (labels stored for
  evaluation reports only);
- ``val``: ``val_per_class`` other images of each training class from the
  ``train`` file, for choosing hyperparameters (never mined);
- ``new_images``: ``new_images_per_class`` images of each training class from
  the ``t10k`` file: new images of the collection's own classes, disjoint from
  ``train`` and ``val`` by origin (never used to choose anything);
- ``new_classes``: ``per_class`` images of each of ``test_classes`` (from both
  files), classes the collection does not contain (the zero-shot protocol of
  CUB-200-2011).
"""
from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np

from mom.datasets import PreparedDataset, SplitStream, per_class_sample
from mom.errors import InputError

SOURCE = "fashion-mnist"
CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
FILES = (
    ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
)
IMAGES_PER_CLASS = 7000
TRAIN_FILE_IMAGES_PER_CLASS = 6000
T10K_IMAGES_PER_CLASS = 1000
T10K_FIRST_INDEX = 60000  # the t10k file's images follow the train file's 60,000
_IDX_UBYTE = 0x08


def read_idx(path: str | Path) -> np.ndarray:
    """Read a (gzipped) IDX file of unsigned bytes into an array of its shape.

    Layout: two zero bytes, type code 0x08 (ubyte), the number of dimensions,
    then one big-endian uint32 per dimension, then the data.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"root: {path} not found (install the Debian package dataset-fashion-mnist)")
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError, zlib.error) as error:
        raise InputError(f"root: {path} is not a readable gzip file ({error})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != _IDX_UBYTE or raw[3] == 0:
        raise InputError(f"root: {path} is not an IDX file of unsigned bytes (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise InputError(f"root: {path} is truncated (incomplete IDX header)")
    shape = tuple(int(x) for x in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    size = math.prod(shape)  # Python ints: a crafted header cannot overflow to the data length
    if len(raw) != header + size:
        raise InputError(f"root: {path} holds {len(raw) - header} data bytes, its header says {size} {shape}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def load_fashion_mnist(root: str | Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """All 70,000 images ``uint8 (n, 28, 28)``, labels ``int64 (n,)`` and
    origins (``file.gz#index``), train file first then t10k."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"root: {root} is not a directory (install the Debian package dataset-fashion-mnist)")
    images, labels, origins = [], [], []
    for image_file, label_file in FILES:
        file_images = read_idx(root / image_file)
        file_labels = read_idx(root / label_file)
        if file_images.ndim != 3 or file_labels.ndim != 1 or len(file_images) != len(file_labels):
            raise InputError(
                f"root: {root / image_file} {file_images.shape} and {root / label_file} "
                f"{file_labels.shape} do not describe the same images"
            )
        if file_labels.size and file_labels.max() >= len(CLASS_NAMES):
            raise InputError(f"root: {root / label_file} holds labels >= {len(CLASS_NAMES)}")
        images.append(file_images)
        labels.append(file_labels.astype(np.int64))
        origins.extend(f"{image_file}#{index}" for index in range(len(file_images)))
    return np.concatenate(images), np.concatenate(labels), origins


def _checked_classes(name: str, classes: Sequence[int]) -> list[int]:
    classes = [int(c) for c in classes]
    if not classes:
        raise InputError(f"{name}: must list at least one class id (0-9)")
    unknown = sorted(c for c in set(classes) if not 0 <= c < len(CLASS_NAMES))
    if unknown:
        raise InputError(f"{name}: unknown class ids {unknown}; Fashion-MNIST classes are 0-9")
    if len(set(classes)) != len(classes):
        raise InputError(f"{name}: class ids listed twice: {classes}")
    return sorted(classes)


def validate_params(
    train_classes: Sequence[int],
    test_classes: Sequence[int],
    per_class: int | None,
    val_per_class: int,
    new_images_per_class: int = 0,
    available: int = TRAIN_FILE_IMAGES_PER_CLASS,
) -> tuple[list[int], list[int]]:
    """Check the split parameters (before any file is read); return the sorted class lists."""
    train = _checked_classes("train_classes", train_classes)
    test = _checked_classes("test_classes", test_classes)
    overlap = sorted(set(train) & set(test))
    if overlap:
        raise InputError(f"train_classes and test_classes overlap on {overlap}; the test classes must be held out")
    if per_class is not None and per_class < 0:
        raise InputError(f"per_class: must be >= 0 (0 = all images), got {per_class}")
    if val_per_class < 0:
        raise InputError(f"val_per_class: must be >= 0, got {val_per_class}")
    if val_per_class >= available:
        raise InputError(f"val_per_class: {val_per_class} leaves no training image (the train file holds "
                         f"{available} per class)")
    if per_class and per_class + val_per_class > available:
        raise InputError(
            f"per_class: {per_class} + val_per_class {val_per_class} exceeds the {available} images of a class "
            "in the train file"
        )
    if not 0 <= new_images_per_class <= T10K_IMAGES_PER_CLASS:
        raise InputError(f"new_images_per_class: must be in 0..{T10K_IMAGES_PER_CLASS} (the t10k file's images "
                         f"of a class), got {new_images_per_class}")
    return train, test


def prepare_fashion_mnist(
    root: str | Path,
    train_classes: Sequence[int] = (5, 6, 7, 8, 9),
    test_classes: Sequence[int] = (0, 1, 2, 3, 4),
    per_class: int | None = 1200,
    val_per_class: int = 200,
    seed: int = 0,
    new_images_per_class: int = 600,
) -> PreparedDataset:
    """The splits ``train``, ``val``, ``new_images`` and ``new_classes`` (module
    doc), each in original file order.

    ``per_class`` images per class are drawn for ``train`` and ``new_classes``
    (``0``/``None`` = all); ``val`` takes ``val_per_class`` other images of each
    training class; ``new_images`` takes ``new_images_per_class`` images of each
    training class from the ``t10k`` file. Deterministic in ``seed`` (see
    :func:`per_class_sample`); no split depends on another split's size param.
    """
    train, test = validate_params(train_classes, test_classes, per_class, val_per_class, new_images_per_class)
    images, labels, origins = load_fashion_mnist(root)
    counts = np.bincount(labels, minlength=len(CLASS_NAMES))
    short = [c for c in train + test if counts[c] < IMAGES_PER_CLASS]
    if short:
        raise InputError(f"root: classes {short} have fewer than {IMAGES_PER_CLASS} images; the IDX files are incomplete")
    per_file = np.bincount(labels[T10K_FIRST_INDEX:], minlength=len(CLASS_NAMES))
    uneven = [c for c in train if per_file[c] != T10K_IMAGES_PER_CLASS]
    if uneven:
        raise InputError(f"root: the t10k file holds {per_file[uneven].tolist()} images of classes {uneven}, "
                         f"not {T10K_IMAGES_PER_CLASS} each; the IDX files are not the released ones")
    take = per_class or None
    val_index, train_index = per_class_sample(from_file(labels, "train"), train, [val_per_class, take], seed, salt=0)
    (test_index,) = per_class_sample(labels, test, [take], seed, salt=1)
    (new_images_index,) = per_class_sample(from_file(labels, "t10k"), train, [new_images_per_class], seed, salt=2)
    indices = {"train": train_index, "val": val_index, "new_images": new_images_index, "new_classes": test_index}
    splits = {name: _split_stream(name, index, images, labels, origins) for name, index in indices.items()}
    info = {"classes": {str(c): name for c, name in enumerate(CLASS_NAMES)}, "train_classes": train, "test_classes": test}
    return PreparedDataset(source=SOURCE, splits=splits, info=info)


def from_file(labels: np.ndarray, name: str) -> np.ndarray:
    """``labels`` with the images of the other IDX file marked -1 (no class)."""
    kept = labels.copy()
    if name == "train":
        kept[T10K_FIRST_INDEX:] = -1
    else:
        kept[:T10K_FIRST_INDEX] = -1
    return kept


def _split_stream(name, index, images, labels, origins) -> SplitStream:
    split_labels = labels[index].tolist()
    columns = {
        "source": [SOURCE] * len(index),
        "split": [name] * len(index),
        "origin": [origins[i] for i in index],
        "label": split_labels,
        "class_name": [CLASS_NAMES[label] for label in split_labels],
    }
    return SplitStream(images=lambda: (images[i] for i in index), columns=columns, expected=len(index))
