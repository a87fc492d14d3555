"""Decoding image files into the pixel format of the image store (shared by
every file-based source).

Rules: every image becomes RGB ``uint8`` (3 channels, grayscale replicated):
1-bit -> black/white; palette -> its colours; 16-bit (``I;16*``) and 32-bit
integer (``I``) images are read as 16-bit and scaled by 255/65535; float
(``F``) images are clipped to [0, 255]; CMYK and other modes through Pillow's
conversion; transparency is composited over white. Multi-frame files give
their first frame. EXIF orientation is applied when asked (the folder source);
benchmark sources keep the stored pixel order their boxes refer to. A crop box
``(x0, y0, x1, y1)`` is applied with Pillow's ``crop`` (coordinates rounded),
before downscaling so that the longer side is at most ``max_side``.
"""
from __future__ import annotations

import multiprocessing
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image, ImageOps

from mom.datasets import PreparedDataset, SplitStream
from mom.errors import InputError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class RejectedImage(Exception):
    """A file that is not a usable image; the message is the report's reason."""


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


def decode_image(
    path: Path, max_side: int, crop: Sequence[float] | None = None, exif: bool = True
) -> np.ndarray:
    """Decode one file to RGB ``uint8 (h, w, 3)`` (rules in the module doc);
    raise :class:`RejectedImage` with the reason when it is not a usable image."""
    try:
        if path.stat().st_size == 0:
            raise RejectedImage("empty file (0 bytes)")
        # Pillow only warns between MAX_IMAGE_PIXELS and twice that, then
        # allocates the whole image: refuse at the limit itself.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if max_side and crop is None and image.format == "JPEG":
                    image.draft(image.mode, (max_side, max_side))  # decode at a reduced DCT scale (faster)
                image.load()
                if exif:
                    image = ImageOps.exif_transpose(image)
                if crop is not None:
                    image = image.crop(tuple(float(value) for value in crop))
                pixels = to_rgb(image)
    except RejectedImage:
        raise
    except FileNotFoundError:
        raise RejectedImage("file not found") from None
    except PermissionError:
        raise RejectedImage("permission denied (file not readable)") from None
    except Image.UnidentifiedImageError:
        raise RejectedImage("not an image (Pillow cannot identify the format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise RejectedImage(f"decompression bomb refused ({error})") from None
    except MemoryError:
        raise
    except Exception as error:  # noqa: BLE001 - any decoder failure on an untrusted file is reported, not fatal
        raise RejectedImage(f"corrupt or unreadable ({type(error).__name__}: {error})") from None
    if min(pixels.shape[:2]) < 1:
        raise RejectedImage(f"crop box {tuple(crop)} is empty" if crop is not None else "image has no pixels")
    return downscale(pixels, max_side)


EXTENSION_REASON = f"not an image extension ({', '.join(IMAGE_EXTENSIONS)})"
OUTSIDE_REASON = "symlink to a file outside the collection: refused"
BROKEN_LINK_REASON = "symlink to nothing (broken link)"
FOLDER_LINK_REASON = "symlink to a folder: not followed"
SPECIAL_REASON = "not a regular file (device, FIFO or socket)"


def list_files(root: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """Relative POSIX paths under ``root``: (image candidates, ``(path, reason)``
    of every other entry), both sorted.

    A collection never leaks files from outside its root: a symlink is used
    only when it resolves to a regular file inside ``root``; symlinks to files
    elsewhere, broken symlinks and symlinked folders (not entered: no loops, no
    escape) are reported, as are devices, FIFOs and sockets (never opened) and
    files with other extensions. Paths are the file system's names: on Linux a
    name that is not UTF-8 keeps its bytes as surrogate escapes (use
    :func:`display_path` for text that is stored or printed).
    """
    root = Path(root)
    inside = root.resolve()
    images, skipped = [], []
    for directory, subdirectories, files in os.walk(root):
        for name in subdirectories:
            if Path(directory, name).is_symlink():
                skipped.append((Path(directory, name).relative_to(root).as_posix(), FOLDER_LINK_REASON))
        subdirectories[:] = sorted(name for name in subdirectories
                                   if not name.startswith(".") and not Path(directory, name).is_symlink())
        for name in files:
            path = Path(directory, name)
            relative = path.relative_to(root).as_posix()
            reason = _unusable_entry(path, inside)
            if reason is None and path.suffix.lower() not in IMAGE_EXTENSIONS:
                reason = EXTENSION_REASON
            if reason is None:
                images.append(relative)
            else:
                skipped.append((relative, reason))
    return sorted(images), sorted(skipped)


def _unusable_entry(path: Path, inside: Path) -> str | None:
    """Why the directory entry ``path`` cannot be an item of the collection rooted at ``inside``."""
    if path.is_symlink():
        target = path.resolve()
        if not target.exists():
            return BROKEN_LINK_REASON
        if inside != target and inside not in target.parents:
            return OUTSIDE_REASON
    if not path.is_file():
        return SPECIAL_REASON
    return None


def display_path(relative: str) -> str:
    """``relative`` as valid UTF-8 text: bytes of a non-UTF-8 file name (kept
    by Python as surrogate escapes) are written ``\\xNN``."""
    return relative.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


@dataclass(frozen=True)
class FileItem:
    """One image file to store: where it is, what the manifest says about it.

    ``required`` items (benchmark images the ground truth refers to by
    position) make a decoding failure an error instead of a skipped file.
    """

    path: Path
    origin: str
    label: int | None = None
    class_name: str | None = None
    crop: tuple[float, float, float, float] | None = None
    required: bool = False


def _decode_task(task: tuple[str, int, tuple | None, bool]) -> tuple[np.ndarray | None, str | None]:
    path, max_side, crop, exif = task
    try:
        return decode_image(Path(path), max_side, crop, exif), None
    except RejectedImage as rejection:
        return None, str(rejection)


def decoded(items: Sequence[FileItem], max_side: int, workers: int, exif: bool) -> Iterator[tuple[np.ndarray | None, str | None]]:
    """``(pixels, None)`` or ``(None, reason)`` per item, in order; with
    ``workers > 1`` decoded in a process pool (the order is kept)."""
    tasks = [(str(item.path), max_side, item.crop, exif) for item in items]
    if workers <= 1 or len(tasks) < 2:
        yield from map(_decode_task, tasks)
        return
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        yield from pool.imap(_decode_task, tasks, chunksize=8)


def file_split(
    source: str,
    split: str,
    items: Sequence[FileItem],
    dataset: PreparedDataset,
    max_side: int,
    workers: int = 1,
    exif: bool = False,
) -> SplitStream:
    """A split whose images are decoded lazily from ``items``.

    Unusable files are skipped and appended to ``dataset.rejected``
    (``split``, ``path`` = origin, ``reason``); a ``required`` one raises an
    :class:`InputError` naming it. The manifest columns fill as the stream is
    consumed.
    """
    columns = empty_columns()

    def images() -> Iterator[np.ndarray]:
        for item, (pixels, reason) in zip(items, decoded(items, max_side or 0, workers, exif)):
            if pixels is None:
                if item.required:
                    raise InputError(f"root: {item.path}: {reason} (the benchmark needs this image)")
                dataset.rejected.append({"split": split, "path": item.origin, "reason": reason})
                continue
            columns["source"].append(source)
            columns["split"].append(split)
            columns["origin"].append(item.origin)
            columns["label"].append(item.label)
            columns["class_name"].append(item.class_name)
            yield pixels

    return SplitStream(images=images, columns=columns, expected=len(items))


def empty_columns() -> dict[str, list]:
    return {"source": [], "split": [], "origin": [], "label": [], "class_name": []}


def empty_split() -> SplitStream:
    return SplitStream(images=lambda: iter(()), columns=empty_columns(), expected=0)


def require_files(items: Sequence[FileItem], what: str) -> None:
    """Fail before any decoding when files the dataset lists are missing."""
    missing = [item for item in items if not item.path.is_file()]
    if missing:
        raise InputError(
            f"root: {len(missing)} of {len(items)} {what} are missing, first: {missing[0].path} "
            "(is root the dataset's top folder?)"
        )
