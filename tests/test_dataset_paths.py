"""Image paths read from annotation files never leave the dataset's folder (issue 19).

For every source, one entry of its annotation file is replaced by a path that
escapes: ``../../outside/secret``, an absolute path, a symlink inside the root
that points outside, a NUL byte. Each is refused in one line naming the
annotation file and the entry, before any image is decoded; the revisited
case also runs the ``prepare`` stage end to end (it used to store the secret's
pixels and exit 0).
"""
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from mom.datasets.annotations import confined_paths
from mom.datasets.cars import prepare_cars
from mom.datasets.cub import prepare_cub
from mom.datasets.folder import prepare_folder
from mom.datasets.benchmarks import prepare_retrieval
from mom.datasets.sop import prepare_sop
from mom.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
ESCAPES = ("dotdot", "absolute", "symlink", "nul")
REFUSAL = r"lists '.*', which (has a '\.\.' component|is an absolute path|resolves outside the folder through a " \
          r"symlink|holds a NUL byte); image paths must stay inside"


def _image(path: Path, value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((6, 8, 3), value, np.uint8)).save(path, format="PNG")


def _secret(tmp_path: Path) -> Path:
    secret = tmp_path / "outside" / "secret.jpg"
    _image(secret, 200)
    return secret


def _entry(escape: str, images: Path, secret: Path, suffix: str = ".jpg") -> str:
    """An annotation entry (without ``suffix`` where the source appends it) that escapes ``images``."""
    if escape == "dotdot":
        entry = os.path.relpath(secret, images)
        assert entry.startswith("../")
    elif escape == "absolute":
        entry = str(secret)
    elif escape == "symlink":
        images.mkdir(parents=True, exist_ok=True)
        os.symlink(secret, images / "link.jpg")
        entry = "link.jpg"
    else:
        entry = "ok\0.jpg"
    return entry[: -len(suffix)] if suffix and entry.endswith(suffix) else entry


def make_revisited(root, escape, secret, where="imlist"):
    images = root / "jpg"
    for name in ("a", "q"):
        _image(images / f"{name}.jpg")
    entry = _entry(escape, images, secret)
    imlist, qimlist = (["a", entry], ["q"]) if where == "imlist" else (["a"], [entry])
    gnd = [{"bbx": [0, 0, 4, 4], "easy": [0], "hard": [], "junk": []}]
    (root / "gnd_roxford5k.pkl").write_bytes(pickle.dumps({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}))
    return lambda: prepare_retrieval("roxford5k", root), "gnd_roxford5k.pkl"


def make_revisited_query(root, escape, secret):
    return make_revisited(root, escape, secret, where="qimlist")


def make_revisited_mat(root, escape, secret):
    """The MATLAB release of the revisited ground truth (what revisitop's scripts download now)."""
    images = root / "jpg"
    for name in ("a", "q"):
        _image(images / f"{name}.jpg")
    entry = _entry(escape, images, secret)
    gnd = np.zeros((1, 1), dtype=[("bbx", object), ("easy", object), ("hard", object), ("junk", object)])
    gnd[0, 0] = (np.array([[0.0, 0.0, 4.0, 4.0]]), np.array([[1]]), np.zeros((1, 0)), np.zeros((1, 0)))
    cell = lambda names: np.array([names], dtype=object)  # noqa: E731 - a 1xN MATLAB cell
    scipy.io.savemat(root / "gnd_roxford5k.mat", {"imlist": cell(["a", entry]), "qimlist": cell(["q"]), "gnd": gnd})
    return lambda: prepare_retrieval("roxford5k", root), "gnd_roxford5k.mat"


def make_instre(root, escape, secret):
    _image(root / "S1" / "a.jpg")
    _image(root / "S1" / "q.jpg")
    entry = _entry(escape, root, secret, suffix="")
    gnd = np.zeros((1, 1), dtype=[("ok", object), ("bbx", object)])
    gnd[0, 0] = (np.array([[1.0]]), np.array([[0.0, 0.0, 4.0, 4.0]]))
    cell = lambda names: np.array([names], dtype=object)  # noqa: E731 - a 1xN MATLAB cell
    scipy.io.savemat(root / "gnd_instre.mat", {"imlist": cell(["S1/a.jpg", entry]), "qimlist": cell(["S1/q.jpg"]),
                                               "gnd": gnd})
    return lambda: prepare_retrieval("instre", root), "gnd_instre.mat"


def make_cub(root, escape, secret):
    folder = root / "CUB_200_2011"
    _image(folder / "images" / "001.Bird" / "a.jpg")
    entry = _entry(escape, folder / "images", secret, suffix="")
    (folder / "images.txt").write_text(f"1 001.Bird/a.jpg\n2 {entry}\n")
    (folder / "image_class_labels.txt").write_text("1 1\n2 101\n")
    (folder / "classes.txt").write_text("".join(f"{c} {c:03d}.Bird\n" for c in range(1, 201)))
    return lambda: prepare_cub(root), "images.txt"


def make_cars(root, escape, secret):
    _image(root / "car_ims" / "000001.jpg")
    entry = _entry(escape, root, secret, suffix="")
    dtype = [("relative_im_path", object), ("class", object)]
    annotations = np.zeros((1, 2), dtype=dtype)
    annotations[0, 0] = ("car_ims/000001.jpg", np.array([[1]], np.uint8))
    annotations[0, 1] = (entry, np.array([[99]], np.uint8))
    names = np.array([[f"Car {c}" for c in range(1, 197)]], dtype=object)
    scipy.io.savemat(root / "cars_annos.mat", {"annotations": annotations, "class_names": names})
    return lambda: prepare_cars(root), "cars_annos.mat"


