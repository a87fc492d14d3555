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

``--stdin`` keeps the index and the networks loaded and answers one query per
line of standard input (an image file, or ``<split>:<id>`` of an indexed
item), each as soon as it arrives: with ``--json`` one JSON object per line
(JSON Lines); a bad query gives ``{"query": <line>, "error": <reason>}`` (or
a one-line error on stderr) and the next line is answered. Starting Python,
torch and the networks costs seconds; a query costs a fraction of one
(``benchmarks/search.py``).

    printf 'photo.jpg\ntrain:17\n' | python -m stages.search --stdin --json

If ``extract`` PCA-whitened the initial features, a query *file* gets no
initial-feature answer: extract does not save that whitening, so the file
cannot be put in the same space (said in one line; ``"initial": null`` and
``initial_unavailable`` in the JSON). Item queries are not affected.
"""
from __future__ import annotations

import json
import logging
import sys
import time
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


class QueryNetworks:
    """Both networks that embed query files, loaded once (on first use) and
    checked against the checksums the index recorded."""

    def __init__(self, summary: dict, model_path: Path, whitening_path: Path):
        self.summary, self.model_path, self.whitening_path = summary, model_path, whitening_path
        self.loaded = None

    def load(self):
        from mom import networks, whitening  # torch: only when a file is to be embedded

        finetuned, initial = self.summary["finetuned"], self.summary["initial"]
        for path, recorded in ((self.model_path, finetuned["model_sha256"]),
                               (self.whitening_path, finetuned["whitening"]["sha256"])):
            require(path.is_file(), f"{path}: file not found (query files are embedded with the fine-tuned model)")
            require(search.file_sha256(path) == recorded, f"{path}: changed since the index was built (rerun the index stage)")
        net, _ = networks.load_checkpoint(self.model_path)
        mean, projection, _ = whitening.load_whitening(self.whitening_path)
        initial_net = None
        if initial["pca_whiten"]:
            log.warning("initial features of query files: unavailable (%s)", NO_PCA_WHITENING)
        else:
            meta = networks.make_meta(initial["backbone"], initial["pooling"], initial["gem_p"])
            initial_net = networks.build_network(meta, weights=initial["weights"] or None)
        self.loaded = (net, mean, projection, initial_net)

    def embed(self, queries: list[Query]) -> None:
        """Both networks' embeddings of the query files, as ``index`` embedded the collection."""
        if not queries:
            return
        from mom import extraction, whitening  # torch: only when a file is to be embedded

        if self.loaded is None:
            self.load()
        net, mean, projection, initial_net = self.loaded
        finetuned, initial = self.summary["finetuned"], self.summary["initial"]
        images = [query.pixels for query in queries]
        raw = extraction.embed_store(net, images, scales=finetuned["scales"], batch_size=EMBED_BATCH,
                                     aggregation=finetuned["aggregation"], progress=False)
        for query, vector in zip(queries, whitening.apply_whitening(raw, mean, projection)):
            query.vectors["finetuned"] = vector
        if initial_net is None:
            return
        vectors = extraction.embed_store(initial_net, images, scales=initial["scales"], batch_size=EMBED_BATCH,
                                         aggregation=initial["aggregation"], aggregation_p=initial["gem_p"],
                                         progress=False)
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


