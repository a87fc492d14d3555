"""Stage ``evaluate``: the initial features and the fine-tuned network, side by side
(docs/method.md section 8).

Two evaluations of the embedding, each on a held-out split that nothing was
chosen on (labels used here only):

- ``new_images``: new images of the collection's own classes (the case the
  method exists for: a better embedding of the collection's domain);
- ``new_classes``: classes the collection does not contain (the zero-shot
  protocol of CUB-200-2011 in the paper).

Each reports Recall@K, and NMI and pairwise F1 of one k-means clustering, for the initial features
(``<features>/<split>.npy``), the untrained start of fine-tuning (``--start``:
the network before its first step, head initialized) and the fine-tuned network
(``--model``, images embedded at ``scales``, then ``--whitening`` applied).
Retrieval protocol (when ``<prepared>/ground_truth.parquet`` and the ``query``
and ``database`` splits exist): mAP and mP@k per protocol whose levels the
ground truth uses (revisited Easy/Medium/Hard, classic, positive), junk ignored.

Writes ``--report`` (JSON: every number, with the settings and counts behind
them), ``--metrics`` (JSON, the headline DVC metrics: per evaluation Recall@1,
Recall@<largest K>, NMI and F1 of the initial features and the fine-tuned network,
mAP per retrieval protocol, and the proxy retrieval mAP per split and level
read from ``--proxy-report``; :func:`mom.report.headline`) and, in
``--plots-dir``, the plot data ``recall_at_k/<split>.json`` (one row per K:
``k``, ``initial``, ``start``, ``finetuned``; DVC plots) and PNG figures for
offline reading: ``recall_at_k.png`` (one panel per evaluation) and
``training.png`` (the fine-tuning log's curves, :mod:`mom.training_log`).
"""
from __future__ import annotations

import logging
from pathlib import Path

import click
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from mom import artifacts, extraction, label_free, metrics, networks, prefix_cache, whitening  # noqa: E402
from mom.artifacts import arrays, reports, tables  # noqa: E402
from mom.report import headline  # noqa: E402
from mom.training_log import read_training_log  # noqa: E402
from mom.datasets.retrieval import PROTOCOLS, RELEVANCE_LEVELS, protocol_lists  # noqa: E402
from mom.imagestore import ImageStore, split_written  # noqa: E402
from stages._cli import StageCommand, require, stage_command, timed  # noqa: E402

log = logging.getLogger("mom")

GROUND_TRUTH = "ground_truth.parquet"
EVALUATIONS = {  # split -> what it measures (figure titles, logs)
    "new_images": "new images of the collection's classes",
    "new_classes": "unseen classes",
}
EMBEDDINGS = {"initial": ("initial features", "o"), "start": ("untrained start", "^"), "finetuned": ("fine-tuned", "s")}


def fine_grained_metrics(embeddings: np.ndarray, labels: np.ndarray, ks, seed: int, n_init: int) -> dict:
    recalls = metrics.recall_at_k(embeddings, labels, ks)
    result = {f"recall_at_{k}": value for k, value in recalls.items()}
    clusters = metrics.kmeans_clusters(embeddings, len(np.unique(labels)), seed, n_init)
    result["nmi"] = metrics.clustering_nmi(labels, clusters)
    result["f1"] = metrics.clustering_f1(labels, clusters)
    return result


def retrieval_metrics(queries: np.ndarray, database: np.ndarray, table, protocols, precision_ks) -> dict:
    ground_truth = {}
    for protocol in protocols:
        lists = protocol_lists(table, len(queries), protocol)
        ground_truth[protocol] = ([positives for positives, _ in lists], [junk for _, junk in lists])
    scores = metrics.protocol_evaluation(metrics.rank_database(queries, database), ground_truth, precision_ks)
    return {protocol: {"map": entry["map"], "queries": entry["n_queries"],
                       **{f"mp_at_{k}": value for k, value in entry["mp_at_k"].items()}}
            for protocol, entry in scores.items()}


