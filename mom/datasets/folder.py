"""A user's own directory of images (``source: folder``).

Rules (the README repeats them):

- Files: every regular file under ``root``, recursively, whose extension is
  one of :data:`IMAGE_EXTENSIONS` (case-insensitive); folders whose name starts
  with a dot are not entered. Order: sorted relative POSIX paths, so the
  manifest does not depend on the file system's listing order.
- Splits: ``root`` is the ``train`` split; ``test_root`` (optional) is the
  ``test`` split; ``val`` is empty. The two folders must not contain each other.
- Labels: unlabeled by default. With ``labels_from_folders`` the first
  sub-folder under the root is the class name; class ids are the sorted union
  of the names found under both roots (same name = same id); files directly in
  a root stay unlabeled.
- Pixels: every image becomes RGB ``uint8`` (3 channels, grayscale replicated):
  EXIF orientation applied; 1-bit -> black/white; palette -> its colours;
  16-bit (``I;16*``) and 32-bit integer (``I``) images are read as 16-bit and
  scaled by 255/65535; float (``F``) images are clipped to [0, 255]; CMYK and
  other modes through Pillow's conversion; transparency is composited over
  white. Multi-frame files give their first frame. Images whose longer side
  exceeds ``max_side`` are downscaled (Lanczos) so the longer side is
  ``max_side``, aspect kept (``0`` = keep the size).
- Skipped and reported (``path``, ``reason``): zero-byte files, files Pillow
  cannot identify, corrupt or truncated images, images over Pillow's
  decompression-bomb limit, unsupported modes, and files with other extensions.
"""
from __future__ import annotations

import multiprocessing
import os
from pathlib import Path, PurePosixPath
from typing import Iterator

import numpy as np
from PIL import Image, ImageOps

from mom.datasets import PreparedDataset, SplitStream
from mom.errors import InputError

SOURCE = "folder"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class RejectedImage(Exception):
    """A file that is not a usable image; the message is the report's reason."""


def list_files(root: Path) -> tuple[list[str], list[str]]:
    """Relative POSIX paths under ``root``: (image candidates, other files), sorted."""
    images, others = [], []
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = [name for name in subdirectories if not name.startswith(".")]
        for name in files:
            path = Path(directory, name)
            if not path.is_file():
                continue
            relative = path.relative_to(root).as_posix()
            (images if path.suffix.lower() in IMAGE_EXTENSIONS else others).append(relative)
    return sorted(images), sorted(others)


def to_rgb(image: Image.Image) -> np.ndarray:
    """``uint8 (h, w, 3)`` pixels of a loaded Pillow image (rules in the module doc)."""
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES:
        values = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        gray = ((values * 255 + 32767) // 65535).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "F":
        gray = np.clip(np.rint(np.nan_to_num(np.asarray(image, dtype=np.float32))), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in _ALPHA_MODES:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.uint16)
        alpha = rgba[:, :, 3:4]
        over_white = (rgba[:, :, :3] * alpha + 255 * (255 - alpha) + 127) // 255
        return over_white.astype(np.uint8)
    try:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (ValueError, OSError) as error:
        raise RejectedImage(f"unsupported image mode {mode} ({error})") from None


def downscale(pixels: np.ndarray, max_side: int) -> np.ndarray:
    """Resize so that the longer side is ``max_side`` (aspect kept) when larger."""
    height, width = pixels.shape[:2]
    longer = max(height, width)
    if not max_side or longer <= max_side:
        return pixels
    scale = max_side / longer
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    resized = Image.fromarray(pixels).resize(size, Image.Resampling.LANCZOS)
    return np.asarray(resized, dtype=np.uint8)


def decode_image(path: Path, max_side: int) -> np.ndarray:
    """Decode one file to RGB ``uint8 (h, w, 3)``; raise :class:`RejectedImage`."""
    try:
        if path.stat().st_size == 0:
            raise RejectedImage("empty file (0 bytes)")
        with Image.open(path) as image:
            if max_side and image.format == "JPEG":
                image.draft("RGB", (max_side, max_side))  # decode at a reduced DCT scale: faster, same result size
            image.load()
            image = ImageOps.exif_transpose(image)
            pixels = to_rgb(image)
    except RejectedImage:
        raise
    except Image.UnidentifiedImageError:
        raise RejectedImage("not an image (Pillow cannot identify the format)") from None
    except Image.DecompressionBombError as error:
        raise RejectedImage(f"decompression bomb refused ({error})") from None
    except MemoryError:
        raise
    except Exception as error:  # noqa: BLE001 - any decoder failure on an untrusted file is reported, not fatal
        raise RejectedImage(f"corrupt or unreadable ({type(error).__name__}: {error})") from None
    if min(pixels.shape[:2]) < 1:
        raise RejectedImage("image has no pixels")
    return downscale(pixels, max_side)


def _decode_or_reason(task: tuple[str, int]) -> tuple[np.ndarray | None, str | None]:
    path, max_side = task
    try:
        return decode_image(Path(path), max_side), None
    except RejectedImage as rejection:
        return None, str(rejection)


def _decoded(paths: list[Path], max_side: int, workers: int) -> Iterator[tuple[np.ndarray | None, str | None]]:
    """Decode in order; with ``workers > 1`` in a process pool (order kept)."""
    tasks = [(str(path), max_side) for path in paths]
    if workers <= 1 or len(tasks) < 2:
        yield from map(_decode_or_reason, tasks)
        return
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        yield from pool.imap(_decode_or_reason, tasks, chunksize=8)


def _first_folder(relative: str) -> str | None:
    parts = PurePosixPath(relative).parts
    return parts[0] if len(parts) > 1 else None


def _checked_roots(root: str | Path, test_root: str | Path | None) -> tuple[Path, Path | None]:
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"root: {root} is not a directory")
    if not test_root:
        return root, None
    test_root = Path(test_root)
    if not test_root.is_dir():
        raise InputError(f"test_root: {test_root} is not a directory")
    a, b = root.resolve(), test_root.resolve()
    if a == b or a in b.parents or b in a.parents:
        raise InputError(f"test_root: {test_root} and root {root} must not contain each other")
    return root, test_root


