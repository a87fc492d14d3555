"""The paper's qualitative figure of the pools (docs/method.md section 5).

For a few anchors: the anchor image, its manifold pools ``P+`` and ``P-`` and
the baseline pools of the ablation (Euclidean ``NN_k`` positives, random
negatives outside ``NN_k``). When labels exist (display only) each member gets
a green border when its label equals the anchor's and a red one otherwise;
grey when either label is unknown.
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402

SAME_LABEL = "#1a9641"       # green: the member's label equals the anchor's
OTHER_LABEL = "#d7191c"      # red: different labels
UNKNOWN_LABEL = "#9e9e9e"    # grey: a label is missing
ANCHOR_BORDER = "#2b83ba"
# (table, kind, column title): ours first, then the baseline, as in the paper.
POOLS = (("ours", "positive", "P+"), ("ours", "negative", "P-"),
         ("baseline", "positive", "Euclidean NN"), ("baseline", "negative", "random"))


def border_colour(anchor_label: int, member_label: int) -> str:
    """Green for agreeing labels, red for different ones, grey when one is unknown (< 0)."""
    if anchor_label < 0 or member_label < 0:
        return UNKNOWN_LABEL
    return SAME_LABEL if anchor_label == member_label else OTHER_LABEL


def pool_members(pools: pa.Table, anchor: int, kind: str, count: int) -> list[int]:
    """The first ``count`` members (by rank) of one anchor's pool of ``kind``."""
    mask = pc.and_(pc.equal(pools.column("anchor"), anchor), pc.equal(pools.column("kind"), kind))
    chosen = pools.filter(mask)
    order = np.argsort(chosen.column("rank").to_numpy(), kind="stable")
    return chosen.column("member").to_numpy()[order][:count].tolist()


def choose_anchors(ours: pa.Table, baseline: pa.Table, count: int, seed: int) -> list[int]:
    """``count`` anchors drawn with ``seed`` among those with all four pools non-empty, sorted."""
    complete = None
    for table in (ours, baseline):
        for kind in ("positive", "negative"):
            anchors = set(table.filter(pc.equal(table.column("kind"), kind)).column("anchor").to_pylist())
            complete = anchors if complete is None else complete & anchors
    candidates = np.array(sorted(complete), dtype=np.int64)
    if len(candidates) == 0:
        raise ValueError("no anchor has members in all four pools")
    rng = np.random.default_rng(seed)
    picked = rng.choice(candidates, size=min(count, len(candidates)), replace=False)
    return sorted(int(a) for a in picked)


def _show(axis, image: np.ndarray, colour: str | None, width: float = 3.0) -> None:
    image = image[..., 0] if image.shape[-1] == 1 else image
    axis.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=255)
    axis.set_xticks([])
    axis.set_yticks([])
    for spine in axis.spines.values():
        spine.set_visible(colour is not None)
        if colour is not None:
            spine.set_edgecolor(colour)
            spine.set_linewidth(width)


def pools_figure(images, labels: np.ndarray | None, ours: pa.Table, baseline: pa.Table, anchors: list[int],
                 members: int):
    """One row per anchor: the anchor, then ``members`` panels for each of P+, P-,
    the baseline's Euclidean neighbours and random negatives (blank where a pool
    is shorter). ``images[i]`` is item i's ``(h, w, c)`` uint8 image; ``labels``
    (or None) colour the borders. Returns the matplotlib figure."""
    columns = 1 + members * len(POOLS)
    figure, axes = plt.subplots(len(anchors), columns, figsize=(0.75 * columns, 0.85 * len(anchors) + 0.4),
                                squeeze=False)
    tables = {"ours": ours, "baseline": baseline}
    for row, anchor in enumerate(anchors):
        anchor_label = int(labels[anchor]) if labels is not None else -1
        _show(axes[row, 0], images[anchor], ANCHOR_BORDER)
        axes[row, 0].set_ylabel(f"#{anchor}", fontsize=6)
        for block, (table, kind, title) in enumerate(POOLS):
            found = pool_members(tables[table], anchor, kind, members)
            for slot in range(members):
                axis = axes[row, 1 + block * members + slot]
                if row == 0 and slot == 0:
                    axis.set_title(title, fontsize=7, loc="left")
                if slot >= len(found):
                    axis.axis("off")
                    continue
                member_label = int(labels[found[slot]]) if labels is not None else -1
                _show(axis, images[found[slot]], border_colour(anchor_label, member_label))
    axes[0, 0].set_title("anchor", fontsize=7)
    if labels is not None:
        figure.suptitle("border: green = same class as the anchor, red = different (labels for display only)",
                        fontsize=7)
    figure.subplots_adjust(wspace=0.08, hspace=0.08)
    return figure
