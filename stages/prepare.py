"""Stage ``prepare``: read a dataset's released layout, write packed image stores.

Writes ``<out-dir>/<split>/{manifest.parquet,pixels.npy}`` for every split of
the source (``train``, ``val``, and the held-out evaluation splits
``new_images`` — new images of the collection's classes — and ``new_classes``
— classes the collection does not contain; retrieval benchmarks and a folder
with ground truth ``query`` and ``database`` instead), ``<out-dir>/ground_truth.parquet``
for retrieval benchmarks (query, database, relevance) and
``<out-dir>/report.json`` (counts per split and class, skipped files with the
reason, the source's protocol notes).
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import click
import numpy as np
from tqdm import tqdm

from mom import artifacts, autosize
from mom.datasets import PreparedDataset
from mom.datasets.benchmarks import RETRIEVAL_SOURCES, prepare_retrieval
from mom.datasets.cars import prepare_cars
from mom.datasets.cub import prepare_cub
from mom.datasets.fashion_mnist import prepare_fashion_mnist
from mom.datasets.folder import prepare_folder
from mom.datasets.sop import prepare_sop
from mom.errors import InputError
from mom.imagestore import ImageStore, write_image_store
from stages._cli import AUTO_INT, StageCommand, require, stage_command, timed

log = logging.getLogger("mom")

CATEGORY_SOURCES = {"cub": prepare_cub, "cars196": prepare_cars, "sop": prepare_sop}
SOURCES = ("fashion-mnist", "folder", *CATEGORY_SOURCES, *RETRIEVAL_SOURCES)
# Split folders any source may write; those the chosen source does not write
# are removed so a previous run's splits never linger beside the new ones.
KNOWN_SPLITS = ("train", "val", "new_images", "new_classes", "query", "database")
STALE_SPLITS = ("test",)  # written by earlier versions; removed so no old split lingers
GROUND_TRUTH = "ground_truth.parquet"


class OptionalCount(click.ParamType):
    """A non-negative int, or ``none``/``null``/``all`` (= 0: no limit)."""

    name = "count"

    def convert(self, value, param, ctx):
        if isinstance(value, int) or value is None:
            return value or 0
        if str(value).strip().lower() in ("none", "null", "all", "~", ""):
            return 0
        try:
            return int(value)
        except ValueError:
            self.fail(f"{value!r} is not an integer or none", param, ctx)


def load_source(options: dict) -> PreparedDataset:
    """Validate the options of the chosen source and build its splits (lazily)."""
    source = options["source"]
    if source == "fashion-mnist":
        return prepare_fashion_mnist(
            options["root"],
            train_classes=options["train_classes"],
            test_classes=options["test_classes"],
            per_class=options["per_class"],
            val_per_class=options["val_per_class"],
            seed=options["seed"],
            new_images_per_class=options["new_images_per_class"],
        )
    if source == "folder":
        return prepare_folder(
            options["root"],
            test_root=options["test_root"] or None,
            labels_from_folders=options["labels_from_folders"],
            max_side=options["max_side"],
            workers=options["workers"],
            query_root=options["query_root"] or None,
            ground_truth=options["ground_truth"] or None,
            holdout=options["holdout"],
            seed=options["seed"],
        )
    if source in CATEGORY_SOURCES:
        return CATEGORY_SOURCES[source](options["root"], download=options["download"], **_file_options(options))
    if source in RETRIEVAL_SOURCES:
        return prepare_retrieval(source, options["root"], **_file_options(options), **_retrieval_options(options))
    raise InputError(f"source: unknown source {source!r}; allowed: {', '.join(SOURCES)}")


def _file_options(options: dict) -> dict:
    return {"max_side": options["max_side"], "workers": options["workers"]}


def _retrieval_options(options: dict) -> dict:
    for name in ("distractors_root", "train_root"):  # before the benchmark's (slow) file checks
        require(not options[name] or Path(options[name]).is_dir(),
                f"{name}: {options[name]} is not a directory ('' = none)")
    return {
        "distractors_root": options["distractors_root"] or None,
        "train_root": options["train_root"] or None,
        "download": options["download"],
    }


def remove_stale_outputs(out_dir: Path, keep: set[str], keep_ground_truth: bool) -> None:
    for split in KNOWN_SPLITS + STALE_SPLITS:
        folder = out_dir / split
        if split not in keep and folder.is_dir():
            shutil.rmtree(folder)
    if not keep_ground_truth:
        (out_dir / GROUND_TRUTH).unlink(missing_ok=True)


def split_counts(store: ImageStore) -> dict:
    labels = store.labels
    names = store.class_names
    values, counts = np.unique(labels[labels >= 0], return_counts=True)
    per_class = {names.get(int(label), str(int(label))): int(count) for label, count in zip(values, counts)}
    return {"count": len(store), "unlabeled": int((labels < 0).sum()), "classes": per_class}


def write_splits(dataset: PreparedDataset, out_dir: Path) -> dict:
    counts = {}
    for split, stream in dataset.splits.items():
        with timed(f"wrote split {split}"):
            images = tqdm(stream.images(), total=stream.expected, desc=f"prepare {split}", unit="img", leave=False)
            write_image_store(out_dir / split, images, stream.columns)
        store = ImageStore.open(out_dir / split)
        counts[split] = split_counts(store)
        log.info("%s: %d items (%d unlabeled)", split, counts[split]["count"], counts[split]["unlabeled"])
    return counts


@click.command(cls=StageCommand)
@click.option("--source", type=click.Choice(SOURCES), default="fashion-mnist", show_default=True,
              help="dataset layout to read")
@click.option("--root", default="/usr/share/datasets/fashion-mnist", show_default=True,
              help="directory holding the dataset (folder source: the training images)")
# No defaults for the class lists: DVC renders an empty list in params.yaml as no
# option at all, so a default here would silently replace "[]" (an error).
@click.option("--train_classes", type=int, multiple=True,
              help="fashion-mnist: classes of the unlabeled training collection, e.g. 5..9 (repeat the option)")
@click.option("--test_classes", type=int, multiple=True,
              help="fashion-mnist: classes held out of the collection (the new_classes split), e.g. 0..4 (repeat the option)")
@click.option("--per_class", type=OptionalCount(), default=1200, show_default=True,
              help="fashion-mnist: images drawn per class for train and new_classes (0 or none = all)")
@click.option("--val_per_class", type=int, default=200, show_default=True,
              help="fashion-mnist: validation images per training class, disjoint from train")
@click.option("--new_images_per_class", type=int, default=600, show_default=True,
              help="fashion-mnist: held-out images per training class from the t10k file (the new_images split)")
@click.option("--seed", type=int, default=0, show_default=True, help="seed of the per-class subsampling")
@click.option("--labels_from_folders/--no-labels_from_folders", default=False, show_default=True,
              help="folder: the first sub-folder name is the class (evaluation only)")
@click.option("--max_side", type=int, default=512, show_default=True,
              help="folder: downscale images whose longer side exceeds this (0 = keep)")
@click.option("--holdout", type=AUTO_INT, default="auto", show_default=True,
              help="folder without test_root: images of root held out as new_images, never mined or trained on "
                   "(auto: mom/autosize.py; 0 = none)")
@click.option("--test_root", default="", show_default=True,
              help="folder: optional directory of test images, split into new_images and new_classes by class (empty = none)")
@click.option("--query_root", default="", show_default=True,
              help="folder: directory of the query images named in ground_truth (empty = test_root)")
@click.option("--ground_truth", default="", show_default=True,
              help="folder: CSV/Parquet of query,database,relevance pairs for retrieval evaluation")
@click.option("--download/--no-download", default=False, show_default=True,
              help="fetch the dataset into root when missing (datasets with a stable public URL)")
@click.option("--distractors_root", default="", show_default=True,
              help="retrieval benchmarks: optional folder of distractor images appended to the database")
@click.option("--train_root", default="", show_default=True,
              help="retrieval benchmarks: folder of unlabeled training images (empty = the database images)")
@click.option("--out-dir", "out_dir", type=click.Path(file_okay=False), default="data/prepared", show_default=True)
@click.option("--workers", type=int, default=0, show_default=True,
              help="folder: decoding processes (0 = all cores); does not change the output")
@stage_command("prepare")
def main(**options):
    """Write the image stores of the train/val/test splits and report.json."""
    require(options["max_side"] >= 0, f"max_side: must be >= 0 (0 = keep the size), got {options['max_side']}")
    require(options["workers"] >= 0, f"--workers: must be >= 0 (0 = all cores), got {options['workers']}")
    require(options["seed"] >= 0, f"seed: must be an integer >= 0, got {options['seed']}")
    require(autosize.is_auto(options["holdout"]) or options["holdout"] >= 0,
            f"holdout: must be >= 0 (0 = none) or auto, got {options['holdout']}")
    options["workers"] = options["workers"] or os.cpu_count() or 1
    out_dir = Path(options.pop("out_dir"))
    dataset = load_source(options)
    remove_stale_outputs(out_dir, set(dataset.splits), dataset.ground_truth is not None)
    counts = write_splits(dataset, out_dir)
    if dataset.rejected:
        log.warning("skipped %d files (listed in %s)", len(dataset.rejected), out_dir / "report.json")
    if counts.get("train", {}).get("count", 1) == 0:
        raise InputError(f"root: {options['root']} holds no readable image ({len(dataset.rejected)} files skipped)")
    if dataset.ground_truth is not None:
        table = dataset.ground_truth() if callable(dataset.ground_truth) else dataset.ground_truth
        artifacts.save_parquet(out_dir / GROUND_TRUTH, table)
    report = {"source": dataset.source, "splits": counts, **dataset.info,
              "rejected_count": len(dataset.rejected),
              "rejected": sorted(dataset.rejected, key=lambda entry: (entry.get("split", ""), entry["path"]))}
    artifacts.save_json(out_dir / "report.json", report)


if __name__ == "__main__":
    main()
