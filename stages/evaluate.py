"""Stage ``evaluate``: the initial features and the fine-tuned network, side by side
(method.md section 8).

Fine-grained protocol (the ``test`` split, held-out classes, labels used here
only): Recall@K and NMI of k-means, for the initial features
(``<features>/test.npy``) and for the fine-tuned network (``--model``, test
images embedded at ``scales``, then ``--whitening`` applied).
Retrieval protocol (when ``<prepared>/ground_truth.parquet`` and the ``query``
and ``database`` splits exist): mAP and mP@k per protocol whose levels the
ground truth uses (revisited Easy/Medium/Hard, classic, positive), junk ignored.

Writes ``--metrics`` (JSON, DVC metrics) and PNG figures in ``--plots-dir``:
``recall_at_k.png`` (initial vs fine-tuned) and ``training.png`` (the
fine-tuning log's curves).
"""
from __future__ import annotations

import csv
import logging
from pathlib import Path

import click
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mom import artifacts, extraction, metrics, networks, whitening  # noqa: E402
from mom.datasets.retrieval import PROTOCOLS, protocol_lists  # noqa: E402
from mom.imagestore import ImageStore  # noqa: E402
from stages._cli import StageCommand, require, stage_command, timed  # noqa: E402

log = logging.getLogger("mom")

GROUND_TRUTH = "ground_truth.parquet"


def fine_grained_metrics(embeddings: np.ndarray, labels: np.ndarray, ks, seed: int, n_init: int) -> dict:
    recalls = metrics.recall_at_k(embeddings, labels, ks)
    result = {f"recall_at_{k}": value for k, value in recalls.items()}
    result["nmi"] = metrics.nmi_kmeans(embeddings, labels, len(np.unique(labels)), seed, n_init)
    return result


def retrieval_metrics(queries: np.ndarray, database: np.ndarray, table, protocols, precision_ks) -> dict:
    rankings = metrics.rank_database(queries, database)
    result = {}
    for protocol in protocols:
        lists = protocol_lists(table, len(queries), protocol)
        positives, junk = [p for p, _ in lists], [j for _, j in lists]
        average = metrics.mean_average_precision(rankings, positives, junk)
        entry = {"map": average["map"], "queries": average["n_queries"]}
        precision = metrics.mean_precision_at_k(rankings, positives, junk, precision_ks)
        entry.update({f"mp_at_{k}": value for k, value in precision.items()})
        result[protocol] = entry
    return result


def protocols_in(table) -> list[str]:
    """Protocols whose positive levels occur in the ground truth, in PROTOCOLS order."""
    levels = set(table.column("relevance").to_pylist())
    return [name for name, (positive, _) in PROTOCOLS.items() if levels & set(positive)]


def read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)}
                for row in csv.DictReader(handle, delimiter="\t")]


def recall_figure(ks, initial: dict, finetuned: dict):
    figure, axis = plt.subplots(figsize=(4.5, 3.2))
    for label, values, marker in (("initial", initial, "o"), ("fine-tuned", finetuned, "s")):
        axis.plot(ks, [100 * values[f"recall_at_{k}"] for k in ks], marker=marker, label=label)
    axis.set_xscale("log", base=2)
    axis.set_xticks(ks, [str(k) for k in ks])
    axis.set_xlabel("K")
    axis.set_ylabel("Recall@K (%)")
    axis.set_title("test classes")
    axis.grid(alpha=0.3)
    axis.legend()
    return figure


def training_figure(rows: list[dict]):
    series = [("loss", "loss"), ("active", "tuples with loss > 0"), ("val_recall_at_1", "val Recall@1")]
    series = [(key, title) for key, title in series if any(key in row for row in rows)]
    figure, axes = plt.subplots(1, len(series), figsize=(3.4 * len(series), 3.0), squeeze=False)
    for axis, (key, title) in zip(axes[0], series):
        points = [(row["epoch"], row[key]) for row in rows if key in row]
        axis.plot(*zip(*points), marker=".")
        axis.set_xlabel("epoch")
        axis.set_title(title)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def embed(net, store, mean, projection, options) -> np.ndarray:
    raw = extraction.embed_store(net, store, scales=options["scales"], batch_size=options["batch_size"],
                                 aggregation=options["aggregation"])
    return whitening.apply_whitening(raw, mean, projection)


def load_initial(path: Path, n: int) -> np.ndarray:
    features = artifacts.load_npy(path)
    require(features.ndim == 2 and len(features) == n,
            f"{path}: expected {n} rows (one per item of the split), got shape {features.shape}")
    return features




@click.command(cls=StageCommand)
@click.option("--model", "model_path", type=click.Path(path_type=Path), default="data/finetune/model.pt", show_default=True)
@click.option("--whitening", "whitening_path", type=click.Path(path_type=Path), default="data/whiten/whitening.npz",
              show_default=True)
@click.option("--prepared", type=click.Path(path_type=Path), default="data/prepared", show_default=True)
@click.option("--features", "features_dir", type=click.Path(path_type=Path), default="data/features", show_default=True)
@click.option("--finetune-log", "log_path", type=click.Path(path_type=Path), default="data/finetune/log.tsv",
              show_default=True)
@click.option("--metrics", "metrics_path", type=click.Path(path_type=Path), default="metrics/evaluate.json",
              show_default=True)
