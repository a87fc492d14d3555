"""Stage ``mine``: positive and negative pools of every anchor (docs/method.md section 5).

Reads ``--features`` (for the anchors' exact Euclidean neighbours, up to
``k_neg``), ``--anchors``, ``--manifold`` (``manifold_knn.parquet`` of diffuse,
at least ``k_neg`` deep) and, for purity only, the labels of ``--prepared``
(the train split's image store; labels never influence the pools).
Writes to ``--out-dir``:
- ``pools.parquet``: ``anchor, member int64, kind string (positive/negative),
  rank int32 (1 = first of its kind), manifold_similarity float32 (s_m =
  f_anchor*(member) where the member is among the anchor's stored manifold
  neighbours, else null), euclidean_similarity float32 (inner product
  y_anchor.y_member; s_e = [.]_+^gamma is monotone in it)``, anchors in rank
  order, positives before negatives;
- ``purity.json``: pool sizes and purity (same-label positives, different-label
  negatives) of all four pool variants of the paper's Table 1 — manifold and
  Euclidean-NN baseline positives, manifold and random baseline negatives —
  and which variants were written.
"""
from __future__ import annotations

import logging
from pathlib import Path

import click
import numpy as np

from mom import artifacts, autosize
from mom.artifacts import arrays, tables
from mom.graph import check_features, neighbours_of
from mom.imagestore import ImageStore
from mom.pools import (NEGATIVE_VARIANTS, POSITIVE_VARIANTS, pair_inner_products, pool_purity, pool_stats,
                       pool_variants, select_pools, stored_similarities)
from stages._cli import AUTO_INT, StageCommand, log_auto, require, stage_command, timed

log = logging.getLogger("mom")


def write_pools(path, anchors, features, manifold_ids, manifold_values, positive, negative) -> None:
    """Both pools as ``pools.parquet`` rows: anchors in rank order, positives first, members by rank."""
    parts = []
    for kind, pool in (("positive", positive), ("negative", negative)):
        anchor_ids = anchors[pool.anchor_row]
        euclidean = pair_inner_products(features, anchor_ids, pool.member)
        manifold, found = stored_similarities(pool.anchor_row, pool.member, manifold_ids, manifold_values)
        parts.append({"row": pool.anchor_row, "kind_order": np.full(len(pool.member), 0 if kind == "positive" else 1),
                      "anchor": anchor_ids, "member": pool.member, "kind": np.full(len(pool.member), kind, dtype=object),
                      "rank": pool.rank, "manifold_similarity": manifold, "found": found,
                      "euclidean_similarity": euclidean.astype(np.float32)})
    rows = {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
    order = np.lexsort((rows["rank"], rows["kind_order"], rows["row"]))
    tables.write_pools(path, {name: values[order] for name, values in rows.items()}, rows["found"][order])


def read_labels(prepared) -> np.ndarray | None:
    if not prepared:
        return None
    return ImageStore.open(prepared).labels


def resolve_sizes(k_pos, k_neg, n: int, depth: int) -> tuple[int, int, dict]:
    """``k_pos`` and ``k_neg`` as ints; ``auto`` from ``n`` (mom/autosize.py), at
    most the ``depth`` of manifold neighbours stored per anchor."""
    sizes: dict = {}
    resolved = []
    for name, value in (("mine.k_pos", k_pos), ("mine.k_neg", k_neg)):
        size = autosize.resolve(name, value, n, sizes)
        if name in sizes and size > depth >= 1:
            size = depth
            sizes[name].update(value=size, capped_at_manifold_depth=depth)
        resolved.append(size)
    log_auto(sizes)
    return resolved[0], resolved[1], sizes


@click.command(cls=StageCommand)
@click.option("--k_pos", type=AUTO_INT, default="auto", show_default=True,
              help="P+ = NN_k_pos^m minus NN_k_pos^e; auto: from the item count (mom/autosize.py)")
@click.option("--k_neg", type=AUTO_INT, default="auto", show_default=True,
              help="P- = NN_k_neg^e minus NN_k_neg^m (capped at n/2; retrieval at 1M: 10000); auto: from the item "
                   "count, at most the manifold neighbours diffuse kept")
@click.option("--positive_cap", type=int, default=50, show_default=True)
@click.option("--negative_cap", type=int, default=50, show_default=True)
@click.option("--positives", type=click.Choice(POSITIVE_VARIANTS), default="manifold", show_default=True,
              help="manifold (P+) or euclidean (baseline NN_baseline_k)")
@click.option("--negatives", type=click.Choice(NEGATIVE_VARIANTS), default="manifold", show_default=True,
              help="manifold (P-) or random (baseline: random items outside NN_baseline_k)")
@click.option("--baseline_k", type=int, default=5, show_default=True, help="Euclidean NN size of the baselines")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="seed of the random baseline negatives")
@click.option("--features", "features_path", type=click.Path(dir_okay=False), default="data/features/train.npy",
              show_default=True)
