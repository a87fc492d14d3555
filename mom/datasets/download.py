"""Optional downloads of datasets that have a stable public address, verified
by SHA-256 before they are kept or read.

Only used when the user turns ``download`` on. The expected hash of a file is
its pin in :data:`PINNED` (a hash published by a third party, named there),
or, for files whose hash nobody publishes, the line the user wrote for it in
``SHA256SUMS`` in the dataset's folder (``sha256sum`` format:
``<64 hex digits>  <file name>``). A file with neither is not fetched at all.
The bytes are hashed while they stream into ``<file>.part``; only a matching
file is renamed into place, a mismatch is removed. Every failure (no network,
a moved file, a wrong hash) is one :class:`~mom.errors.InputError` line saying
what to do.
"""
from __future__ import annotations

import hashlib
import http.client
import re
import tarfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from tqdm import tqdm

from mom.errors import InputError

TIMEOUT_S = 30
CHUNK_BYTES = 1 << 20
CHECKSUM_FILE = "SHA256SUMS"


@dataclass(frozen=True)
class Pin:
    """The expected SHA-256 and size of a published file, and who published them."""

    sha256: str
    size: int
    published_by: str


PINNED = {
    "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz?download=1": Pin(
        "0c685df5597a8b24909f6a7c9db6d11e008733779a671760afef78feb49bf081", 1150585339,
        "TensorFlow Datasets, url_checksums/caltech_birds2011.txt (the same CUB_200_2011.tgz, MD5 "
        "97eceeb196236b17998738112f37df78 as published with the original Caltech address)"),
}
_CHECKSUM_LINE = re.compile(r"^([0-9a-fA-F]{64}) [ *](.+)$")


def user_checksums(folder: Path) -> dict[str, str]:
    """``file name -> sha256`` from ``folder/SHA256SUMS`` (empty when there is none)."""
    path = folder / CHECKSUM_FILE
    if not path.is_file():
        return {}
    checksums = {}
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        match = _CHECKSUM_LINE.match(line.rstrip("\n"))
        if match is None:
            raise InputError(f"download: {path}:{number}: expected '<64 hex digits>  <file name>' (sha256sum format)")
        checksums[Path(match.group(2)).name] = match.group(1).lower()
    return checksums


def expected_sha256(url: str, destination: Path) -> tuple[str, str]:
    """``(sha256, where it comes from)`` for downloading ``url`` to ``destination``."""
    if url in PINNED:
        return PINNED[url].sha256, f"pinned, published by {PINNED[url].published_by}"
    listed = user_checksums(destination.parent)
    if destination.name in listed:
        return listed[destination.name], f"listed in {destination.parent / CHECKSUM_FILE}"
    raise InputError(
        f"download: no published SHA-256 for {url}, so it is not fetched unverified; download it by hand into "
        f"{destination.parent}, or write its SHA-256 into {destination.parent / CHECKSUM_FILE} as "
        f"'<sha256>  {destination.name}'")


def fetch(url: str, destination: Path) -> Path:
    """Download ``url`` to ``destination``, kept only when its SHA-256 is the expected one."""
    expected, origin = expected_sha256(url, destination)
    limit = PINNED[url].size if url in PINNED else None
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(destination.name + ".part")
    try:
        digest = _stream(url, partial, limit)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as error:
        partial.unlink(missing_ok=True)
        reason = " ".join(str(getattr(error, "reason", error)).split())
        raise InputError(
            f"download: cannot fetch {url} ({reason}); offline? download it by hand into {destination.parent}"
        ) from None
    if digest != expected:
        partial.unlink(missing_ok=True)
        raise InputError(f"download: {url} has SHA-256 {digest}, expected {expected} ({origin}); "
                         "the file was not kept")
    partial.replace(destination)
    return destination


def _stream(url: str, partial: Path, limit: int | None) -> str:
    """Write ``url`` to ``partial``; the hex SHA-256 of its bytes. More than
    ``limit`` bytes stop the transfer (a pinned file has a known size)."""
    digest = hashlib.sha256()
    received = 0
    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response, open(partial, "wb") as handle:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=Path(urlparse(url).path).name, leave=False) as bar:
            while chunk := response.read(CHUNK_BYTES):
                received += len(chunk)
                if limit is not None and received > limit:
                    raise ValueError(f"more than the {limit:,} bytes the pinned file has")
                digest.update(chunk)
                handle.write(chunk)
                bar.update(len(chunk))
    return digest.hexdigest()


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
