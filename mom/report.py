"""The paper's Table 1 from the grid's per-cell results (docs/method.md section 9).

A *cell* is one Table 1 row (a pool variant, with or without the weighted loss)
at one seed; its name is ``<row>_seed-<seed>``. Each cell contributes the
``evaluate`` stage's metrics, the ``mine`` stage's purity report and, when
present, the ``proxy_retrieval`` stage's mAP per augmentation level (the
stand-in for the paper's Oxford5k column). This
module builds the table (mean and sample standard deviation over seeds, the
initial features as the first row, the untrained start of fine-tuning as the
second when given) and renders it as Markdown and as a PNG. Every metric is
reported for both evaluations: ``new_images`` (new images of the collection's
classes) and ``new_classes`` (unseen classes).
Which cells exist is the caller's decision (the params), never a folder scan.
:func:`headline` picks, from one evaluation, the few numbers a user compares
between runs (the main pipeline's DVC metrics).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

INITIAL_ROW = "initial features"
START_ROW = "untrained start"
# The two evaluations (held-out splits) and their column prefixes, in table order.
EVALUATIONS = (("new_images", "new images"), ("new_classes", "new classes"))
# (metric key, header) of the fine-grained metrics, in table order.
FINE_GRAINED = (("recall_at_1", "R@1"), ("nmi", "NMI"))
PURITY = (("positive_purity", "P+ purity"), ("negative_purity", "P- purity"))
# The embeddings whose numbers are headline metrics (the untrained start stays in the report).
HEADLINE_VERSIONS = ("initial", "finetuned")


def cell_name(row: str, seed: int) -> str:
    """The folder/metrics name of one grid cell, e.g. ``pos-manifold_neg-manifold_seed-1``."""
    return f"{row}_seed-{seed}"


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1 in the denominator; 0 for one value)."""
    if not values:
        raise ValueError("no values")
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def cell_metrics(evaluation: dict, version: str) -> dict[str, float]:
    """Flat metrics of one ``evaluate`` report for ``version`` (initial, start or
    finetuned): Recall@1 and NMI of each evaluation split (``new_images_recall_at_1``,
    ...), mAP per retrieval protocol when present."""
    flat = {}
    for split, _ in EVALUATIONS:
        section = evaluation.get(split, {}).get(version)
        if section:
            flat.update({f"{split}_{key}": float(section[key]) for key, _ in FINE_GRAINED if key in section})
    retrieval = evaluation.get("retrieval", {}).get(version)
    if retrieval:
        flat.update({f"map_{protocol}": float(entry["map"]) for protocol, entry in retrieval.items()})
    return flat


def proxy_metrics(proxy: dict, version: str) -> dict[str, float]:
    """Proxy retrieval mAP per evaluation split and level (``proxy_map_new_images_mild``,
    ...): the ``initial`` network, or for ``finetuned`` the fine-tuned descriptors
    after the cell's whitening when it was applied."""
    flat = {}
    for split, _ in EVALUATIONS:
        for level, entry in proxy.get(split, {}).get("levels", {}).items():
            if version == "initial":
                chosen = entry.get("initial")
            else:
                chosen = entry.get("finetuned_whitened", entry.get("finetuned"))
            if chosen is not None:
                flat[f"proxy_map_{split}_{level}"] = float(chosen["map"])
    return flat