def make_sop(root, escape, secret):
    _image(root / "bicycle_final" / "1_0.JPG")
    _image(root / "toaster_final" / "2_0.JPG")
    entry = _entry(escape, root, secret, suffix="")
    header = "image_id class_id super_class_id path\n"
    (root / "Ebay_train.txt").write_text(f"{header}1 1 1 bicycle_final/1_0.JPG\n2 1 1 {entry}\n")
    (root / "Ebay_test.txt").write_text(f"{header}1 2 12 toaster_final/2_0.JPG\n")
    return lambda: prepare_sop(root), "Ebay_train.txt"


def make_folder_ground_truth(root, escape, secret):
    train, database, queries = root / "train", root / "db", root / "queries"
    _image(train / "t.png")
    _image(database / "d.png")
    _image(queries / "q.png")
    entry = _entry(escape, queries, secret, suffix="")
    (root / "gt.csv").write_text(f"query,database\nq.png,d.png\n{entry},d.png\n")
    return lambda: prepare_folder(train, test_root=database, query_root=queries, ground_truth=root / "gt.csv"), "gt.csv"


SOURCES = {
    "revisited_imlist": make_revisited,
    "revisited_qimlist": make_revisited_query,
    "revisited_mat": make_revisited_mat,
    "instre": make_instre,
    "cub": make_cub,
    "cars196": make_cars,
    "sop": make_sop,
    "folder_ground_truth": make_folder_ground_truth,
}
# scipy.io.savemat stores a NUL in a MATLAB string as a space: no NUL case for .mat files.
CASES = [(source, escape) for source in SOURCES for escape in ESCAPES
         if not (escape == "nul" and source in ("revisited_mat", "instre", "cars196"))]


@pytest.mark.parametrize("source, escape", CASES)
def test_annotation_entries_that_leave_the_root_are_refused_in_one_line(tmp_path, source, escape):
    secret = _secret(tmp_path)
    root = tmp_path / "dataset"
    root.mkdir()
    prepare, annotation = SOURCES[source](root, escape, secret)
    with pytest.raises(InputError, match=rf"{annotation} {REFUSAL}") as refusal:
        prepare()
    assert "\n" not in str(refusal.value)


@pytest.mark.parametrize("source", ["holidays", "oxford5k"])
def test_symlinked_images_that_leave_the_root_are_refused(tmp_path, source):
    secret = _secret(tmp_path)
    images = tmp_path / "dataset" / "jpg"
    if source == "holidays":
        _image(images / "100000.jpg")
        os.symlink(secret, images / "100001.jpg")
        prepare = lambda: prepare_retrieval("holidays", images.parent)  # noqa: E731
    else:
        _image(images / "all_souls_000001.jpg")
        os.symlink(secret, images / "all_souls_000002.jpg")
        gt = images.parent / "gt"
        gt.mkdir()
        (gt / "all_souls_1_query.txt").write_text("oxc1_all_souls_000001 0 0 4 4\n")
        for level in ("good", "ok", "junk"):
            (gt / f"all_souls_1_{level}.txt").write_text("")
        prepare = lambda: prepare_retrieval("oxford5k", images.parent)  # noqa: E731
    with pytest.raises(InputError, match=rf"the folder listing of .*jpg lists '.*', which resolves outside"):
        prepare()


def test_links_and_folders_inside_the_root_are_fine(tmp_path):
    root = tmp_path / "data"
    _image(root / "real" / "a.jpg")
    os.symlink(root / "real" / "a.jpg", root / "alias.jpg")
    os.symlink(root / "real", root / "linked_folder")
    paths = confined_paths(root, ["real/a.jpg", "alias.jpg", "linked_folder/a.jpg", "./real//a.jpg"], "list.txt")
    assert paths == [root / "real/a.jpg", root / "alias.jpg", root / "linked_folder/a.jpg", root / "real/a.jpg"]
    # the root itself may be a symlink (a dataset kept on another disk)
    os.symlink(root, tmp_path / "linked_root")
    assert confined_paths(tmp_path / "linked_root", ["alias.jpg"], "list.txt") == [tmp_path / "linked_root/alias.jpg"]
    # a folder on the way that links out is refused like a file that does
    os.symlink(tmp_path, root / "up")
    _image(tmp_path / "secret.jpg")
    assert confined_paths(root, ["up/data/real/a.jpg"], "list.txt") == [root / "up/data/real/a.jpg"]  # back inside
    with pytest.raises(InputError, match=r"root: list.txt lists 'up/secret.jpg', which resolves outside"):
        confined_paths(root, ["up/secret.jpg"], "list.txt")
    for entry in ("", ".", "a/.."):
        with pytest.raises(InputError, match="names no file|has a '..' component"):
            confined_paths(root, [entry], "list.txt")


def test_prepare_stage_does_not_store_pixels_from_outside_the_root(tmp_path):
    """The reproduction of issue 19: '../../outside/secret' in imlist made prepare exit 0 with the secret's pixels."""
    secret = _secret(tmp_path)
    root = tmp_path / "data" / "roxford5k"
    root.mkdir(parents=True)
    make_revisited(root, "dotdot", secret)
    out = tmp_path / "prepared"
    result = subprocess.run([sys.executable, "-m", "stages.prepare", "--source", "roxford5k", "--root", str(root),
                             "--out-dir", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prepare: error: root: ") and "gnd_roxford5k.pkl lists" in lines[0]
    assert not out.exists()
