"""Hostile input for the ``folder`` source and the manifest reader (issue 8).

The folder source must never crash and never read outside its root: every
file it does not store is listed in report.json with a reason. Decisions
(also in mom/datasets/folder.py):
- a symlink is followed only when it resolves to a regular file inside the
  collection; links out of it, broken links and linked folders are refused and
  reported; FIFOs/devices are reported and never opened;
- ground-truth query paths that leave ``query_root`` (absolute, ``..``,
  symlink out) are a one-line InputError (the file is the user's, not data);
- non-UTF-8 file names are read; their origin shows the bytes as ``\\xNN``;
- decompression bombs are refused at Pillow's MAX_IMAGE_PIXELS (Pillow itself
  only warns up to twice that and then allocates the whole image);
- unreadable files are reported "permission denied". Tests often run as root,
  where ``chmod 000`` does not stop a read: then the file is stored, and the
  rejection path is checked by making ``open`` raise PermissionError.
"""
import io
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from mom import artifacts
from mom.datasets import images as images_module
from mom.datasets.folder import decode_image, prepare_folder, RejectedImage
from mom.errors import InputError
from mom.imagestore import ImageStore, write_image_store
from stages.prepare import main as prepare_main

ROOT = Path(__file__).resolve().parents[1]
IS_ROOT = os.geteuid() == 0


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width x height`` RGB pixels, with a few
    bytes of image data: a decompression bomb without allocating one."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = chunk(b"IDAT", zlib.compress(b"\0" * 64))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + data + chunk(b"IEND", b"")


def encoded(format_: str, size=(24, 16), seed=0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=format_)
    return buffer.getvalue()


def fs_name(raw: bytes) -> str:
    """The str Python uses for a bytes file name (surrogate escapes)."""
    return os.fsdecode(raw)


# relative path (as the report/manifest writes it) -> expected reason prefix (None: stored)
EXPECTED = {
    "good/a.png": None,
    "good/b.jpg": None,
    "random.jpg": "not an image",
    "random.png": "not an image",
    "random.webp": "not an image",
    "truncated.jpg": "corrupt or unreadable",
    "truncated.png": "corrupt or unreadable",
    "bomb_huge.png": "decompression bomb refused",
    "bomb_just_over.png": "decompression bomb refused",
    "zero.bmp": "empty file",
    "link_inside.png": None,
    "link_outside.png": "symlink to a file outside the collection",
    "link_broken.png": "symlink to nothing",
    "linked_folder": "symlink to a folder",
    "fifo.png": "not a regular file",
    "caf\\xe9.png": None,
    "junk\\xff\\xfe.jpg": "not an image",
    "notes.txt": "not an image extension",
    "locked.png": None if IS_ROOT else "permission denied",
}