def headline(evaluation: dict, proxy: dict | None = None) -> dict:
    """The numbers a user compares between runs (the pipeline's DVC metrics),
    from an ``evaluate`` report and, when given, a ``proxy_retrieval`` report:
    per evaluation split the ``initial`` features' and the ``finetuned``
    network's Recall@1, Recall@K at the largest K and NMI; mAP per retrieval
    protocol; the proxy mAP per split and level (``proxy_map``); on splits
    without labels the label-free measures (``label_free``: manifold agreement
    of both, neighbours kept; :mod:`mom.label_free`); the one-line account of
    which evaluations ran and why the others did not (``evaluations``). Counts,
    settings, the untrained start and the other K stay in the reports."""
    result = {}
    for split, _ in EVALUATIONS:
        section = evaluation.get(split, {})
        versions = {version: _fine_grained_headline(section[version]) for version in HEADLINE_VERSIONS
                    if section.get(version)}
        if versions:
            result[split] = versions
    retrieval = evaluation.get("retrieval", {})
    maps = {version: {protocol: float(entry["map"]) for protocol, entry in retrieval[version].items()}
            for version in HEADLINE_VERSIONS if retrieval.get(version)}
    if maps:
        result["retrieval_map"] = maps
    if proxy:
        per_version = {version: proxy_metrics(proxy, version) for version in HEADLINE_VERSIONS}
        levels = {}
        for split, _ in EVALUATIONS:
            for level in proxy.get(split, {}).get("levels", {}):
                key = f"proxy_map_{split}_{level}"
                values = {version: per_version[version][key] for version in HEADLINE_VERSIONS if key in per_version[version]}
                if values:
                    levels.setdefault(split, {})[level] = values
        if levels:
            result["proxy_map"] = levels
    for split, section in evaluation.get("label_free", {}).items():
        result.setdefault("label_free", {})[split] = {
            **{version: dict(section[version]) for version in HEADLINE_VERSIONS if section.get(version)},
            **{key: value for key, value in section.items() if key.startswith("neighbours_kept_at_")}}
    if "evaluations" in evaluation:
        result["evaluations"] = evaluation["evaluations"]
    return result


def _fine_grained_headline(section: dict) -> dict[str, float]:
    ks = sorted(int(key[len("recall_at_"):]) for key in section if key.startswith("recall_at_"))
    keys = [f"recall_at_{k}" for k in dict.fromkeys(ks[:1] + ks[-1:])] + ["nmi", "f1"]
    return {key: float(section[key]) for key in keys if key in section}


def pool_purities(purity: dict) -> dict[str, float]:
    """Purity of the pools a cell trained on: the variants its ``mine`` report says it wrote."""
    written = purity["written"]
    found = {}
    for key, variant in (("positive_purity", f"{written['positives']}_positives"),
                         ("negative_purity", f"{written['negatives']}_negatives")):
        value = purity.get(variant, {}).get("purity")
        if value is not None:
            found[key] = float(value)
    return found


@dataclass
class TableRow:
    name: str
    seeds: list[int]
    values: dict[str, tuple[float, float]] = field(default_factory=dict)  # column -> (mean, std)
    labels: str = "no"  # whether training used the labels: no | yes | k-means (pseudo-labels, no real labels)


@dataclass
class Table:
    columns: list[tuple[str, str]]  # (key, header)
    rows: list[TableRow]


def build_table(rows: list[str], seeds: list[int], evaluations: dict[str, dict],
                purities: dict[str, dict] | None = None, proxies: dict[str, dict] | None = None,
                start: dict | None = None, start_proxy: dict | None = None) -> Table:
    """Table 1: the initial features first, then (when ``start``, an ``evaluate``
    report with a ``start`` section, is given) the untrained start of
    fine-tuning, then one row per grid row, each value the mean and std over
    ``seeds`` of the cells ``cell_name(row, seed)``.

    ``evaluations`` (and ``purities``, ``proxies``) map cell names to the stage reports; keys
    of other cells are ignored. A metric appears as a column only when every
    cell has it. The initial row is the ``initial`` section of ``start`` and
    ``start_proxy`` (the main job's ``evaluate`` and ``proxy_retrieval`` reports:
    the same features, settings and views as every cell, which therefore skip
    them), or, without ``start``, the average of the cells' own ``initial`` sections.
    """
    cells = [cell_name(row, seed) for row in rows for seed in seeds]
    missing = [cell for cell in cells if cell not in evaluations]
    if missing:
        raise KeyError(f"no metrics for cells {missing}")
    purities, proxies = purities or {}, proxies or {}
    finetuned = {cell: cell_metrics(evaluations[cell], "finetuned")
                 | proxy_metrics(proxies.get(cell, {}), "finetuned")
                 | (pool_purities(purities[cell]) if cell in purities else {}) for cell in cells}
    keys = [key for key in _ordered_keys(finetuned.values()) if all(key in m for m in finetuned.values())]
    table = Table(columns=[(key, _header(key)) for key in keys], rows=[])
    if start is not None:
        initial = cell_metrics(start, "initial") | proxy_metrics(start_proxy or {}, "initial")
        table.rows.append(_row(INITIAL_ROW, [], [initial], keys))
        table.rows.append(_row(START_ROW, [], [cell_metrics(start, "start")], keys))
    else:
        initial_per_cell = [cell_metrics(evaluations[c], "initial") | proxy_metrics(proxies.get(c, {}), "initial")
                            for c in cells]
        table.rows.append(_row(INITIAL_ROW, list(seeds), initial_per_cell, keys))
    for row in rows:
        table.rows.append(_row(row, list(seeds), [finetuned[cell_name(row, seed)] for seed in seeds], keys))
        table.rows[-1].labels = labels_used([evaluations[cell_name(row, seed)] for seed in seeds])
    return table


