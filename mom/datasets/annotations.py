"""Untrusted annotation files: reading their text, confining the paths they list.

Annotation files (``images.txt``, ``Ebay_train.txt``, ``gnd_*.pkl``/``.mat``,
``cars_annos.mat``, a user's ground-truth CSV, ...) name images by relative
paths. Such a name is untrusted: :func:`confined_paths` joins names to their
folder only when every result stays inside it, and refuses absolute paths,
``..`` components, NUL bytes, names of no file (empty, ``.``) and symlinks
(of the file or of a folder on the way) whose target lies outside the folder.
The folder itself may be a symlink: it is resolved first.
"""
from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import Iterable

from mom.errors import InputError


def read_annotation_text(path: Path) -> str:
    """The UTF-8 text of an annotation file, or a one-line :class:`InputError`."""
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as error:
        raise InputError(f"root: {path} is not a readable UTF-8 text file ({error})") from None


def is_within(base: Path, target: Path) -> bool:
    """Whether the resolved ``target`` is ``base`` or lies below it (both resolved)."""
    return target == base or base in target.parents


def confined_paths(root: str | os.PathLike, entries: Iterable[str], annotation: str | os.PathLike,
                   option: str = "root") -> list[Path]:
    """``root / entry`` for each entry of the annotation file ``annotation``;
    the first entry that would leave ``root`` is an :class:`InputError`
    naming the option, the file and the entry."""
    root = Path(root)
    base = Path(os.path.realpath(root))
    resolved_folders: dict[tuple[str, ...], Path] = {}
    paths = []
    for entry in entries:
        reason = _lexical_escape(entry)
        if reason is None:
            parts = PurePosixPath(entry).parts
            if not is_within(base, _resolved(root, parts, resolved_folders)):
                reason = "resolves outside the folder through a symlink"
        if reason is not None:
            shown = repr(entry) if len(repr(entry)) <= 200 else repr(entry)[:200] + "..."
            raise InputError(f"{option}: {annotation} lists {shown}, which {reason}; image paths must stay "
                             f"inside {root} (relative, no '..', no symlink out)")
        paths.append(root / entry)
    return paths


def _lexical_escape(entry) -> str | None:
    if not isinstance(entry, str):
        return f"is a {type(entry).__name__}, not a path"
    if "\0" in entry:
        return "holds a NUL byte"
    relative = PurePosixPath(entry)
    if relative.is_absolute():
        return "is an absolute path"
    if ".." in relative.parts:
        return "has a '..' component"
    if not relative.parts:
        return "names no file"
    return None


def _resolved(root: Path, parts: tuple[str, ...], resolved_folders: dict) -> Path:
    """The real path of ``root / parts``; folders are resolved once and cached
    (a listing names many files per folder), the file itself only when it is a link."""
    folder = parts[:-1]
    if folder not in resolved_folders:
        resolved_folders[folder] = Path(os.path.realpath(root.joinpath(*folder)))
    candidate = resolved_folders[folder] / parts[-1]
    return Path(os.path.realpath(candidate)) if candidate.is_symlink() else candidate