def prepare_folder(
    root: str | Path,
    test_root: str | Path | None = None,
    labels_from_folders: bool = False,
    max_side: int = 512,
    workers: int = 1,
) -> PreparedDataset:
    """The ``train`` split from ``root``, ``test`` from ``test_root`` (or empty),
    an empty ``val``. Rejected files are appended to the result's ``rejected``
    while the splits are streamed."""
    if max_side is not None and max_side < 0:
        raise InputError(f"max_side: must be >= 0 (0 = keep the size), got {max_side}")
    root, test_root = _checked_roots(root, test_root)
    listings = {"train": list_files(root), "test": list_files(test_root) if test_root else ([], [])}
    if not listings["train"][0]:
        raise InputError(
            f"root: no image files under {root} (looked for {', '.join(IMAGE_EXTENSIONS)}, any case, recursively)"
        )
    class_ids = {}
    if labels_from_folders:
        names = {_first_folder(rel) for candidates, _ in listings.values() for rel in candidates} - {None}
        class_ids = {name: index for index, name in enumerate(sorted(names))}
    dataset = PreparedDataset(source=SOURCE, splits={}, info={"classes": {str(i): n for n, i in class_ids.items()}})
    for split, folder in (("train", root), ("test", test_root)):
        candidates, others = listings[split]
        dataset.rejected.extend(
            {"split": split, "path": rel, "reason": f"not an image extension ({', '.join(IMAGE_EXTENSIONS)})"}
            for rel in others
        )
        dataset.splits[split] = _folder_split(split, folder, candidates, class_ids, max_side or 0, workers, dataset)
    dataset.splits["val"] = SplitStream(images=lambda: iter(()), columns=_empty_columns(), expected=0)
    return dataset


def _empty_columns() -> dict[str, list]:
    return {"source": [], "split": [], "origin": [], "label": [], "class_name": []}


def _folder_split(split, folder, candidates, class_ids, max_side, workers, dataset) -> SplitStream:
    columns = _empty_columns()

    def images() -> Iterator[np.ndarray]:
        paths = [folder / rel for rel in candidates]
        for rel, (pixels, reason) in zip(candidates, _decoded(paths, max_side, workers)):
            if pixels is None:
                dataset.rejected.append({"split": split, "path": rel, "reason": reason})
                continue
            name = _first_folder(rel) if class_ids else None
            columns["source"].append(SOURCE)
            columns["split"].append(split)
            columns["origin"].append(rel)
            columns["label"].append(class_ids.get(name) if name is not None else None)
            columns["class_name"].append(name)
            yield pixels

    return SplitStream(images=images, columns=columns, expected=len(candidates))
