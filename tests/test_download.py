"""Verified downloads (issue 19): a file is kept only when its SHA-256 is the
pinned or user-listed one; unknown hashes are not fetched; a mismatch is one
line and nothing is kept. Served by a loopback HTTP server: no internet."""
import functools
import hashlib
import http.server
import io
import pickle
import tarfile
import threading

import numpy as np
import pytest
from PIL import Image

from mom.datasets import cub, download, oxford_classic, revisited
from mom.datasets.download import Pin, fetch
from mom.datasets.benchmarks import prepare_retrieval
from mom.errors import InputError


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep the test output clean
        pass


@pytest.fixture
def server(tmp_path):
    """``(folder it serves, base address, list of requested paths)``."""
    served = tmp_path / "served"
    served.mkdir()
    requests = []

    class Recording(_Handler):
        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Recording, directory=str(served)))
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{httpd.server_address[1]}", requests
    httpd.shutdown()
    httpd.server_close()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_a_pinned_file_is_kept_when_its_hash_matches(tmp_path, server, monkeypatch):
    served, base, _ = server
    (served / "data.bin").write_bytes(b"payload" * 1000)
    monkeypatch.setitem(download.PINNED, f"{base}/data.bin", Pin(_sha256(b"payload" * 1000), 7000, "this test"))
    target = fetch(f"{base}/data.bin", tmp_path / "dl" / "data.bin")
    assert target.read_bytes() == b"payload" * 1000
    assert sorted(p.name for p in target.parent.iterdir()) == ["data.bin"]


def test_a_mismatch_is_one_line_and_nothing_is_kept(tmp_path, server, monkeypatch):
    served, base, _ = server
    (served / "data.bin").write_bytes(b"tampered")
    monkeypatch.setitem(download.PINNED, f"{base}/data.bin", Pin(_sha256(b"original"), 8, "this test"))
    with pytest.raises(InputError, match=rf"download: {base}/data.bin has SHA-256 {_sha256(b'tampered')}, expected "
                                         rf"{_sha256(b'original')} \(pinned, published by this test\); the file was "
                                         "not kept") as error:
        fetch(f"{base}/data.bin", tmp_path / "dl" / "data.bin")
    assert "\n" not in str(error.value)
    assert list((tmp_path / "dl").iterdir()) == []


def test_more_bytes_than_the_pinned_size_stop_the_transfer(tmp_path, server, monkeypatch):
    served, base, _ = server
    (served / "big.bin").write_bytes(bytes(3 * download.CHUNK_BYTES))
    monkeypatch.setitem(download.PINNED, f"{base}/big.bin", Pin("0" * 64, 1000, "this test"))
    with pytest.raises(InputError, match=r"cannot fetch .*big.bin \(more than the 1,000 bytes the pinned file has\)"):
        fetch(f"{base}/big.bin", tmp_path / "big.bin")
    assert list(tmp_path.glob("big.bin*")) == []


def test_an_unknown_hash_is_not_fetched_unless_the_user_lists_it(tmp_path, server):
    served, base, requests = server
    (served / "gnd.pkl").write_bytes(b"ground truth")
    with pytest.raises(InputError, match=r"download: no published SHA-256 for .*gnd.pkl, so it is not fetched "
                                         r"unverified; .* write its SHA-256 into .*SHA256SUMS as '<sha256>  gnd.pkl'"):
        fetch(f"{base}/gnd.pkl", tmp_path / "gnd.pkl")
    assert requests == []  # refused before any request
    (tmp_path / "SHA256SUMS").write_text(f"# from the dataset's authors\n{_sha256(b'ground truth')} *gnd.pkl\n")
    assert fetch(f"{base}/gnd.pkl", tmp_path / "gnd.pkl").read_bytes() == b"ground truth"
    (tmp_path / "SHA256SUMS").write_text(f"{_sha256(b'other')}  gnd2.pkl\n")
    with pytest.raises(InputError, match="no published SHA-256"):
        fetch(f"{base}/gnd.pkl", tmp_path / "gnd2.pkl.orig")
    (tmp_path / "SHA256SUMS").write_text("not a checksum line\n")
    with pytest.raises(InputError, match=r"SHA256SUMS:1: expected '<64 hex digits>  <file name>'"):
        fetch(f"{base}/gnd.pkl", tmp_path / "again.pkl")


