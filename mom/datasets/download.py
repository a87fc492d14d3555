"""Optional downloads of datasets that have a stable public address.

Only used when the user turns ``download`` on; every failure (no network, a
moved file) is one :class:`~mom.errors.InputError` line saying what to fetch by
hand and where to put it.
"""
from __future__ import annotations

import shutil
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

from mom.errors import InputError

TIMEOUT_S = 30


def fetch(url: str, destination: Path) -> Path:
    """Download ``url`` to ``destination`` (atomically: a partial file is removed)."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(destination.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response, open(partial, "wb") as handle:
            shutil.copyfileobj(response, handle, length=1 << 20)
    except (urllib.error.URLError, OSError, TimeoutError) as error:
        partial.unlink(missing_ok=True)
        reason = getattr(error, "reason", error)
        raise InputError(
            f"download: cannot fetch {url} ({reason}); offline? download it by hand into {destination.parent}"
        ) from None
    partial.replace(destination)
    return destination


def extract(archive: Path, into: Path, flatten: bool = False) -> None:
    """Unpack a tar archive safely (no absolute paths, links or devices); with
    ``flatten`` every file lands directly in ``into``."""
    into.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive) as tar:
            members = [member for member in tar.getmembers() if member.isfile() or member.isdir()]
            if flatten:
                members = [member for member in members if member.isfile()]
                for member in members:
                    member.name = Path(member.name).name
            tar.extractall(into, members=members, filter="data")
    except (tarfile.TarError, OSError) as error:
        raise InputError(f"download: cannot unpack {archive} ({error})") from None


def fetch_missing(files: dict[str, str], root: Path) -> None:
    """Download each ``relative path -> url`` that is not yet under ``root``."""
    for relative, url in files.items():
        target = root / relative
        if not target.exists():
            fetch(url, target)