def protocols_in(table) -> list[str]:
    """Protocols whose positive levels occur in the ground truth, in PROTOCOLS order."""
    levels = set(table.column("relevance").to_pylist())
    return [name for name, (positive, _) in PROTOCOLS.items() if levels & set(positive)]


def recall_series(ks, section: dict) -> list[dict]:
    """Plot data of one evaluation: per K the Recall@K of every embedding it reports."""
    return [{"k": k, **{name: section[name][f"recall_at_{k}"] for name in EMBEDDINGS if name in section}} for k in ks]


def recall_figure(ks, sections: dict[str, dict]):
    """One panel per evaluation: Recall@K of every embedding it reports."""
    figure, axes = plt.subplots(1, len(sections), figsize=(4.5 * len(sections), 3.4), squeeze=False)
    for axis, (split, section) in zip(axes[0], sections.items()):
        for name, (label, marker) in EMBEDDINGS.items():
            if name in section:
                axis.plot(ks, [100 * section[name][f"recall_at_{k}"] for k in ks], marker=marker, label=label)
        axis.set_xscale("log", base=2)
        axis.set_xticks(ks, [str(k) for k in ks])
        axis.set_xlabel("K")
        axis.set_title(f"{EVALUATIONS[split]}\n({split}, {section['items']} images)", fontsize=10)
        axis.set_ylabel("Recall@K (%)")
        axis.grid(alpha=0.3)
    axes[0][-1].legend()
    figure.tight_layout()
    return figure


def label_free_figure(result: dict, proxy: dict | None):
    """Without labels: per held-out split, the label-free measures of the initial
    features and the fine-tuned network side by side (bars, %)."""
    splits = sorted(set(result.get("label_free", {})) | {s for s in EVALUATIONS if proxy and s in proxy})
    figure, axes = plt.subplots(1, max(1, len(splits)), figsize=(5.5 * max(1, len(splits)), 3.4), squeeze=False)
    for axis, split in zip(axes[0], splits):
        names, values = [], {"initial": [], "finetuned": []}
        section = result.get("label_free", {}).get(split)
        if section:
            key = f"manifold_agreement_at_{section['k']}"
            names.append(f"manifold agreement@{section['k']}")
            for version in values:
                values[version].append(section[version][key])
        for level, entry in ((proxy or {}).get(split, {}).get("levels") or {}).items():
            names.append(f"proxy mAP, {level}")
            values["initial"].append(entry["initial"]["map"])
            values["finetuned"].append(entry.get("finetuned_whitened", entry.get("finetuned", {})).get("map", np.nan))
        positions = np.arange(len(names))
        for offset, (version, label) in zip((-0.2, 0.2), (("initial", "initial features"), ("finetuned", "fine-tuned"))):
            axis.barh(positions + offset, [100 * value for value in values[version]], height=0.4, label=label)
        axis.set_yticks(positions, names)
        axis.set_xlabel("% (initial vs fine-tuned; docs/stages.md, evaluate)")
        axis.set_title(f"held-out images ({split}), no labels: label-free measures", fontsize=10)
        axis.grid(alpha=0.3, axis="x")
        axis.legend(fontsize=8)
    if not splits:
        axes[0][0].text(0.5, 0.5, result.get("evaluations", "nothing to evaluate"), ha="center", va="center",
                        wrap=True, fontsize=8)
        axes[0][0].set_axis_off()
    figure.tight_layout()
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
    if options["prefix_cache"]:
        raw = prefix_cache.embed_split(options["prefix_cache"], net, store, options["scales"], options["batch_size"])
    else:
        raw = extraction.embed_store(net, store, scales=options["scales"], batch_size=options["batch_size"],
                                     aggregation=options["aggregation"])
    return raw if projection is None else whitening.apply_whitening(raw, mean, projection)


def load_initial(path: Path, n: int) -> np.ndarray:
    return arrays.read_features(path, n_items=n, check_finite=True, owner="its split")




