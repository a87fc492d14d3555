"""Search the indexed collection: images like this one, under the fine-tuned and the initial embedding.

    python -m stages.search --item train:17
    python -m stages.search --query photo.jpg --k 5 --sheet photo-top5.png
    python -m stages.search --query a.png --query b.png --json

Reads what the ``index`` stage wrote (``--index-dir``). A query is an item of
an indexed split (``--item <split>:<id>``, id = the split's manifest id; its
stored embeddings are the query, and the item itself is left out of its
answer) or an image file (``--query``, decoded as ``prepare`` decodes a folder
image, then embedded with both networks; several files in one call share the
networks' start-up). Item queries load no network. Prints, per query and
embedding, the top ``--k`` items (rank, similarity, split:id, origin) or, with
``--json``, ``{"k", "queries": [{"query", "finetuned": [...], "initial":
[...]}]}`` where each answer is ``{rank, split, item, origin, similarity}``.
``--sheet`` writes a PNG: the query and its top-k, one row per embedding
(pixels from ``<prepared>/<split>``), for a single query.

If ``extract`` PCA-whitened the initial features, a query *file* gets no
initial-feature answer: extract does not save that whitening, so the file
cannot be put in the same space (said in one line; ``"initial": null`` and
``initial_unavailable`` in the JSON). Item queries are not affected.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np

from mom import artifacts, search
from mom.artifacts import reports
from mom.datasets.images import RejectedImage, decode_image
from mom.errors import InputError
from mom.imagestore import ImageStore
from stages._cli import StageCommand, require, stage_command

log = logging.getLogger("mom")

EMBED_BATCH = 64  # query files embedded together
EMBEDDINGS = (("finetuned", "fine-tuned"), ("initial", "initial features"))
NO_PCA_WHITENING = ("extract.pca_whiten is on and extract does not save its PCA whitening, "
                    "so a query file cannot be put in the initial features' space")


@dataclass
class Query:
    """One query: what it is (``described``), its caption, and its vectors per embedding."""

    described: dict
    caption: str
    row: int = -1  # its index row when it is an indexed item (left out of its answer)
    pixels: np.ndarray | None = None  # a query file's decoded pixels
    vectors: dict = field(default_factory=dict)


def load_summary(index_dir: Path) -> dict:
    path = index_dir / "index.json"
    require(path.is_file(), f"{path}: not found; build the index first (dvc repro index)")
    return reports.read_index_summary(path)


def parse_item(text: str, splits: dict[str, int]) -> tuple[str, int]:
    split, colon, number = text.rpartition(":")
    require(colon and split and number.strip().lstrip("-").isdigit(),
            f"--item {text!r}: expected <split>:<id>, e.g. train:17")
    require(split in splits, f"--item {text}: split {split!r} is not indexed (indexed: {', '.join(splits)})")
    item = int(number)
    require(0 <= item < splits[split], f"--item {text}: id out of range ({split} has items 0..{splits[split] - 1})")
    return split, item


def item_queries(texts, summary: dict, items) -> list[Query]:
    first_row, start = {}, 0
    for split, count in summary["splits"].items():
        first_row[split], start = start, start + count
    queries = []
    for text in texts:
        split, item = parse_item(text, summary["splits"])
        row = first_row[split] + item
        origin = items.column("origin")[row].as_py()
        queries.append(Query({"split": split, "item": item, "origin": origin}, f"query\n{split}:{item}", row=row))
    return queries


def file_queries(paths, max_side: int) -> list[Query]:
    queries = []
    for path in paths:
        require(not Path(path).is_dir(), f"--query {path}: a folder, not an image file")
        try:
            pixels = decode_image(Path(path), max_side, exif=True)
        except RejectedImage as reason:
            raise InputError(f"--query {path}: {reason}") from None
        queries.append(Query({"file": str(path)}, f"query\n{Path(path).name[:24]}", pixels=pixels))
    return queries


def embed_files(queries: list[Query], summary: dict, model_path: Path, whitening_path: Path) -> None:
    """Both networks' embeddings of the query files, as ``index`` embedded the collection."""
    from mom import extraction, networks, whitening  # torch: only when a file is to be embedded

    finetuned = summary["finetuned"]
    for path, recorded in ((model_path, finetuned["model_sha256"]), (whitening_path, finetuned["whitening"]["sha256"])):
        require(path.is_file(), f"{path}: file not found (query files are embedded with the fine-tuned model)")
        require(search.file_sha256(path) == recorded, f"{path}: changed since the index was built (rerun the index stage)")
    images = [query.pixels for query in queries]
    net, _ = networks.load_checkpoint(model_path)
    mean, projection, _ = whitening.load_whitening(whitening_path)
    raw = extraction.embed_store(net, images, scales=finetuned["scales"], batch_size=EMBED_BATCH,
                                 aggregation=finetuned["aggregation"], progress=False)
    for query, vector in zip(queries, whitening.apply_whitening(raw, mean, projection)):
        query.vectors["finetuned"] = vector
    initial = summary["initial"]
    if initial["pca_whiten"]:
        log.warning("initial features of query files: unavailable (%s)", NO_PCA_WHITENING)
        return
    meta = networks.make_meta(initial["backbone"], initial["pooling"], initial["gem_p"])
    net = networks.build_network(meta, weights=initial["weights"] or None)
    vectors = extraction.embed_store(net, images, scales=initial["scales"], batch_size=EMBED_BATCH,
                                     aggregation=initial["aggregation"], aggregation_p=initial["gem_p"], progress=False)
    for query, vector in zip(queries, vectors):
        query.vectors["initial"] = vector


