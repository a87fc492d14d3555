"""INSTRE (Wang and Jiang 2015) with the query/database split of Iscen et al.
(CVPR 2017) that the diffusion and Mining-on-Manifolds papers evaluate on::

    gnd_instre.mat    imlist (1 x 27,293 cell of relative image paths),
                      qimlist (1 x 1,250 cell), gnd (1 x 1,250 struct):
                      ok = 1-based indices into imlist, bbx = the query box
    INSTRE-S1/..., INSTRE-S2/..., INSTRE-M/...   the images, paths as in imlist

The box is read as ``(x, y, width, height)`` (the format of INSTRE's per-image
box files) and applied as the crop ``(x, y, x + width, y + height)``. Ground
truth: ``ok`` images ``positive``; protocol ``positive``. The MATLAB file is
read with scipy (no pickle). No stable download address.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io

from mom.datasets.annotations import confined_paths
from mom.datasets.images import FileItem
from mom.datasets.retrieval import Benchmark, checked_box, crop_origin
from mom.errors import InputError

SOURCE = "instre"
GROUND_TRUTH = "gnd_instre.mat"
FULL_SIZES = (27293, 1250)


def _names(cell) -> list[str]:
    return [str(np.asarray(name).ravel()[0]) for name in np.atleast_1d(cell)]


def load_instre(root: str | Path) -> Benchmark:
    root = Path(root)
    path = root / GROUND_TRUTH
    if not path.is_file():
        raise InputError(f"root: {path} not found (the INSTRE split of Iscen et al.)")
    try:
        mat = scipy.io.loadmat(path, squeeze_me=True)
        imlist, qimlist = _names(mat["imlist"]), _names(mat["qimlist"])
        gnd = np.atleast_1d(mat["gnd"])
        oks = [np.atleast_1d(np.asarray(entry, dtype=np.float64)) for entry in gnd["ok"]]
        boxes = [np.asarray(entry, dtype=np.float64).ravel() for entry in gnd["bbx"]]
    except Exception as error:  # noqa: BLE001 - any failure on an untrusted file is one line
        raise InputError(f"root: {path} is not the INSTRE ground truth ({type(error).__name__}: {error})") from None
    if len(gnd) != len(qimlist):
        raise InputError(f"root: {path}: gnd has {len(gnd)} entries for {len(qimlist)} queries")
    database = [FileItem(path=image, origin=name, required=True)
                for image, name in zip(confined_paths(root, imlist, path), imlist)]
    query_paths = confined_paths(root, qimlist, path)
    queries, relevance = [], []
    for q, (name, image, ok, box) in enumerate(zip(qimlist, query_paths, oks, boxes)):
        where = f"root: {path}: gnd[{q}]"
        if box.shape != (4,):
            raise InputError(f"{where}: bbx must be (x, y, width, height)")
        crop = checked_box([box[0], box[1], box[0] + box[2], box[1] + box[3]], where)
        if ok.size and (ok.min() < 1 or ok.max() > len(imlist) or not np.all(ok == np.round(ok))):
            raise InputError(f"{where}: ok must be 1-based indices into imlist (1..{len(imlist)})")
        queries.append(FileItem(path=image, origin=crop_origin(name, crop), crop=crop, required=True))
        relevance += [(q, int(i) - 1, "positive") for i in ok]
    full = (len(database), len(queries)) == FULL_SIZES
    return Benchmark(SOURCE, database, queries, relevance, ("positive",), {"full_set": full, "box_format": "x y w h"})
