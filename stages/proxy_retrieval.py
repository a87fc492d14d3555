"""Stage ``proxy_retrieval``: an embedded retrieval benchmark on held-out items.

A PROXY, not Oxford/Paris (see :mod:`mom.proxy_retrieval`): on each held-out
evaluation split of ``--prepared`` (``new_images``: new images of the
collection's classes; ``new_classes``: classes the collection does not
contain), ``objects`` items each give one augmented query view and
``views_in_database`` augmented database views; a query's positives are its own
object's views. For every augmentation level (``levels``, :mod:`mom.augment`)
the views are ranked with

- ``raw_pixels``: flattened l2-normalized pixels (unless ``--no-raw_pixels``);
- ``initial``: the pretrained network of the ``extract`` stage (``backbone``,
  ``weights``, ``pooling``, ``gem_p``, ``aggregation``, ``batch_size``,
  ``device`` come from the ``extract`` section; ``scales`` from this stage's
  own section, to keep equal to ``extract.scales``; ``extract.pca_whiten`` is
  not applied: it is learned on the train split's features, which this stage
  does not read);
- ``finetuned``: ``--model`` (omitted when given as ``''``), embedded at the
  scales and aggregation its checkpoint records;
- ``finetuned_whitened``: the same, then ``--whitening`` (omitted when ``''``).

Writes ``--report`` (JSON): mAP and mP@k per split, level and descriptor, with
a ``note`` saying it is a proxy and the settings (``evaluate`` copies the mAP
of the initial and fine-tuned descriptors into the headline metrics), and,
unless ``--plots-dir ''``, the plot data ``<plots-dir>/proxy_map/<split>.json``
(one bar per level and descriptor: ``bar``, ``map``; DVC plots). Labels are
never read, so the benchmark also runs on an unlabeled held-out split.

    python -m stages.proxy_retrieval --objects 500 --model '' --whitening ''
"""
from __future__ import annotations

import logging
from pathlib import Path

import click
import numpy as np
import torch

from mom import artifacts, autosize, distributed, extraction, networks, whitening
from mom import proxy_retrieval as proxy
from mom.augment import LEVELS
from mom.backbones import BACKBONES
from mom.imagestore import ImageStore, split_written
from mom.pooling import POOLINGS
from stages._cli import AUTO_INT, StageCommand, log_auto, require, stage_command, timed

log = logging.getLogger("mom")

MAX_SCALE = 4096
EVALUATION_SPLITS = ("new_images", "new_classes")
# Short: `dvc metrics show` prints it in every row's column. The module docstrings say the rest.
NOTE = "PROXY benchmark, not Oxford/Paris: augmented views of held-out items; positives = views of the same item"


def validate(options: dict, model_path: str, whitening_path: str) -> None:
    """One-line InputError for any option out of range, before heavy work."""
    require(model_path or not whitening_path,
            "--whitening: needs --model (the whitening belongs to the fine-tuned network); give '' for neither")
    require(model_path or options["score_initial"] or options["raw_pixels"],
            "nothing to rank: --model '', --no-initial and --no-raw_pixels together")
    require(options["objects"] == 0 or options["objects"] >= 2,
            f"--objects: 0 (every item) or at least 2, got {options['objects']}")
    require(options["views_in_database"] >= 1, f"--views_in_database: at least 1, got {options['views_in_database']}")
    levels = list(options["levels"])
    require(levels and all(level in LEVELS for level in levels) and len(set(levels)) == len(levels),
            f"--levels: one or more distinct of {', '.join(LEVELS)}, got {levels}")
    ks = list(options["precision_ks"])
    require(ks and min(ks) >= 1, f"--precision_ks: one or more positive integers, got {ks}")
    scales = list(options["scales"])
    numbers = [] if len(scales) == 1 and autosize.is_auto(scales[0]) else scales
    require(scales and all(not autosize.is_auto(s) and 1 <= s <= MAX_SCALE for s in numbers)
            and len(set(scales)) == len(scales),
            f"--scales: one or more distinct sizes in 1..{MAX_SCALE} (or auto alone), got {scales}")
    require(options["backbone"] in BACKBONES, f"--backbone: one of {', '.join(BACKBONES)}, got {options['backbone']!r}")
    require(options["pooling"] in POOLINGS, f"--pooling: one of {', '.join(POOLINGS)}, got {options['pooling']!r}")
    require(options["gem_p"] > 0, f"--gem_p: must be positive, got {options['gem_p']}")
    require(options["aggregation"] in extraction.AGGREGATIONS,
            f"--aggregation: one of {', '.join(extraction.AGGREGATIONS)}, got {options['aggregation']!r}")
    require(options["batch_size"] >= 1, f"--batch_size: at least 1, got {options['batch_size']}")
    require(options["threads"] >= 0, f"--threads: 0 (torch's default) or more, got {options['threads']}")
    distributed.check_device(options["device"])