@click.command(cls=StageCommand)
@click.option("--model", "model_path", type=click.Path(path_type=Path), default="data/finetune/model.pt", show_default=True)
@click.option("--start", "start_path", type=click.Path(path_type=Path), default="data/finetune/start.pt",
              show_default=True, help="the untrained start of fine-tuning ('' = not evaluated)")
@click.option("--whitening", "whitening_path", type=click.Path(path_type=Path), default="data/whiten/whitening.npz",
              show_default=True)
@click.option("--prepared", type=click.Path(path_type=Path), default="data/prepared", show_default=True)
@click.option("--features", "features_dir", type=click.Path(path_type=Path), default="data/features", show_default=True)
@click.option("--finetune-log", "log_path", type=click.Path(path_type=Path), default="data/finetune/live",
              show_default=True, help="the fine-tuning log (DVCLive folder) drawn in training.png ('' = none)")
@click.option("--report", "report_path", type=click.Path(path_type=Path), default="reports/evaluate.json",
              show_default=True, help="every number, with settings and counts")
@click.option("--metrics", "metrics_path", default="metrics/evaluate.json", show_default=True,
              help="the headline metrics ('' = not written)")
@click.option("--proxy-report", "proxy_path", default="reports/proxy_retrieval.json", show_default=True,
              help="the proxy_retrieval report whose mAP per level joins the headline ('' = none)")
@click.option("--plots-dir", type=click.Path(path_type=Path), default="plots", show_default=True)
@click.option("--ks", type=int, multiple=True, default=(1, 2, 4, 8), show_default=True, help="Recall@K")
@click.option("--kmeans_seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--kmeans_n_init", type=int, default=10, show_default=True)
@click.option("--precision_ks", type=int, multiple=True, default=(1, 5, 10), show_default=True, help="mP@k")
@click.option("--scales", type=int, multiple=True, default=(),
              help="Longer image side(s) when embedding (default: those recorded in the model).")
@click.option("--aggregation", default="", help="Multi-scale aggregation: sum | gem (default: the model's).")
@click.option("--batch_size", type=int, default=128, show_default=True)
@click.option("--prefix-cache", "prefix_cache", default="", show_default=True,
              help="Folder of the prefix stage: embed from the frozen prefix's outputs there ('' = from pixels).")
@click.option("--initial/--no-initial", "score_initial", default=True, show_default=True,
              help="score the initial features on labelled splits and retrieval (the Table 1 grid's cells "
                   "skip them: its initial row comes from the main job's report)")