def labels_used(evaluations: list[dict]) -> str:
    """``yes`` when any of the cells trained on the labels (supervision labels),
    ``k-means`` when on pseudo-labels only, else ``no`` (as ``evaluate`` recorded
    it from the model; a report without a ``training`` section is plain MoM)."""
    used = {evaluation.get("training", {}).get("supervision", "none") for evaluation in evaluations}
    return "yes" if "labels" in used else "k-means" if "kmeans" in used else "no"


def _ordered_keys(metric_dicts) -> list[str]:
    keys = []
    for metrics in metric_dicts:
        keys += [key for key in metrics if key not in keys]
    order = ([f"{split}_{key}" for split, _ in EVALUATIONS for key, _ in FINE_GRAINED]
             + sorted(k for k in keys if k.startswith("map_"))
             + [k for split, _ in EVALUATIONS for k in sorted(keys) if k.startswith(f"proxy_map_{split}_")]
             + [k for k, _ in PURITY])
    return [key for key in order if key in keys]


def _header(key: str) -> str:
    metric_names = dict(FINE_GRAINED)
    for split, name in EVALUATIONS:
        if key.startswith(f"{split}_"):
            return f"{name} {metric_names[key[len(split) + 1:]]}"
        if key.startswith(f"proxy_map_{split}_"):
            return f"{name} proxy mAP {key[len(f'proxy_map_{split}_'):]}"
    if key.startswith("map_"):
        return f"mAP {key[4:]}"
    return dict(PURITY).get(key, key)


def _row(name: str, seeds: list[int], metric_dicts: list[dict], keys: list[str]) -> TableRow:
    row = TableRow(name=name, seeds=seeds)
    for key in keys:
        values = [metrics[key] for metrics in metric_dicts if key in metrics]
        if values:
            row.values[key] = mean_std(values)
    return row


def format_value(value: tuple[float, float] | None) -> str:
    """``mean ± std`` in percent with two decimals; an em dash when absent."""
    if value is None:
        return "—"
    return f"{100 * value[0]:.2f} ± {100 * value[1]:.2f}"


def _body(table: Table) -> list[list[str]]:
    """The table's cells as text: row name, number of seeds (— for a row that
    does not depend on the seed), labels used, then each column's ``mean ± std``."""
    return [[row.name, str(len(row.seeds)) if row.seeds else "—", row.labels,
             *[format_value(row.values.get(key)) for key, _ in table.columns]] for row in table.rows]


def to_markdown(table: Table, title: str = "") -> str:
    header = ["row", "seeds", "labels used", *[name for _, name in table.columns]]
    lines = [title, ""] if title else []
    lines += ["| " + " | ".join(header) + " |", "| " + " | ".join(["---"] * len(header)) + " |"]
    lines += ["| " + " | ".join(cells) + " |" for cells in _body(table)]
    return "\n".join(lines) + "\n"


def to_dict(table: Table) -> dict:
    """JSON form (DVC metrics): row -> column -> {mean, std}, plus the seeds."""
    return {row.name: {"seeds": row.seeds, "labels_used": row.labels, **{key: {"mean": mean, "std": std}
                                              for key, (mean, std) in row.values.items()}}
            for row in table.rows}


def to_figure(table: Table, title: str = ""):
    """The table drawn as a matplotlib figure (for a PNG)."""
    header = ["row", "seeds", "labels used", *[name for _, name in table.columns]]
    body = _body(table)
    figure, axis = plt.subplots(figsize=(2.2 + 1.5 * len(header), 0.5 + 0.35 * (len(body) + 1)))
    axis.axis("off")
    drawn = axis.table(cellText=body, colLabels=header, loc="center", cellLoc="center")
    drawn.auto_set_font_size(False)
    drawn.set_fontsize(8)
    drawn.auto_set_column_width(list(range(len(header))))
    if title:
        axis.set_title(title, fontsize=9)
    return figure
