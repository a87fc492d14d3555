"""Revisited Oxford and Paris (ROxford5k, RParis6k; Radenovic et al., CVPR 2018).

Released layout (as the revisitop scripts lay it out), ``root`` being the
dataset's folder (e.g. ``.../datasets/roxford5k``)::

    gnd_roxford5k.pkl     dict: imlist (database names), qimlist (query names),
                          gnd (one dict per query: bbx [x0, y0, x1, y1],
                          easy, hard, junk: 0-based indices into imlist)
    jpg/<name>.jpg        all images, flat (queries are not in imlist)

The pickle is read with :mod:`mom.safe_pickle` (plain data only). When only
the MATLAB release ``gnd_<name>.mat`` is present (what the current revisitop
scripts download: same fields, 1-based indices) it is read with scipy instead. Queries are
cropped to ``bbx`` (Pillow ``crop``, as the benchmark's scripts do). Ground
truth levels ``easy``/``hard``/``junk``; protocols Easy (positives easy; junk
junk+hard), Medium (easy+hard; junk) and Hard (hard; junk+easy), see
:data:`mom.datasets.retrieval.PROTOCOLS`. Full sets: ROxford5k 4,993 database
images and 70 queries, RParis6k 6,322 and 70.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io

from mom import safe_pickle
from mom.datasets.annotations import confined_paths
from mom.datasets.download import extract, fetch, fetch_missing
from mom.datasets.images import FileItem
from mom.datasets.retrieval import Benchmark, checked_box, crop_origin
from mom.errors import InputError

NAMES = ("roxford5k", "rparis6k")
FULL_SIZES = {"roxford5k": (4993, 70), "rparis6k": (6322, 70)}
LEVELS = ("easy", "hard", "junk")
GROUND_TRUTH_URL = "https://cmp.felk.cvut.cz/revisitop/data/datasets/{name}/gnd_{name}.pkl"
IMAGE_ARCHIVES = {
    "roxford5k": ["https://www.robots.ox.ac.uk/~vgg/data/oxbuildings/oxbuild_images.tgz"],
    "rparis6k": [
        "https://www.robots.ox.ac.uk/~vgg/data/parisbuildings/paris_1.tgz",
        "https://www.robots.ox.ac.uk/~vgg/data/parisbuildings/paris_2.tgz",
    ],
}


def _index_list(value, where: str, n_database: int) -> np.ndarray:
    try:
        indices = np.asarray(value if value is not None else [], dtype=np.float64).ravel()
    except (ValueError, TypeError, OverflowError):
        raise InputError(f"{where}: expected a list or array of indices") from None
    if indices.size and (not np.all(indices == np.round(indices)) or indices.min() < 0 or indices.max() >= n_database):
        raise InputError(f"{where}: indices must be integers in 0..{n_database - 1}")
    return indices.astype(np.int64)


def _names(value, key: str, where: Path) -> list[str]:
    if not isinstance(value, (list, tuple, np.ndarray)) or not all(isinstance(v, str) for v in value):
        raise InputError(f"{where}: '{key}' must be a list of image names")
    return list(value)


def read_mat_ground_truth(path: Path) -> dict:
    """The MATLAB release in the pickle's shape (indices made 0-based)."""
    try:
        mat = scipy.io.loadmat(path, squeeze_me=True)
        names = {key: [str(name) for name in np.atleast_1d(mat[key])] for key in ("imlist", "qimlist")}
        gnd = []
        for entry in np.atleast_1d(mat["gnd"]):
            fields = entry.dtype.names
            parsed = {"bbx": np.atleast_1d(np.asarray(entry["bbx"], dtype=np.float64))}
            for level in LEVELS:
                values = np.atleast_1d(np.asarray(entry[level], dtype=np.float64)) if level in fields else np.zeros(0)
                parsed[level] = values - 1
            gnd.append(parsed)
    except Exception as error:  # noqa: BLE001 - any failure on an untrusted file is one line
        raise InputError(f"{path}: not a revisited ground-truth file ({type(error).__name__}: {error})") from None
    return {**names, "gnd": gnd}


def parse_ground_truth(path: Path) -> tuple[list[str], list[str], list[dict]]:
    """``imlist``, ``qimlist`` and per query ``{"bbx": box, "easy"/"hard"/"junk": int64 arrays}``."""
    data = read_mat_ground_truth(path) if path.suffix == ".mat" else safe_pickle.load(path)
    if not isinstance(data, dict) or not {"imlist", "qimlist", "gnd"} <= set(data):
        raise InputError(f"{path}: expected a dict with imlist, qimlist and gnd")
    imlist = _names(data["imlist"], "imlist", path)
    qimlist = _names(data["qimlist"], "qimlist", path)
    if not isinstance(data["gnd"], (list, tuple)):
        raise InputError(f"{path}: gnd must be a list with one dict per query")
    if len(data["gnd"]) != len(qimlist):
        raise InputError(f"{path}: gnd has {len(data['gnd'])} entries for {len(qimlist)} queries")
    queries = []
    for q, entry in enumerate(data["gnd"]):
        where = f"{path}: gnd[{q}]"
        if not isinstance(entry, dict) or "bbx" not in entry:
            raise InputError(f"{where}: expected a dict with bbx, easy, hard, junk")
        parsed = {"bbx": checked_box(entry["bbx"], where)}
        for level in LEVELS:
            parsed[level] = _index_list(entry.get(level), f"{where}['{level}']", len(imlist))
        queries.append(parsed)
    return imlist, qimlist, queries


def download_revisited(root: Path, name: str) -> None:
    fetch_missing({f"gnd_{name}.pkl": GROUND_TRUTH_URL.format(name=name)}, root)
    images = root / "jpg"
    if images.is_dir() and any(images.iterdir()):
        return
    for url in IMAGE_ARCHIVES[name]:
        archive = fetch(url, root / Path(url).name)
        extract(archive, images, flatten=True)
        archive.unlink()


def load_revisited(root: str | Path, name: str) -> Benchmark:
    root = Path(root)
    if name not in NAMES:
        raise InputError(f"source: unknown revisited dataset {name!r}; allowed: {', '.join(NAMES)}")
    gnd_path = root / f"gnd_{name}.pkl"
    if not gnd_path.is_file() and (root / f"gnd_{name}.mat").is_file():
        gnd_path = root / f"gnd_{name}.mat"
    if not gnd_path.is_file():
        raise InputError(f"root: {gnd_path} (or .mat) not found (the revisited ground truth; or turn on download)")
    imlist, qimlist, queries = parse_ground_truth(gnd_path)
    database_paths = confined_paths(root / "jpg", [f"{im}.jpg" for im in imlist], gnd_path)
    query_paths = confined_paths(root / "jpg", [f"{qim}.jpg" for qim in qimlist], gnd_path)
    database = [FileItem(path=path, origin=f"jpg/{im}.jpg", required=True) for path, im in zip(database_paths, imlist)]
    query_items = [
        FileItem(path=path, origin=crop_origin(f"jpg/{qim}.jpg", gnd["bbx"]), crop=gnd["bbx"], required=True)
        for path, qim, gnd in zip(query_paths, qimlist, queries)
    ]
    relevance = [(q, int(i), level) for q, gnd in enumerate(queries) for level in LEVELS for i in gnd[level]]
    full = (len(imlist), len(qimlist)) == FULL_SIZES[name]
    return Benchmark(name, database, query_items, relevance, ("easy", "medium", "hard"), {"full_set": full})