def open_split(path: Path) -> ImageStore | None:
    """The split's image store, or ``None`` (logged) when prepare wrote none or it is too small.
    ``objects`` is a cap: a smaller split gives all its items as objects."""
    if not split_written(path):
        log.info("%s: prepare wrote no such split; skipped", path)
        return None
    store = ImageStore.open(path)
    if len(store) < 2:
        log.info("%s: %d items; the benchmark needs at least 2; skipped", path, len(store))
        return None
    return store


def training_shapes(prepared: Path, stores: dict) -> np.ndarray:
    """Image shapes the auto input size is measured on: the train split's, as
    extract measures them (an evaluation split's when prepare wrote no train split)."""
    if split_written(prepared / "train"):
        return ImageStore.open(prepared / "train").shapes
    return next(iter(stores.values())).shapes


def load_finetuned(model_path: str, whitening_path: str, options: dict):
    """``(net, scales, aggregation, whitening or None)``, or ``None`` without a model."""
    if not model_path:
        return None
    net, extra = networks.load_checkpoint(model_path)
    scales, aggregation = networks.embedding_settings(extra, (), "")
    white = None
    if whitening_path:
        mean, projection, method = whitening.load_whitening(whitening_path)
        require(projection.shape[1] == net.dim,
                f"--whitening: {whitening_path} was learned for {projection.shape[1]}-d descriptors, "
                f"the model gives {net.dim}-d")
        white = (mean, projection, method)
    return net, scales, aggregation, white


def embed_views(net, images, scales, aggregation, options) -> np.ndarray:
    return extraction.embed_store(net, proxy.ViewStore(images), scales, options["batch_size"], options["device"],
                                  aggregation=aggregation, aggregation_p=options["gem_p"], progress=False)


def rounded(values: dict) -> dict:
    return {key: round(float(value), 6) for key, value in values.items()}


def evaluate_level(benchmark, initial_net, finetuned, options) -> dict:
    """Every descriptor's mAP and mP@k on one level's views."""
    positives, ks = benchmark.positives, sorted(set(options["precision_ks"]))
    result = {}

    def score(name, queries, database):
        result[name] = rounded(proxy.evaluate(queries, database, positives, ks))
        log.info("%s %s: mAP %.2f, %s", benchmark.level, name, 100 * result[name]["map"],
                 ", ".join(f"mP@{k} {100 * result[name][f'mp_at_{k}']:.2f}" for k in ks))

    if options["raw_pixels"]:
        side = _raw_side(benchmark)
        score("raw_pixels", proxy.raw_pixel_descriptors(benchmark.queries, side),
              proxy.raw_pixel_descriptors(benchmark.database, side))
    if initial_net is not None:
        views = len(benchmark.queries) + len(benchmark.database)
        with timed(f"{benchmark.level}: embedded {views} views, initial network"):
            score("initial", embed_views(initial_net, benchmark.queries, options["scales"], options["aggregation"], options),
                  embed_views(initial_net, benchmark.database, options["scales"], options["aggregation"], options))
    if finetuned is not None:
        net, scales, aggregation, white = finetuned
        with timed(f"{benchmark.level}: embedded the views, fine-tuned network"):
            queries = embed_views(net, benchmark.queries, scales, aggregation, options)
            database = embed_views(net, benchmark.database, scales, aggregation, options)
        score("finetuned", queries, database)
        if white is not None:
            mean, projection, _ = white
            score("finetuned_whitened", whitening.apply_whitening(queries, mean, projection),
                  whitening.apply_whitening(database, mean, projection))
    return result


def _raw_side(benchmark) -> int | None:
    """Native pixels when every image has one shape (views keep their item's shape), else 32 x 32 grey."""
    return None if len({image.shape for image in benchmark.queries}) == 1 else 32


@click.command(cls=StageCommand)
@click.option("--objects", type=int, default=500, show_default=True,
              help="held-out items used as objects, at most (0 = all; a smaller split gives all its items)")
@click.option("--views_in_database", type=int, default=4, show_default=True, help="database views per object")
@click.option("--levels", multiple=True, default=("strong", "mild"), show_default=True,
              help=f"augmentation levels ({', '.join(LEVELS)}); repeat the option")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="object choice and every augmentation")
@click.option("--raw_pixels/--no-raw_pixels", default=True, show_default=True, help="also rank by raw pixels")
@click.option("--initial/--no-initial", "score_initial", default=True, show_default=True,
              help="also rank by the initial network (the Table 1 grid's cells skip it: its initial row comes "
                   "from the main job's report)")
@click.option("--precision_ks", type=int, multiple=True, default=(1, 5, 10), show_default=True, help="mP@k")
@click.option("--scales", type=AUTO_INT, multiple=True, default=("auto",), show_default=True,
              help="initial network's input sizes (longer side); keep equal to extract.scales (auto: the same "
                   "rule, from the train split's images)")