def answers(index, queries: list[Query], name: str, k: int, items) -> list[list[dict] | None]:
    """Per query, its top-k under embedding ``name`` as dicts (None where the query has no such vector)."""
    asked = [query for query in queries if name in query.vectors]
    found = {}
    if asked:
        rows, sims = search.search(index, np.stack([query.vectors[name] for query in asked]), k,
                                   exclude=[query.row for query in asked])
        for query, query_rows, query_sims in zip(asked, rows, sims):
            found[id(query)] = [{"rank": rank, "split": items.column("split")[row].as_py(),
                                 "item": items.column("item")[row].as_py(), "origin": items.column("origin")[row].as_py(),
                                 "similarity": round(float(sim), 6)}
                                for rank, (row, sim) in enumerate(zip(query_rows.tolist(), query_sims), start=1)]
    return [found.get(id(query)) for query in queries]


def as_text(results: list[dict]) -> str:
    lines = []
    for result in results:
        query = result["query"]
        lines.append(f"query {query['file']}" if "file" in query
                     else f"query {query['split']}:{query['item']}  {query['origin']}")
        for name, title in EMBEDDINGS:
            if result[name] is None:
                lines.append(f"  {title}: unavailable ({result['initial_unavailable']})")
                continue
            lines.append(f"  {title}:")
            lines += [f"  {a['rank']:4d}  {a['similarity']:.4f}  {a['split']}:{a['item']}  {a['origin']}"
                      for a in result[name]]
    return "\n".join(lines)


def write_sheet(path: Path, query: Query, result: dict, prepared: Path) -> None:
    stores: dict[str, ImageStore] = {}

    def pixels_of(split: str, item: int, origin: str) -> np.ndarray:
        if split not in stores:
            stores[split] = ImageStore.open(prepared / split)
        store = stores[split]
        require(item < len(store) and store.manifest.column("origin")[item].as_py() == origin,
                f"{prepared / split}: item {item} is not the indexed one (the index is stale: rerun the index stage)")
        return store[item]

    described = query.described
    pixels = query.pixels if query.pixels is not None else pixels_of(described["split"], described["item"],
                                                                     described["origin"])
    rows = [(title, [search.Tile(pixels_of(a["split"], a["item"], a["origin"]),
                                 f"{a['split']}:{a['item']}\n{a['similarity']:.3f}") for a in result[name]])
            for name, title in EMBEDDINGS if result[name] is not None]
    artifacts.save_figure(path, search.contact_sheet(search.Tile(pixels, query.caption), rows))
    log.info("wrote %s", path)


@click.command(cls=StageCommand)
@click.option("--query", "query_files", multiple=True, type=click.Path(path_type=Path),
              help="an image file (repeat for several: the networks start once)")
@click.option("--item", "query_items", multiple=True, help="an indexed item, <split>:<id> (repeatable)")
@click.option("--k", type=int, default=10, show_default=True, help="answers per query and embedding")
@click.option("--json", "as_json", is_flag=True, help="print the answers as JSON")
@click.option("--sheet", type=click.Path(path_type=Path), help="write a contact sheet PNG (one query only)")
@click.option("--index-dir", type=click.Path(path_type=Path), default="data/index", show_default=True)
@click.option("--prepared", type=click.Path(path_type=Path), default="data/prepared", show_default=True)
@click.option("--model", "model_path", type=click.Path(path_type=Path), default="data/finetune/model.pt",
              show_default=True)
@click.option("--whitening", "whitening_path", type=click.Path(path_type=Path),
              default="data/whiten/whitening.npz", show_default=True)
@stage_command("search")
def main(query_files, query_items, k, as_json, sheet, index_dir, prepared, model_path, whitening_path):
    """Find the indexed images most similar to a query image file or item."""
    require(query_files or query_items, "give a query: --query <image file> or --item <split>:<id>")
    require(k >= 1, f"--k: must be at least 1, got {k}")
    require(sheet is None or len(query_files) + len(query_items) == 1,
            "--sheet: draws one query; give a single --query or --item")
    summary = load_summary(index_dir)
    items = search.load_items(index_dir / "items.parquet")
    require(len(items) == summary["items"], f"{index_dir}: items.parquet and index.json disagree (rerun the index stage)")
    queries = item_queries(query_items, summary, items) + file_queries(query_files, summary["max_side"])
    indexes = {name: search.load_index(index_dir / summary[name]["index"]) for name, _ in EMBEDDINGS}
    for name, index in indexes.items():
        require(index.ntotal == len(items), f"{index_dir / summary[name]['index']}: holds {index.ntotal} items, "
                                            f"items.parquet {len(items)} (rerun the index stage)")
        for query in queries:
            if query.row >= 0:
                query.vectors[name] = index.reconstruct(query.row)
    if query_files:
        embed_files([query for query in queries if query.pixels is not None], summary, model_path, whitening_path)

    per_embedding = {name: answers(indexes[name], queries, name, k, items) for name, _ in EMBEDDINGS}
    results = []
    for number, query in enumerate(queries):
        result = {"query": query.described, **{name: per_embedding[name][number] for name, _ in EMBEDDINGS}}
        if result["initial"] is None:
            result["initial_unavailable"] = NO_PCA_WHITENING
        results.append(result)
    click.echo(json.dumps({"k": k, "queries": results}, indent=2) if as_json else as_text(results))
    if sheet is not None:
        write_sheet(sheet, queries[0], results[0], prepared)


if __name__ == "__main__":
    main()
