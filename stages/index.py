"""Stage ``index``: make the collection searchable with what was learned (``python -m stages.search`` asks).

Embeds every split of ``--splits`` that ``prepare`` wrote with the fine-tuned
network (``--model``, at the scales its checkpoint records, then the whitening
``--whitening``: exactly as ``evaluate`` embeds) and puts the embeddings in an
exact faiss inner-product index; a second index holds the initial features that
``extract`` wrote (``<features>/<split>.npy``, not recomputed). Splits that
``prepare`` did not write, or wrote empty, are skipped with a log line.

Writes in ``--out-dir``:
- ``finetuned.faiss``, ``initial.faiss``: row r of both = the same item;
- ``items.parquet``: ``row, split, item`` (manifest id), ``origin``;
- ``index.json``: what was indexed, and how to embed a query file the same way
  with both networks: the initial network's extract settings (``--backbone``,
  ``--weights``, ``--pooling``, ``--gem_p``, ``--aggregation``, ``--pca_whiten``;
  the scales extract used, read from ``<features>/report.json``), the
  fine-tuned model's embedding settings and the SHA-256 of the model and the
  whitening (a later search refuses a model that changed since), and
  ``max_side``: how ``prepare`` downscales a file (``prepare.max_side``).
"""
from __future__ import annotations

import logging
from pathlib import Path

import click
import numpy as np
import torch

from mom import artifacts, extraction, networks, search, whitening
from mom.artifacts import arrays, reports
from mom.backbones import BACKBONES
from mom.imagestore import ImageStore, split_written
from mom.pooling import POOLINGS
from stages._cli import StageCommand, require, stage_command, timed

log = logging.getLogger("mom")

DEFAULT_SPLITS = ("train", "new_images", "new_classes", "database")
INDEX_FILES = {"finetuned": "finetuned.faiss", "initial": "initial.faiss"}
ITEMS_FILE = "items.parquet"
SUMMARY_FILE = "index.json"


def validate(options: dict) -> None:
    splits = options["splits"]
    require(len(splits) > 0, "splits: name at least one split to index")
    require(len(set(splits)) == len(splits), f"splits: names must be distinct, got {list(splits)}")
    require(options["batch_size"] >= 1, f"batch_size: must be >= 1, got {options['batch_size']}")
    require(options["threads"] >= 0, f"threads: must be 0 (torch's default) or more, got {options['threads']}")
    require(options["gem_p"] > 0, f"gem_p: must be positive, got {options['gem_p']}")
    require(options["max_side"] >= 0, f"max_side: must be >= 0 (0 = keep the size), got {options['max_side']}")


def open_splits(prepared: Path, names) -> dict[str, ImageStore]:
    """The non-empty image stores among ``names``, in that order; a log line for each one skipped."""
    stores = {}
    for name in names:
        if not split_written(prepared / name):
            log.info("%s: not in %s, skipped", name, prepared)
        elif len(store := ImageStore.open(prepared / name)) == 0:
            log.info("%s: no items, skipped", name)
        else:
            stores[name] = store
    require(stores, f"splits: none of {', '.join(names)} holds items in {prepared} (run the prepare stage first)")
    return stores


def extract_scales(features_dir: Path, options: dict) -> list[int]:
    """The scales ``extract`` used, from its report, after checking its network is the one named by the options."""
    path = features_dir / "report.json"
    recorded = reports.read_extract_report(path)
    for key in ("backbone", "pooling"):
        require(recorded.get(key) == options[key], f"{path}: features extracted with {key} {recorded.get(key)!r}, "
                                                   f"the options say {options[key]!r} (rerun extract)")
    return recorded["scales"]


def initial_features(features_dir: Path, stores: dict[str, ImageStore]) -> np.ndarray:
    parts = []
    for name, store in stores.items():
        path = features_dir / f"{name}.npy"
        parts.append(arrays.read_features(path, n_items=len(store), check_finite=True, owner=f"split {name}"))
    return np.concatenate(parts).astype(np.float32, copy=False)