@click.option("--threads", type=int, default=0, show_default=True, help="torch CPU threads (0 = torch's default)")
@click.option("--backbone", default="efficientnet_lite0", show_default=True, help="as extract.backbone")
@click.option("--weights", default="", show_default=True, help="as extract.weights ('' = the default source)")
@click.option("--pooling", default="gem", show_default=True, help="as extract.pooling")
@click.option("--gem_p", type=float, default=3.0, show_default=True, help="as extract.gem_p")
@click.option("--aggregation", default="sum", show_default=True, help="as extract.aggregation")
@click.option("--batch_size", type=int, default=128, show_default=True, help="as extract.batch_size")
@click.option("--device", default="cpu", show_default=True, help="as extract.device")
@click.option("--prepared", type=click.Path(path_type=Path), default=Path("data/prepared"), show_default=True,
              help="prepare's output: the benchmark runs on each evaluation split present (new_images, new_classes)")
@click.option("--model", "model_path", default="data/finetune/model.pt", show_default=True,
              help="fine-tuned checkpoint ('' = skip the fine-tuned rows)")
@click.option("--whitening", "whitening_path", default="data/whiten/whitening.npz", show_default=True,
              help="whitening of the fine-tuned descriptors ('' = skip)")
@click.option("--report", "report_path", type=click.Path(path_type=Path),
              default=Path("reports/proxy_retrieval.json"), show_default=True)
@click.option("--plots-dir", default="plots", show_default=True, help="where proxy_map/<split>.json goes ('' = none)")
@stage_command("proxy_retrieval")
def main(prepared: Path, model_path: str, whitening_path: str, report_path: Path, plots_dir: str, **options) -> None:
    """Proxy retrieval mAP of raw pixels, the initial and the fine-tuned network."""
    validate(options, model_path, whitening_path)
    require((prepared / "report.json").is_file(),
            f"--prepared: {prepared / 'report.json'}: file not found (not an output of prepare; run it first)")
    stores = {split: open_split(prepared / split) for split in EVALUATION_SPLITS}
    stores = {split: store for split, store in stores.items() if store is not None}
    sizes: dict = {}
    if stores:
        options["scales"] = autosize.resolve_scales("proxy_retrieval.scales", options["scales"],
                                                    lambda: training_shapes(prepared, stores), sizes)
        log_auto(sizes)
    result = header(options, model_path, whitening_path)
    if sizes:
        result["auto_sizes"] = sizes
    if not stores:
        log.warning("%s: no evaluation split (%s); nothing to benchmark", prepared, ", ".join(EVALUATION_SPLITS))
        artifacts.save_json(report_path, result | {"skipped": f"{prepared}: no evaluation split"})
        return
    finetuned = load_finetuned(model_path, whitening_path, options)
    if options["threads"]:
        torch.set_num_threads(options["threads"])
    initial_net = None
    if options["score_initial"]:
        initial_net = networks.build_network(networks.make_meta(options["backbone"], options["pooling"],
                                                                options["gem_p"]), weights=options["weights"] or None)
    describe_finetuned(result, finetuned, model_path, whitening_path)
    for split, store in stores.items():
        result[split] = benchmark_split(split, store, initial_net, finetuned, options)
    artifacts.save_json(report_path, result)
    log.info("wrote %s", report_path)
    if plots_dir:
        for split in stores:
            artifacts.save_json(Path(plots_dir) / "proxy_map" / f"{split}.json", {"proxy_map": map_bars(result[split])})


def map_bars(section: dict) -> list[dict]:
    """Plot data of one split: the mAP of every level and descriptor, one bar each."""
    return [{"bar": f"{level}: {name}", "map": entry["map"]}
            for level, descriptors in section["levels"].items() for name, entry in descriptors.items()]


def benchmark_split(split: str, store: ImageStore, initial_net, finetuned, options: dict) -> dict:
    items = proxy.select_objects(len(store), options["objects"], options["seed"])
    log.info("%s: %d objects, 1 query + %d database views each, levels %s, %d torch threads", split, len(items),
             options["views_in_database"], list(options["levels"]), torch.get_num_threads())
    section = {"objects": len(items), "queries": len(items), "database": len(items) * options["views_in_database"],
               "levels": {}}
    for level in options["levels"]:
        with timed(f"{split} {level}: augmented {len(items)} objects"):
            benchmark = proxy.build_benchmark(store, items, level, options["views_in_database"], options["seed"],
                                              progress=True)
        section["levels"][level] = evaluate_level(benchmark, initial_net, finetuned, options)
    return section


def header(options: dict, model_path: str, whitening_path: str) -> dict:
    return {
        "note": NOTE,
        "views_in_database": options["views_in_database"],
        "seed": options["seed"],
        "settings": {"initial": {key: options[key] for key in ("backbone", "pooling", "gem_p", "aggregation")}
                     | {"scales": list(options["scales"])}},
    }


def describe_finetuned(result: dict, finetuned, model_path: str, whitening_path: str) -> None:
    if finetuned is not None:
        _, scales, aggregation, white = finetuned
        result["settings"]["finetuned"] = {"model": model_path, "scales": scales, "aggregation": aggregation}
        if white is not None:
            result["settings"]["finetuned"]["whitening"] = {"file": whitening_path, "method": white[2],
                                                "dim": int(white[1].shape[0])}


if __name__ == "__main__":
    main()