@stage_command("evaluate")
def main(model_path, start_path, whitening_path, prepared, features_dir, log_path, report_path, metrics_path, proxy_path,
         plots_dir, **options):
    ks = sorted(set(options["ks"]))
    require(ks and ks[0] >= 1, f"ks: need positive integers, got {list(options['ks'])}")
    require(options["kmeans_n_init"] >= 1, f"kmeans_n_init: must be >= 1, got {options['kmeans_n_init']}")
    require(options["precision_ks"] and min(options["precision_ks"]) >= 1,
            f"precision_ks: need positive integers, got {list(options['precision_ks'])}")
    require(options["batch_size"] >= 1, f"batch_size: must be >= 1, got {options['batch_size']}")
    proxy = reports.read_proxy_report(proxy_path) if proxy_path else None
    rows = read_training_log(log_path) if str(log_path) not in ("", ".") else []
    net, extra = networks.load_checkpoint(model_path)
    options["scales"], options["aggregation"] = networks.embedding_settings(extra, options["scales"], options["aggregation"])
    mean, projection, method = whitening.load_whitening(whitening_path)
    require(projection.shape[1] == net.dim,
            f"{whitening_path}: learned for {projection.shape[1]}-d descriptors, the model gives {net.dim}-d")
    start_net = load_start(start_path, net) if str(start_path) not in ("", ".") else None

    result: dict = {"scales": options["scales"], "aggregation": options["aggregation"],
                    "whitening": {"method": method, "dim": int(projection.shape[0])}, "training": training_record(extra)}
    networks_to_score = {"finetuned": (net, mean, projection)}
    if start_net is not None:  # before training there is no whitening learned for it
        networks_to_score["start"] = (start_net, None, None)
    labeled, unlabeled, ran = read_splits(prepared, features_dir)  # every input is read before the first embedding
    ground_truth = prepared / GROUND_TRUTH
    retrieval = read_retrieval_inputs(prepared, features_dir, ground_truth) if ground_truth.is_file() else None
    for split, (store, initial) in labeled.items():
        result[split] = evaluate_fine_grained(split, store, initial, networks_to_score, ks, options)
    for split, (store, initial) in unlabeled.items():
        with timed(f"{split}: label-free measures of {len(store)} held-out images"):
            result.setdefault("label_free", {})[split] = label_free.measures(
                initial, embed(net, store, mean, projection, options))
        log.info("%s, label-free: %s", EVALUATIONS[split], result["label_free"][split])
    if retrieval is not None:
        result["retrieval"] = evaluate_retrieval(retrieval, net, mean, projection, options)
    ran["retrieval"] = "" if retrieval is not None else "no ground truth"
    ran["proxy"] = proxy_status(proxy, proxy_path)
    result["evaluations"] = evaluations_line(ran)
    log.info("evaluations: %s", result["evaluations"])
    artifacts.save_json(report_path, result)
    if metrics_path:
        artifacts.save_json(metrics_path, headline(result, proxy))

    sections = {split: result[split] for split in EVALUATIONS if split in result}
    if not sections:  # the folder is a DVC output: say why it holds no curve
        artifacts.save_json(plots_dir / "recall_at_k" / "no_labels.json",
                            {"recall_at_k": [], "evaluations": result["evaluations"]})
    for split, section in sections.items():
        artifacts.save_json(plots_dir / "recall_at_k" / f"{split}.json", {"recall_at_k": recall_series(ks, section)})
    if sections:
        artifacts.save_figure(plots_dir / "recall_at_k.png", recall_figure(ks, sections))
    else:  # no labels: the same file shows the label-free comparison
        artifacts.save_figure(plots_dir / "recall_at_k.png", label_free_figure(result, proxy))
    if rows:
        artifacts.save_figure(plots_dir / "training.png", training_figure(rows))
    plt.close("all")


def training_record(extra: dict) -> dict:
    """How the model was trained, as finetune recorded it in model.pt: where its
    tuples' classes came from and whether HDML synthesis ran (absent: plain MoM)."""
    supervision, synthesis = str(extra.get("supervision", "none")), str(extra.get("synthesis", "none"))
    return {"supervision": supervision, "labels_used": supervision == "labels", "synthesis": synthesis}


def load_start(path: Path, net) -> torch.nn.Module:
    start_net, _ = networks.load_checkpoint(path)
    require(start_net.meta == net.meta, f"{path}: the untrained start is not the fine-tuned model's architecture "
            f"({start_net.meta} vs {net.meta})")
    return start_net


def read_splits(prepared: Path, features_dir: Path) -> tuple[dict, dict, dict]:
    """Every held-out split's store and initial features, read before any
    embedding: ``(labelled, unlabeled, ran)``. Labelled splits get Recall@K, NMI
    and F1; unlabeled ones the label-free measures (:mod:`mom.label_free`);
    ``ran`` maps each evaluation to ``""`` (runs) or why it does not."""
    labeled, unlabeled, ran = {}, {}, {}
    for split in EVALUATIONS:
        store = ImageStore.open(prepared / split) if split_written(prepared / split) else None
        if store is None or len(store) == 0:
            ran[split] = "no images"
            continue
        reason = unlabeled_reason(store, prepared / split)
        ran[f"R@K/NMI {split}"] = reason
        if not reason:
            labeled[split] = (store, load_initial(features_dir / f"{split}.npy", len(store)))
            continue
        ran[f"label-free {split}"] = "" if len(store) >= 3 else "under 3 images"
        if len(store) >= 3:
            unlabeled[split] = (store, load_initial(features_dir / f"{split}.npy", len(store)))
    return labeled, unlabeled, ran