class IndexedCollection:
    """What the index stage wrote, loaded once: summary, items, both faiss indexes,
    and the networks for query files (loaded on the first file query)."""

    def __init__(self, index_dir: Path, model_path: Path, whitening_path: Path):
        self.summary = load_summary(index_dir)
        self.items = search.load_items(index_dir / "items.parquet")
        require(len(self.items) == self.summary["items"],
                f"{index_dir}: items.parquet and index.json disagree (rerun the index stage)")
        self.indexes = {name: search.load_index(index_dir / self.summary[name]["index"]) for name, _ in EMBEDDINGS}
        for name, index in self.indexes.items():
            require(index.ntotal == len(self.items), f"{index_dir / self.summary[name]['index']}: holds {index.ntotal} "
                                                     f"items, items.parquet {len(self.items)} (rerun the index stage)")
        self.networks = QueryNetworks(self.summary, model_path, whitening_path)

    def queries(self, item_texts, file_paths) -> list[Query]:
        """Item queries (their stored vectors) and file queries (decoded, then embedded by both networks)."""
        queries = item_queries(item_texts, self.summary, self.items) + file_queries(file_paths, self.summary["max_side"])
        for name, index in self.indexes.items():
            for query in queries:
                if query.row >= 0:
                    query.vectors[name] = index.reconstruct(query.row)
        self.networks.embed([query for query in queries if query.pixels is not None])
        return queries

    def results(self, queries: list[Query], k: int) -> list[dict]:
        per_embedding = {name: answers(self.indexes[name], queries, name, k, self.items) for name, _ in EMBEDDINGS}
        results = []
        for number, query in enumerate(queries):
            result = {"query": query.described, **{name: per_embedding[name][number] for name, _ in EMBEDDINGS}}
            if result["initial"] is None:
                result["initial_unavailable"] = NO_PCA_WHITENING
            results.append(result)
        return results

    def line_queries(self, line: str) -> list[Query]:
        """A ``--stdin`` line: an existing image file, else ``<indexed split>:<id>``."""
        split, colon, number = line.rpartition(":")
        if Path(line).exists() or not (colon and number.strip().isdigit()):
            return self.queries([], [Path(line)])
        if split not in self.summary["splits"]:
            raise InputError(f"no such file: {line} (nor an indexed item: give <split>:<id> of "
                             f"{', '.join(self.summary['splits'])})")
        return self.queries([line], [])


def answer_stdin(collection: IndexedCollection, lines, k: int, as_json: bool) -> int:
    """Answer each line as it arrives (click.echo flushes); returns how many lines were refused."""
    refused = 0
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if not line:
            continue
        start = time.perf_counter()
        try:
            result = collection.results(collection.line_queries(line), k)[0]
        except InputError as error:
            refused += 1
            if as_json:
                click.echo(json.dumps({"query": line, "error": str(error)}))
            else:
                click.echo(f"search: error: line {number}: {error}", err=True)
            continue
        click.echo(json.dumps(result) if as_json else as_text([result]))
        log.info("line %d answered in %.3f s", number, time.perf_counter() - start)
    return refused


@click.command(cls=StageCommand)
@click.option("--query", "query_files", multiple=True, type=click.Path(path_type=Path),
              help="an image file (repeat for several: the networks start once)")
@click.option("--item", "query_items", multiple=True, help="an indexed item, <split>:<id> (repeatable)")
@click.option("--k", type=int, default=10, show_default=True, help="answers per query and embedding")
@click.option("--json", "as_json", is_flag=True, help="print the answers as JSON")
@click.option("--sheet", type=click.Path(path_type=Path), help="write a contact sheet PNG (one query only)")
@click.option("--stdin", "from_stdin", is_flag=True,
              help="answer one query per line of standard input (a file or <split>:<id>), networks loaded once")
@click.option("--index-dir", type=click.Path(path_type=Path), default="data/index", show_default=True)
@click.option("--prepared", type=click.Path(path_type=Path), default="data/prepared", show_default=True)
@click.option("--model", "model_path", type=click.Path(path_type=Path), default="data/finetune/model.pt",
              show_default=True)
@click.option("--whitening", "whitening_path", type=click.Path(path_type=Path),
              default="data/whiten/whitening.npz", show_default=True)
@stage_command("search")
def main(query_files, query_items, k, as_json, sheet, from_stdin, index_dir, prepared, model_path, whitening_path):
    """Find the indexed images most similar to a query image file or item."""
    require(k >= 1, f"--k: must be at least 1, got {k}")
    if from_stdin:
        require(not (query_files or query_items or sheet), "--stdin: reads its queries from standard input; "
                                                          "give no --query, --item or --sheet with it")
        refused = answer_stdin(IndexedCollection(index_dir, model_path, whitening_path),
                               iter(sys.stdin.readline, ""), k, as_json)
        if refused:
            log.info("%d line(s) refused", refused)
        return
    require(query_files or query_items, "give a query: --query <image file> or --item <split>:<id> (or --stdin)")
    require(sheet is None or len(query_files) + len(query_items) == 1,
            "--sheet: draws one query; give a single --query or --item")
    collection = IndexedCollection(index_dir, model_path, whitening_path)
    queries = collection.queries(query_items, query_files)
    results = collection.results(queries, k)
    click.echo(json.dumps({"k": k, "queries": results}, indent=2) if as_json else as_text(results))
    if sheet is not None:
        write_sheet(sheet, queries[0], results[0], prepared)


if __name__ == "__main__":
    main()