def finetuned_embeddings(model_path: Path, whitening_path: Path, stores: dict[str, ImageStore],
                         batch_size: int) -> tuple[np.ndarray, dict]:
    """Every store's items embedded as ``evaluate`` does, and the settings that did it."""
    net, extra = networks.load_checkpoint(model_path)
    scales, aggregation = networks.embedding_settings(extra, (), "")
    mean, projection, method = whitening.load_whitening(whitening_path)
    require(projection.shape[1] == net.dim,
            f"{whitening_path}: learned for {projection.shape[1]}-d descriptors, the model gives {net.dim}-d")
    parts = []
    for name, store in stores.items():
        with timed(f"{name}: embedded {len(store)} items with the fine-tuned network"):
            raw = extraction.embed_store(net, store, scales=scales, batch_size=batch_size, aggregation=aggregation)
            parts.append(whitening.apply_whitening(raw, mean, projection))
    settings = {"scales": scales, "aggregation": aggregation, "model_sha256": search.file_sha256(model_path),
                "whitening": {"method": method, "dim": int(projection.shape[0]),
                              "sha256": search.file_sha256(whitening_path)}}
    return np.concatenate(parts), settings


@click.command(cls=StageCommand)
@click.option("--splits", multiple=True, default=DEFAULT_SPLITS, show_default=True,
              help="splits to index, when prepare wrote them (repeat the option)")
@click.option("--batch_size", type=int, default=128, show_default=True)
@click.option("--threads", type=int, default=0, show_default=True, help="torch CPU threads (0 = torch's default)")
@click.option("--backbone", type=click.Choice(BACKBONES), default="efficientnet_lite0", show_default=True,
              help="extract's backbone (the initial network)")
@click.option("--weights", default="", help="extract's weights file ('' = the backbone's default source)")
@click.option("--pooling", type=click.Choice(POOLINGS), default="gem", show_default=True, help="extract's pooling")
@click.option("--gem_p", type=float, default=3.0, show_default=True, help="extract's GeM exponent")
@click.option("--aggregation", type=click.Choice(extraction.AGGREGATIONS), default="sum", show_default=True,
              help="extract's multi-scale aggregation")
@click.option("--pca_whiten", type=bool, default=False, show_default=True,
              help="whether extract PCA-whitened the initial features (true/false)")
@click.option("--max_side", type=int, default=512, show_default=True,
              help="prepare's max_side: how a query file is downscaled before embedding")
@click.option("--model", "model_path", type=click.Path(path_type=Path), default="data/finetune/model.pt",
              show_default=True)
@click.option("--whitening", "whitening_path", type=click.Path(path_type=Path),
              default="data/whiten/whitening.npz", show_default=True)
@click.option("--prepared", type=click.Path(path_type=Path), default="data/prepared", show_default=True)
@click.option("--features", "features_dir", type=click.Path(path_type=Path), default="data/features",
              show_default=True)
@click.option("--out-dir", type=click.Path(path_type=Path), default="data/index", show_default=True)
@stage_command("index")
def main(model_path, whitening_path, prepared, features_dir, out_dir, **options):
    """Index the collection with the fine-tuned network and with the initial features."""
    validate(options)
    if options["threads"]:
        torch.set_num_threads(options["threads"])
    stores = open_splits(prepared, options["splits"])
    scales = extract_scales(features_dir, options)
    initial = initial_features(features_dir, stores)
    finetuned, finetuned_settings = finetuned_embeddings(model_path, whitening_path, stores, options["batch_size"])

    with timed(f"built exact inner-product indexes of {len(finetuned)} items"):
        indexes = {"finetuned": search.build_index(finetuned), "initial": search.build_index(initial)}
    for name, index in indexes.items():
        search.save_index(out_dir / INDEX_FILES[name], index)
    search.save_items(out_dir / ITEMS_FILE, search.items_table(
        [name for name, store in stores.items() for _ in range(len(store))],
        np.concatenate([np.arange(len(store)) for store in stores.values()]),
        [origin for store in stores.values() for origin in store.origins]))
    initial_settings = {key: options[key] for key in ("backbone", "weights", "pooling", "gem_p", "aggregation",
                                                      "pca_whiten")}
    artifacts.save_json(out_dir / SUMMARY_FILE, {
        "items": len(finetuned),
        "splits": {name: len(store) for name, store in stores.items()},
        "skipped": [name for name in options["splits"] if name not in stores],
        "max_side": options["max_side"],
        "finetuned": {"index": INDEX_FILES["finetuned"], "dim": int(finetuned.shape[1]), **finetuned_settings},
        "initial": {"index": INDEX_FILES["initial"], "dim": int(initial.shape[1]), "scales": scales,
                    **initial_settings},
    })
    log.info("indexed %s in %s", ", ".join(f"{name} ({len(store)})" for name, store in stores.items()), out_dir)


if __name__ == "__main__":
    main()