@pytest.fixture
def hostile(tmp_path):
    root, outside = tmp_path / "collection", tmp_path / "outside"
    (root / "good").mkdir(parents=True)
    outside.mkdir()
    rng = np.random.default_rng(8)
    (root / "good" / "a.png").write_bytes(encoded("PNG"))
    (root / "good" / "b.jpg").write_bytes(encoded("JPEG", seed=1))
    for name in ("random.jpg", "random.png", "random.webp"):
        (root / name).write_bytes(rng.integers(0, 256, 300, dtype=np.uint8).tobytes())
    jpeg, png = encoded("JPEG", (64, 64)), encoded("PNG", (64, 64))
    (root / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "truncated.png").write_bytes(png[: len(png) // 2])
    (root / "bomb_huge.png").write_bytes(png_declaring(100_000, 100_000))
    side = int(np.sqrt(Image.MAX_IMAGE_PIXELS * 1.2))  # over the limit, under Pillow's own error at 2x
    (root / "bomb_just_over.png").write_bytes(png_declaring(side, side))
    (root / "zero.bmp").write_bytes(b"")
    (outside / "secret.png").write_bytes(encoded("PNG", seed=2))
    os.symlink(root / "good" / "a.png", root / "link_inside.png")
    os.symlink(outside / "secret.png", root / "link_outside.png")
    os.symlink(outside / "missing.png", root / "link_broken.png")
    os.symlink(outside, root / "linked_folder")
    os.mkfifo(root / "fifo.png")
    (root / fs_name(b"caf\xe9.png")).write_bytes(encoded("PNG", seed=3))
    (root / fs_name(b"junk\xff\xfe.jpg")).write_bytes(b"\xff\xfe not a jpeg")
    (root / "notes.txt").write_text("hello")
    (root / "locked.png").write_bytes(encoded("PNG", seed=4))
    os.chmod(root / "locked.png", 0)
    return root


def run_prepare(args):
    result = CliRunner().invoke(prepare_main, [str(arg) for arg in args])
    return result


def test_hostile_collection_is_stored_or_reported_item_by_item(hostile, tmp_path):
    out = tmp_path / "prepared"
    result = run_prepare(["--source", "folder", "--root", hostile, "--workers", 1, "--max_side", 64, "--out-dir", out])
    assert result.exit_code == 0, result.output
    report = artifacts.load_json(out / "report.json")
    stored = ImageStore.open(out / "train").origins
    rejected = {entry["path"]: entry["reason"] for entry in report["rejected"]}
    assert sorted(stored) == sorted(path for path, reason in EXPECTED.items() if reason is None)
    assert set(rejected) == {path for path, reason in EXPECTED.items() if reason is not None}
    for path, reason in rejected.items():
        assert reason.startswith(EXPECTED[path]), (path, reason)
    assert report["rejected_count"] == len(rejected)
    assert not any("secret" in origin for origin in stored)
    assert (out / "report.json").read_bytes().decode("utf-8")  # valid UTF-8 with the escaped names


def test_every_entry_of_the_tree_is_accounted_for(hostile, tmp_path):
    """Nothing is dropped silently: stored + reported = every entry of the root
    (hidden folders excepted, by the documented rule)."""
    dataset = prepare_folder(hostile, workers=1)
    stored = []
    for split in dataset.splits.values():
        for _ in split.images():  # the columns and the rejections fill as the stream is read
            pass
        stored.extend(split.columns["origin"])
    entries = set()
    for directory, folders, files in os.walk(os.fsencode(hostile)):
        for name in files + [f for f in folders if os.path.islink(os.path.join(directory, f))]:
            relative = os.path.relpath(os.path.join(directory, name), os.fsencode(hostile))
            entries.add(images_module.display_path(os.fsdecode(relative)))
    reported = {entry["path"] for entry in dataset.rejected}
    assert set(stored) | reported == entries and not set(stored) & reported


def test_permission_denied_is_reported(hostile, monkeypatch):
    """The rejection path itself, also when tests run as root."""
    real_open = Image.open

    def refusing(path, *args, **kwargs):
        if Path(path).name == "a.png":
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(images_module.Image, "open", refusing)
    with pytest.raises(RejectedImage, match="permission denied"):
        decode_image(hostile / "good" / "a.png", 64)


@pytest.mark.skipif(IS_ROOT, reason="root reads chmod-000 files; covered by test_permission_denied_is_reported")
def test_chmod_000_is_reported_for_a_normal_user(hostile):
    with pytest.raises(RejectedImage, match="permission denied"):
        decode_image(hostile / "locked.png", 64)


@pytest.mark.parametrize("kind", ["png", "jpeg"])
def test_mutated_images_decode_or_are_rejected(tmp_path, kind):
    """Random truncations and byte flips of valid files: an image or a
    RejectedImage, never another exception."""
    rng = np.random.default_rng(0 if kind == "png" else 1)
    original = np.frombuffer(encoded(kind.upper(), (40, 30)), dtype=np.uint8)
    outcomes = set()
    for trial in range(25):
        data = original.copy()
        if trial % 2:
            data = data[: rng.integers(1, len(data))]
        else:
            positions = rng.integers(0, len(data), size=rng.integers(1, 8))
            data[positions] = rng.integers(0, 256, size=len(positions), dtype=np.uint8)
        path = tmp_path / f"mutant{trial}.{kind}"
        path.write_bytes(data.tobytes())
        try:
            pixels = decode_image(path, 64)
        except RejectedImage:
            outcomes.add("rejected")
            continue
        assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3
        outcomes.add("decoded")
    assert "rejected" in outcomes


def test_collection_of_only_rejected_files_is_one_clear_error(tmp_path):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.jpg").write_bytes(b"")
    (junk / "b.png").write_bytes(png_declaring(100_000, 100_000))
    os.symlink(tmp_path, junk / "up")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "stages.prepare", "--source", "folder", "--root", str(junk),
                             "--workers", "1", "--out-dir", str(tmp_path / "out")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert errors == [f"prepare: error: root: {junk} holds no readable image (3 files skipped)"], result.stderr
    assert "Traceback" not in result.stderr


# --- ground truth paths -----------------------------------------------------

def retrieval_folders(tmp_path):
    train, database, queries = tmp_path / "train", tmp_path / "db", tmp_path / "queries"
    for folder in (train, database, queries):
        folder.mkdir()
    (train / "t.png").write_bytes(encoded("PNG"))
    (database / "d.png").write_bytes(encoded("PNG", seed=1))
    (queries / "q.png").write_bytes(encoded("PNG", seed=2))
    (tmp_path / "outside.png").write_bytes(encoded("PNG", seed=3))
    os.symlink(tmp_path / "outside.png", queries / "escape.png")
    return train, database, queries


@pytest.mark.parametrize("query", ["../outside.png", "ABSOLUTE", "escape.png", "./../queries/../../outside.png"])
def test_ground_truth_query_paths_cannot_leave_query_root(tmp_path, query):
    train, database, queries = retrieval_folders(tmp_path)
    query = str(tmp_path / "outside.png") if query == "ABSOLUTE" else query
    (tmp_path / "gt.csv").write_text(f"query,database\n{query},d.png\n")
    with pytest.raises(InputError, match=r"ground_truth: .*gt.csv lists '.*', which (is an absolute|has a '\.\.'|resolves outside)"):
        prepare_folder(train, test_root=database, query_root=queries, ground_truth=tmp_path / "gt.csv")


@pytest.mark.parametrize("content, message", [
    (b"query,database\nq.png,d.png\n\xff\xfe\n", "not a readable UTF-8 CSV"),
    (b"query,database\nq.png,d\x00.png\n", "not a readable UTF-8 CSV|database images not found"),
    (b"query,database\nq.png,../db/d.png\n", "database images not found"),
])
def test_broken_ground_truth_csv_is_an_input_error(tmp_path, content, message):
    train, database, queries = retrieval_folders(tmp_path)
    (tmp_path / "gt.csv").write_bytes(content)
    with pytest.raises(InputError, match=message):
        prepare_folder(train, test_root=database, query_root=queries, ground_truth=tmp_path / "gt.csv")


def test_corrupt_ground_truth_parquet_is_an_input_error(tmp_path):
    train, database, queries = retrieval_folders(tmp_path)
    (tmp_path / "gt.parquet").write_bytes(b"PAR1" + bytes(range(200)) + b"PAR1")
    with pytest.raises(InputError, match="not a readable Parquet file"):
        prepare_folder(train, test_root=database, query_root=queries, ground_truth=tmp_path / "gt.parquet")


# --- the manifest reader ----------------------------------------------------

@pytest.fixture
def store(tmp_path):
    folder = tmp_path / "store"
    images = [np.full((2 + i, 3, 3), i, np.uint8) for i in range(5)]
    write_image_store(folder, images, {"source": ["s"] * 5, "split": ["train"] * 5, "origin": list("abcde")})
    return folder


def _damage_manifest(folder, function):
    table = pq.read_table(folder / "manifest.parquet")
    artifacts.save_parquet(folder / "manifest.parquet", function(table))


def _set_column(table, name, values, type_=None):
    index = table.column_names.index(name)
    return table.set_column(index, name, pa.array(values, type=type_ or table.schema.field(name).type))


DAMAGES = {
    "manifest random bytes": lambda f: (f / "manifest.parquet").write_bytes(os.urandom(300)),
    "manifest truncated": lambda f: (f / "manifest.parquet").write_bytes((f / "manifest.parquet").read_bytes()[:-40]),
    "manifest empty file": lambda f: (f / "manifest.parquet").write_bytes(b""),
    "manifest missing": lambda f: (f / "manifest.parquet").unlink(),
    "manifest missing column": lambda f: _damage_manifest(f, lambda t: t.drop(["offset"])),
    "manifest wrong type": lambda f: _damage_manifest(
        f, lambda t: _set_column(t, "height", list("vwxyz"), pa.string())),
    "manifest negative offset": lambda f: _damage_manifest(f, lambda t: _set_column(t, "offset", [-1, 6, 15, 27, 42])),
    "manifest zero height": lambda f: _damage_manifest(f, lambda t: _set_column(t, "height", [0, 3, 4, 5, 6])),
    "manifest huge size": lambda f: _damage_manifest(f, lambda t: _set_column(t, "width", [2**31 - 1] * 5)),
    "manifest items shuffled": lambda f: _damage_manifest(f, lambda t: _set_column(t, "item", [1, 0, 2, 3, 4])),
    "manifest null channels": lambda f: _damage_manifest(f, lambda t: _set_column(t, "channels", [3, None, 3, 3, 3])),
    "pixels one byte short": lambda f: np.save(f / "pixels.npy", np.load(f / "pixels.npy")[:-1]),
    "pixels one byte long": lambda f: np.save(f / "pixels.npy", np.append(np.load(f / "pixels.npy"), np.uint8(0))),
    "pixels float": lambda f: np.save(f / "pixels.npy", np.load(f / "pixels.npy").astype(np.float32)),
    "pixels 2-d": lambda f: np.save(f / "pixels.npy", np.load(f / "pixels.npy").reshape(-1, 3)),
    "pixels pickled object array": lambda f: np.save(f / "pixels.npy", np.array([{"a": 1}], dtype=object),
                                                     allow_pickle=True),
    "pixels random bytes": lambda f: (f / "pixels.npy").write_bytes(os.urandom(200)),
    "pixels header larger than file": lambda f: (f / "pixels.npy").write_bytes(
        (f / "pixels.npy").read_bytes()[:200]),
    "pixels missing": lambda f: (f / "pixels.npy").unlink(),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_store_is_one_input_error(store, damage):
    DAMAGES[damage](store)
    with pytest.raises(InputError) as error:
        ImageStore.open(store)
    assert "\n" not in str(error.value) and str(store) in str(error.value)


def test_random_byte_flips_of_a_manifest_never_crash(store):
    """Flipped bytes anywhere in the Parquet file: a consistent store or an
    InputError, never another exception."""
    original = np.frombuffer((store / "manifest.parquet").read_bytes(), dtype=np.uint8)
    rng = np.random.default_rng(5)
    reference = [image.copy() for image in ImageStore.open(store)]
    for _ in range(40):
        data = original.copy()
        positions = rng.integers(0, len(data), size=rng.integers(1, 4))
        data[positions] ^= rng.integers(1, 256, size=len(positions), dtype=np.uint8)
        (store / "manifest.parquet").write_bytes(data.tobytes())
        try:
            opened = ImageStore.open(store)
        except InputError:
            continue
        # Accepted only when the geometry is intact (metadata bytes may differ).
        assert [image.shape for image in opened] == [image.shape for image in reference]
