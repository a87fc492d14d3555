"""Classic Oxford5k / Paris6k (Philbin et al. 2007, 2008), original protocol.

Released layout, ``root`` being the dataset's folder::

    jpg/<name>.jpg            the images (Paris: nested jpg/paris/<landmark>/..., any depth)
    gt/<query>_query.txt      "<image name> x0 y0 x1 y1" (Oxford names carry an
                              "oxc1_" prefix, removed); gt/ may also be lab/ or root
    gt/<query>_good.txt       image names, one per line
    gt/<query>_ok.txt
    gt/<query>_junk.txt

Database: every image (sorted by name; for Paris without the 20 images the
dataset's authors list as corrupt), query images included. Queries: the query
files in sorted order, cropped to their box. Ground-truth levels good/ok/junk;
protocol ``classic`` (positives good+ok, junk ignored). Full sets: Oxford5k
5,063 images, Paris6k 6,392, 55 queries each.
"""
from __future__ import annotations

from pathlib import Path

from mom.datasets.annotations import confined_paths, read_annotation_text
from mom.datasets.download import extract, fetch
from mom.datasets.images import FileItem
from mom.datasets.retrieval import Benchmark, checked_box, crop_origin
from mom.errors import InputError

NAMES = ("oxford5k", "paris6k")
FULL_SIZES = {"oxford5k": (5063, 55), "paris6k": (6392, 55)}
LEVELS = ("good", "ok", "junk")
PARIS_CORRUPT = frozenset({
    "paris_louvre_000136", "paris_louvre_000146", "paris_moulinrouge_000422", "paris_museedorsay_001059",
    "paris_notredame_000188", "paris_pantheon_000284", "paris_pantheon_000960", "paris_pantheon_000974",
    "paris_pompidou_000195", "paris_pompidou_000196", "paris_pompidou_000201", "paris_pompidou_000467",
    "paris_pompidou_000640", "paris_sacrecoeur_000299", "paris_sacrecoeur_000330", "paris_sacrecoeur_000353",
    "paris_triomphe_000662", "paris_triomphe_000833", "paris_triomphe_000863", "paris_triomphe_000867",
})
ARCHIVES = {
    "oxford5k": {
        "jpg": ["https://www.robots.ox.ac.uk/~vgg/data/oxbuildings/oxbuild_images.tgz"],
        "gt": ["https://www.robots.ox.ac.uk/~vgg/data/oxbuildings/gt_files_170407.tgz"],
    },
    "paris6k": {
        "jpg": ["https://www.robots.ox.ac.uk/~vgg/data/parisbuildings/paris_1.tgz",
                "https://www.robots.ox.ac.uk/~vgg/data/parisbuildings/paris_2.tgz"],
        "gt": ["https://www.robots.ox.ac.uk/~vgg/data/parisbuildings/paris_120310.tgz"],
    },
}


def ground_truth_folder(root: Path) -> Path:
    for candidate in (root / "gt", root / "lab", root):
        if candidate.is_dir() and any(candidate.glob("*_query.txt")):
            return candidate
    raise InputError(f"root: no *_query.txt files in {root}/gt, {root}/lab or {root} (the ground-truth files)")


def _image_index(root: Path, name: str) -> dict[str, Path]:
    images = root / "jpg"
    if not images.is_dir():
        raise InputError(f"root: {images} is not a directory (the dataset's images)")
    index: dict[str, Path] = {}
    for path in sorted(images.rglob("*.jpg")):
        if name == "paris6k" and path.stem in PARIS_CORRUPT:
            continue
        if path.stem in index:
            raise InputError(f"root: image name {path.stem} appears twice ({index[path.stem]}, {path})")
        index[path.stem] = path
    if not index:
        raise InputError(f"root: no .jpg images under {images}")
    confined_paths(images, [path.relative_to(images).as_posix() for path in index.values()],
                   f"the folder listing of {images}")
    return index


def _read_names(path: Path) -> list[str]:
    if not path.is_file():
        raise InputError(f"root: {path} not found (each query needs _good, _ok and _junk lists)")
    return [line.strip() for line in read_annotation_text(path).splitlines() if line.strip()]


def _parse_query(path: Path) -> tuple[str, tuple[float, float, float, float]]:
    fields = read_annotation_text(path).split()
    if len(fields) != 5:
        raise InputError(f"root: {path}: expected '<image> x0 y0 x1 y1', got {' '.join(fields)!r}")
    image = fields[0][len("oxc1_"):] if fields[0].startswith("oxc1_") else fields[0]
    try:
        box = [float(value) for value in fields[1:]]
    except ValueError:
        raise InputError(f"root: {path}: the box must be four numbers") from None
    return image, checked_box(box, f"root: {path}")


def load_classic(root: str | Path, name: str) -> Benchmark:
    root = Path(root)
    if name not in NAMES:
        raise InputError(f"source: unknown classic dataset {name!r}; allowed: {', '.join(NAMES)}")
    gt = ground_truth_folder(root)
    index = _image_index(root, name)
    stems = sorted(index)
    position = {stem: i for i, stem in enumerate(stems)}
    database = [FileItem(path=index[s], origin=index[s].relative_to(root).as_posix(), required=True) for s in stems]
    queries, relevance = [], []
    for q, query_file in enumerate(sorted(gt.glob("*_query.txt"))):
        image, box = _parse_query(query_file)
        if image not in index:
            raise InputError(f"root: {query_file} names {image}, which is not among the images")
        origin = crop_origin(index[image].relative_to(root).as_posix(), box)
        queries.append(FileItem(path=index[image], origin=origin, crop=box, required=True))
        prefix = query_file.name[: -len("_query.txt")]
        for level in LEVELS:
            for listed in _read_names(gt / f"{prefix}_{level}.txt"):
                if listed not in position:
                    if name == "paris6k" and listed in PARIS_CORRUPT:
                        continue
                    raise InputError(f"root: {gt / f'{prefix}_{level}.txt'} lists {listed}, which is not among the images")
                relevance.append((q, position[listed], level))
    full = (len(database), len(queries)) == FULL_SIZES[name]
    return Benchmark(name, database, queries, relevance, ("classic",), {"full_set": full})


def download_classic(root: Path, name: str) -> None:
    for folder, urls in ARCHIVES[name].items():
        target = root / folder
        if target.is_dir() and any(target.iterdir()):
            continue
        for url in urls:
            archive = fetch(url, root / Path(url).name)
            extract(archive, target, flatten=(folder == "gt"))
            archive.unlink()