def unlabeled_reason(store: ImageStore, folder: Path) -> str:
    """``""`` when every item of the split is labelled, in two or more classes,
    else why Recall@K / NMI cannot run there (logged)."""
    if (store.labels < 0).any():
        log.info("%s: %d of %d items unlabeled: no Recall@K / NMI here", folder, int((store.labels < 0).sum()),
                 len(store))
        return "unlabeled"
    if len(np.unique(store.labels)) < 2:
        log.info("%s: one class only: no Recall@K / NMI here", folder)
        return "one class"
    return ""


def proxy_status(proxy: dict | None, proxy_path) -> str:
    if proxy is None:
        return "no report given"
    return "" if any(split in proxy for split in EVALUATIONS) else "no evaluation split"


def evaluations_line(ran: dict[str, str]) -> str:
    """One line for the metrics file: which evaluations ran, and why the others did not."""
    done = [name for name, reason in ran.items() if not reason]
    skipped = [f"{name} ({reason})" for name, reason in ran.items() if reason]
    return f"ran: {', '.join(done) or 'none'}; not run: {', '.join(skipped) or 'none'}"


def evaluate_fine_grained(split, store, initial, networks_to_score, ks, options) -> dict:
    labels = store.labels
    classes = len(np.unique(labels))
    seed, n_init = options["kmeans_seed"], options["kmeans_n_init"]
    section = {"items": len(store), "classes": classes,
               "kmeans": metrics.kmeans_description(classes, seed, n_init)}
    if options["score_initial"]:
        with timed(f"{split}: initial features: Recall@K, NMI, F1"):
            section["initial"] = fine_grained_metrics(initial, labels, ks, seed, n_init)
    for name, (net, mean, projection) in networks_to_score.items():
        with timed(f"{split}: embedded {len(store)} items with the {EMBEDDINGS[name][0]} network, Recall@K, NMI, F1"):
            section[name] = fine_grained_metrics(embed(net, store, mean, projection, options), labels, ks, seed, n_init)
    for name in EMBEDDINGS:
        if name in section:
            log.info("%s, %s: %s", EVALUATIONS[split], EMBEDDINGS[name][0],
                     ", ".join(f"{k} {100 * v:.2f}" for k, v in section[name].items()))
    return {key: section[key] for key in ("items", "classes", "kmeans", *EMBEDDINGS) if key in section}


def read_retrieval_inputs(prepared, features_dir, ground_truth) -> dict:
    """The query and database stores, the ground truth, its protocols and, when
    extract wrote them, the initial features of both."""
    queries, database = ImageStore.open(prepared / "query"), ImageStore.open(prepared / "database")
    table = tables.read_ground_truth(ground_truth, len(queries), len(database), RELEVANCE_LEVELS)
    protocols = protocols_in(table)
    require(protocols, f"{ground_truth}: no relevance level that any protocol counts as positive")
    initial = None
    if (features_dir / "query.npy").is_file() and (features_dir / "database.npy").is_file():
        initial = (load_initial(features_dir / "query.npy", len(queries)),
                   load_initial(features_dir / "database.npy", len(database)))
    return {"queries": queries, "database": database, "table": table, "protocols": protocols, "initial": initial}


def evaluate_retrieval(inputs, net, mean, projection, options) -> dict:
    queries, database, table, protocols = (inputs[key] for key in ("queries", "database", "table", "protocols"))
    section = {"queries": len(queries), "database": len(database), "protocols": protocols}
    precision_ks = sorted(set(options["precision_ks"]))
    if inputs["initial"] is not None and options["score_initial"]:
        section["initial"] = retrieval_metrics(*inputs["initial"], table, protocols, precision_ks)
    with timed("embedded queries and database with the fine-tuned network"):
        query_embeddings = embed(net, queries, mean, projection, options)
        database_embeddings = embed(net, database, mean, projection, options)
    section["finetuned"] = retrieval_metrics(query_embeddings, database_embeddings, table, protocols, precision_ks)
    return section


if __name__ == "__main__":
    main()
