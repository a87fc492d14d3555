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

import os
from pathlib import Path, PurePosixPath

from mom.datasets import PreparedDataset
from mom.datasets.images import (  # noqa: F401 - re-exported for callers of the folder source
    IMAGE_EXTENSIONS,
    FileItem,
    RejectedImage,
    decode_image,
    downscale,
    empty_split,
    file_split,
)
from mom.errors import InputError

SOURCE = "folder"


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
        items = [_folder_item(folder, rel, class_ids) for rel in candidates]
        dataset.splits[split] = file_split(SOURCE, split, items, dataset, max_side or 0, workers, exif=True)
    dataset.splits["val"] = empty_split()
    return dataset


def _folder_item(folder: Path, relative: str, class_ids: dict[str, int]) -> FileItem:
    name = _first_folder(relative) if class_ids else None
    return FileItem(path=folder / relative, origin=relative, label=class_ids.get(name), class_name=name)