def test_a_missing_file_on_the_server_is_one_line(tmp_path, server, monkeypatch):
    _, base, _ = server
    monkeypatch.setitem(download.PINNED, f"{base}/gone.tgz", Pin("0" * 64, 10, "this test"))
    with pytest.raises(InputError, match=r"download: cannot fetch .*gone.tgz \(File not found\); offline\?"):
        fetch(f"{base}/gone.tgz", tmp_path / "dl" / "gone.tgz")
    assert list((tmp_path / "dl").iterdir()) == []


def _tgz(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((12, 16, 3), seed * 40, np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def test_revisited_download_verifies_the_ground_truth_before_reading_it(tmp_path, server, monkeypatch):
    served, base, _ = server
    gnd = {"imlist": ["a", "b"], "qimlist": ["q"], "gnd": [{"bbx": [0, 0, 8, 8], "easy": [0], "hard": [], "junk": [1]}]}
    good = pickle.dumps(gnd, protocol=2)
    (served / "gnd_roxford5k.pkl").write_bytes(good)
    archive = _tgz({"oxbuild/a.jpg": _jpeg(1), "oxbuild/b.jpg": _jpeg(2), "oxbuild/q.jpg": _jpeg(3)})
    (served / "oxbuild_images.tgz").write_bytes(archive)
    monkeypatch.setattr(revisited, "GROUND_TRUTH_URL", base + "/gnd_{name}.pkl")
    monkeypatch.setitem(revisited.IMAGE_ARCHIVES, "roxford5k", [f"{base}/oxbuild_images.tgz"])
    root = tmp_path / "roxford5k"
    root.mkdir()
    (root / "SHA256SUMS").write_text(f"{_sha256(good)}  gnd_roxford5k.pkl\n{_sha256(archive)}  oxbuild_images.tgz\n")
    dataset = prepare_retrieval("roxford5k", root, download=True)
    assert dataset.info["queries"] == 1 and sorted(p.name for p in (root / "jpg").iterdir()) == ["a.jpg", "b.jpg", "q.jpg"]
    assert not (root / "oxbuild_images.tgz").exists()  # the archive is removed once unpacked

    # the server now hands out a different pickle: refused by its hash, never decoded
    (root / "gnd_roxford5k.pkl").unlink()
    (served / "gnd_roxford5k.pkl").write_bytes(b"cos\nsystem\n(S'echo owned'\ntR.")
    with pytest.raises(InputError, match=r"gnd_roxford5k.pkl has SHA-256 \w+, expected \w+ \(listed in .*SHA256SUMS\); "
                                         "the file was not kept"):
        prepare_retrieval("roxford5k", root, download=True)
    assert not (root / "gnd_roxford5k.pkl").exists()


def test_every_download_address_is_https_and_pinned_where_a_hash_is_published():
    addresses = [cub.URL, revisited.GROUND_TRUTH_URL, *[url for urls in revisited.IMAGE_ARCHIVES.values() for url in urls],
                 *[url for folders in oxford_classic.ARCHIVES.values() for urls in folders.values() for url in urls]]
    assert all(address.startswith("https://") for address in addresses), addresses
    assert cub.URL in download.PINNED
    assert all(len(pin.sha256) == 64 and int(pin.sha256, 16) >= 0 and pin.size > 0 for pin in download.PINNED.values())


def test_extract_keeps_archive_members_inside_the_target(tmp_path):
    archive = tmp_path / "evil.tgz"
    archive.write_bytes(_tgz({"../escape.txt": b"x", "ok/file.txt": b"y"}))
    with pytest.raises(InputError, match="download: cannot unpack"):
        download.extract(archive, tmp_path / "into")
    assert not (tmp_path / "escape.txt").exists()