@click.option("--anchors", "anchors_path", type=click.Path(dir_okay=False), default="data/anchors/anchors.parquet",
              show_default=True)
@click.option("--manifold", "manifold_path", type=click.Path(dir_okay=False),
              default="data/diffuse/manifold_knn.parquet", show_default=True)
@click.option("--prepared", default="data/prepared/train", show_default=True,
              help="image store of the train split, for purity only (empty: no purity)")
@click.option("--out-dir", "out_dir", type=click.Path(file_okay=False), default="data/mine", show_default=True)
@stage_command("mine")
def main(k_pos, k_neg, positive_cap, negative_cap, positives, negatives, baseline_k, seed, features_path,
         anchors_path, manifold_path, prepared, out_dir):
    """Mine the positive and negative pools and report their purity."""
    for name, value in (("k_pos", k_pos), ("k_neg", k_neg), ("positive_cap", positive_cap),
                        ("negative_cap", negative_cap), ("baseline_k", baseline_k)):
        require(autosize.is_auto(value) or value >= 1, f"{name}={value}: must be at least 1")
    features = arrays.read_features(features_path, mmap=True)
    n = features.shape[0]
    anchors = tables.read_anchors(anchors_path, n_items=n, owner=str(features_path))
    manifold = tables.read_manifold_knn(manifold_path, n_items=n, anchors=anchors, owner=str(features_path))
    manifold_ids, manifold_values = tables.manifold_neighbour_matrix(manifold_path, manifold, anchors)
    k_pos, k_neg, sizes = resolve_sizes(k_pos, k_neg, n, manifold_ids.shape[1])
    k_neg_used = min(k_neg, n // 2)
    require(k_pos < n, autosize.too_large({"mine.k_pos": k_pos, "diffuse.k": None}, n,
                                          bound=f"mine.k_pos < {n} items, <= diffuse.k"))
    require(baseline_k < n, f"baseline_k={baseline_k}: must be below the item count {n}")
    depth = max(k_pos, k_neg_used)
    require(manifold_ids.shape[1] >= depth,
            f"{manifold_path}: at most {manifold_ids.shape[1]} manifold neighbours per anchor, mine needs {depth} "
            f"= max(k_pos, k_neg): raise diffuse.k to at least that, or, if it is already, every anchor's graph "
            f"component has at most {manifold_ids.shape[1] + 1} items (diffuse lists only s_m > 0): lower mine.k_pos "
            f"and mine.k_neg or raise graph.k")
    labels = read_labels(prepared)
    require(labels is None or len(labels) == n, f"{prepared}: {len(labels) if labels is not None else 0} items, "
            f"features have {n}")
    check_features(features, name=str(features_path))  # every row: the Euclidean search reads them all
    with timed(f"searched {depth} Euclidean neighbours of {len(anchors)} anchors"):
        euclidean_ids, _ = neighbours_of(features, anchors, max(depth, baseline_k))
    with timed("built pools"):
        variants = pool_variants(anchors, manifold_ids, euclidean_ids, n, k_pos, k_neg_used, positive_cap,
                                 negative_cap, baseline_k, seed)
    positive, negative = select_pools(positives, negatives, variants)
    report = {"written": {"positives": positives, "negatives": negatives},
              "anchors": int(len(anchors)), "k_pos": k_pos, "k_neg": k_neg_used, "auto_sizes": sizes,
              "labelled_items": int((labels >= 0).sum()) if labels is not None else 0}
    for name, pool in variants.items():
        report[name] = pool_stats(pool, len(anchors))
        if labels is not None:
            report[name].update(pool_purity(anchors, pool, labels, same_label=name.endswith("positives")))
    out_dir = Path(out_dir)
    with timed("wrote pools"):
        write_pools(out_dir / "pools.parquet", anchors, features, manifold_ids, manifold_values, positive, negative)
        artifacts.save_json(out_dir / "purity.json", report)
    for name in variants:
        log.info("%s: %.1f per anchor, purity %s", name, report[name]["mean_per_anchor"],
                 report[name].get("purity"))


if __name__ == "__main__":
    main()
