"""The retrieval benchmarks as one table: how each is parsed and fetched.

Every benchmark goes the same way: its parser (``load_<name>`` of its module)
reads the released ground truth into a :class:`~mom.datasets.retrieval.Benchmark`,
and :func:`~mom.datasets.retrieval.retrieval_dataset` turns that into the
splits and the ground-truth table. Only the parser and the way to fetch the
files differ, so one row per benchmark says both.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mom.datasets import PreparedDataset
from mom.datasets.holidays import load_holidays
from mom.datasets.instre import load_instre
from mom.datasets.oxford_classic import download_classic, load_classic
from mom.datasets.retrieval import Benchmark, retrieval_dataset
from mom.datasets.revisited import download_revisited, load_revisited
from mom.errors import InputError


@dataclass(frozen=True)
class RetrievalSource:
    """``load(root)`` parses the benchmark; ``download(root)`` fetches it, or
    ``None`` with ``by_hand`` saying what to fetch (no stable public address)."""

    load: Callable[[Path], Benchmark]
    download: Callable[[Path], None] | None = None
    by_hand: str = ""


RETRIEVAL_SOURCES = {
    "roxford5k": RetrievalSource(lambda root: load_revisited(root, "roxford5k"),
                                 lambda root: download_revisited(root, "roxford5k")),
    "rparis6k": RetrievalSource(lambda root: load_revisited(root, "rparis6k"),
                                lambda root: download_revisited(root, "rparis6k")),
    "oxford5k": RetrievalSource(lambda root: load_classic(root, "oxford5k"),
                                lambda root: download_classic(root, "oxford5k")),
    "paris6k": RetrievalSource(lambda root: load_classic(root, "paris6k"),
                               lambda root: download_classic(root, "paris6k")),
    "holidays": RetrievalSource(load_holidays, by_hand="INRIA Holidays has no stable public address; "
                                                       "fetch jpg1/jpg2 by hand"),
    "instre": RetrievalSource(load_instre, by_hand="INSTRE has no stable public address; fetch the images and "
                                                   "gnd_instre.mat by hand"),
}


def prepare_retrieval(
    name: str,
    root: str | Path,
    max_side: int = 1024,
    workers: int = 1,
    distractors_root: str | Path | None = None,
    train_root: str | Path | None = None,
    download: bool = False,
) -> PreparedDataset:
    """The splits (query, database, train, empty val) and ground truth of the benchmark ``name``."""
    if name not in RETRIEVAL_SOURCES:
        raise InputError(f"source: unknown retrieval benchmark {name!r}; allowed: {', '.join(RETRIEVAL_SOURCES)}")
    source = RETRIEVAL_SOURCES[name]
    if download:
        if source.download is None:
            raise InputError(f"download: {source.by_hand}")
        source.download(Path(root))
    return retrieval_dataset(source.load(root), max_side, workers, distractors_root, train_root)