@click.option("--plots-dir", type=click.Path(path_type=Path), default="plots", show_default=True)
@click.option("--ks", type=int, multiple=True, default=(1, 2, 4, 8), show_default=True, help="Recall@K")
@click.option("--kmeans_seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--kmeans_n_init", type=int, default=10, show_default=True)
@click.option("--precision_ks", type=int, multiple=True, default=(1, 5, 10), show_default=True, help="mP@k")
@click.option("--scales", type=int, multiple=True, default=(),
              help="Longer image side(s) when embedding (default: those recorded in the model).")
@click.option("--aggregation", default="", help="Multi-scale aggregation: sum | gem (default: the model's).")
@click.option("--batch_size", type=int, default=128, show_default=True)
@stage_command("evaluate")
def main(model_path, whitening_path, prepared, features_dir, log_path, metrics_path, plots_dir, **options):
    ks = sorted(set(options["ks"]))
    require(ks and ks[0] >= 1, f"ks: need positive integers, got {list(options['ks'])}")
    require(options["kmeans_n_init"] >= 1, f"kmeans_n_init: must be >= 1, got {options['kmeans_n_init']}")
    require(options["precision_ks"] and min(options["precision_ks"]) >= 1,
            f"precision_ks: need positive integers, got {list(options['precision_ks'])}")
    require(options["batch_size"] >= 1, f"batch_size: must be >= 1, got {options['batch_size']}")
    net, extra = networks.load_checkpoint(model_path)
    options["scales"], options["aggregation"] = networks.embedding_settings(extra, options["scales"], options["aggregation"])
    mean, projection, method = whitening.load_whitening(whitening_path)
    require(projection.shape[1] == net.dim,
            f"{whitening_path}: learned for {projection.shape[1]}-d descriptors, the model gives {net.dim}-d")

    result: dict = {"scales": options["scales"], "aggregation": options["aggregation"], "whitening": {"method": method, "dim": int(projection.shape[0])}}
    test_dir = prepared / "test"
    if (test_dir / "manifest.parquet").is_file() and len(test_store := ImageStore.open(test_dir)):
        result["test"] = evaluate_fine_grained(test_store, features_dir / "test.npy", net, mean, projection, ks, options)
    ground_truth = prepared / GROUND_TRUTH
    if ground_truth.is_file():
        result["retrieval"] = evaluate_retrieval(prepared, features_dir, ground_truth, net, mean, projection, options)
    require("test" in result or "retrieval" in result,
            f"{prepared}: neither a labeled test split nor {GROUND_TRUTH}: nothing to evaluate")
    artifacts.save_json(metrics_path, result)

    if "test" in result:
        artifacts.save_figure(plots_dir / "recall_at_k.png",
                              recall_figure(ks, result["test"]["initial"], result["test"]["finetuned"]))
    rows = read_log(log_path)
    if rows:
        artifacts.save_figure(plots_dir / "training.png", training_figure(rows))
    plt.close("all")


def evaluate_fine_grained(store, initial_path, net, mean, projection, ks, options) -> dict:
    labels = store.labels
    require((labels >= 0).all(), f"{store.folder}: every test item needs a label for Recall@K / NMI")
    classes = len(np.unique(labels))
    require(classes >= 2, f"{store.folder}: the test split has {classes} class; Recall@K/NMI need two or more")
    seed, n_init = options["kmeans_seed"], options["kmeans_n_init"]
    section = {"items": len(store), "classes": classes,
               "kmeans": metrics.kmeans_description(classes, seed, n_init)}
    initial = load_initial(initial_path, len(store))
    with timed("initial features: Recall@K, NMI"):
        section["initial"] = fine_grained_metrics(initial, labels, ks, seed, n_init)
    with timed(f"embedded {len(store)} test items with the fine-tuned network"):
        finetuned = embed(net, store, mean, projection, options)
    with timed("fine-tuned: Recall@K, NMI"):
        section["finetuned"] = fine_grained_metrics(finetuned, labels, ks, seed, n_init)
    for name in ("initial", "finetuned"):
        log.info("%s: %s", name, ", ".join(f"{k} {100 * v:.2f}" for k, v in section[name].items()))
    return section


def evaluate_retrieval(prepared, features_dir, ground_truth, net, mean, projection, options) -> dict:
    table = artifacts.load_parquet(ground_truth)
    queries, database = ImageStore.open(prepared / "query"), ImageStore.open(prepared / "database")
    protocols = protocols_in(table)
    require(protocols, f"{ground_truth}: no relevance level that any protocol counts as positive")
    section = {"queries": len(queries), "database": len(database), "protocols": protocols}
    precision_ks = sorted(set(options["precision_ks"]))
    if (features_dir / "query.npy").is_file() and (features_dir / "database.npy").is_file():
        section["initial"] = retrieval_metrics(load_initial(features_dir / "query.npy", len(queries)),
                                               load_initial(features_dir / "database.npy", len(database)),
                                               table, protocols, precision_ks)
    with timed("embedded queries and database with the fine-tuned network"):
        query_embeddings = embed(net, queries, mean, projection, options)
        database_embeddings = embed(net, database, mean, projection, options)
    section["finetuned"] = retrieval_metrics(query_embeddings, database_embeddings, table, protocols, precision_ks)
    return section


if __name__ == "__main__":
    main()
