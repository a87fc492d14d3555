"""The JSON reports that later stages read: one checked reader each.

- ``extract``'s ``report.json`` (read by ``index``): ``backbone``, ``pooling``
  (strings) and ``scales`` (positive integers) of the extraction.
- ``proxy_retrieval``'s report (read by ``evaluate`` for the headline): per
  evaluation split, ``levels`` -> level -> descriptor -> ``{"map": number, ...}``.
- ``evaluate``'s report (read by ``report``): per evaluation split, embedding ->
  ``{"recall_at_<k>": number, "nmi": number}``; ``retrieval`` -> embedding ->
  protocol -> ``{"map": number, ...}``.
- ``mine``'s ``purity.json`` (read by ``report``): pool variant -> statistics.
- ``index``'s ``index.json`` (read by ``search``): :data:`INDEX_SUMMARY_KEYS` at least.

A report that is not JSON, or whose numbers sit elsewhere than these readers
look, is one :class:`~mom.errors.InputError` line naming the file and the key.
"""
from __future__ import annotations

import math
import os

from mom.artifacts.files import load_json
from mom.errors import InputError

EVALUATION_SPLITS = ("new_images", "new_classes")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _mapping(path, value, where: str) -> dict:
    if not isinstance(value, dict):
        raise InputError(f"{path}: {where} must be a JSON object, got {type(value).__name__}")
    return value


def _numbers(path, section: dict, where: str, keys=None) -> None:
    for key, value in section.items():
        if (keys is None or key in keys) and value is not None and not _is_number(value):
            raise InputError(f"{path}: {where}.{key} must be a finite number, got {value!r}")


def read_extract_report(path: str | os.PathLike) -> dict:
    report = load_json(path)
    for key in ("backbone", "pooling"):
        if not isinstance(report.get(key), str):
            raise InputError(f"{path}: no {key!r} string (rerun extract)")
    scales = report.get("scales")
    if not (isinstance(scales, list) and scales and all(isinstance(s, int) and not isinstance(s, bool) and s >= 1
                                                        for s in scales)):
        raise InputError(f"{path}: no valid 'scales' list (rerun extract)")
    return report


def read_proxy_report(path: str | os.PathLike) -> dict:
    report = load_json(path)
    for split in EVALUATION_SPLITS:
        if split not in report:
            continue
        section = _mapping(path, report[split], split)
        levels = _mapping(path, section.get("levels", {}), f"{split}.levels")
        for level, descriptors in levels.items():
            for name, entry in _mapping(path, descriptors, f"{split}.levels.{level}").items():
                entry = _mapping(path, entry, f"{split}.levels.{level}.{name}")
                if not _is_number(entry.get("map")):
                    raise InputError(f"{path}: {split}.levels.{level}.{name}.map must be a finite number "
                                     "(rerun proxy_retrieval)")
                _numbers(path, entry, f"{split}.levels.{level}.{name}")
    return report


def read_evaluation_report(path: str | os.PathLike) -> dict:
    report = load_json(path)
    for split in EVALUATION_SPLITS:
        if split in report:
            section = _mapping(path, report[split], split)
            for version in ("initial", "start", "finetuned"):
                if version in section:
                    _numbers(path, _mapping(path, section[version], f"{split}.{version}"), f"{split}.{version}")
    if "retrieval" in report:
        retrieval = _mapping(path, report["retrieval"], "retrieval")
        for version in ("initial", "finetuned"):
            for protocol, entry in _mapping(path, retrieval.get(version, {}), f"retrieval.{version}").items():
                entry = _mapping(path, entry, f"retrieval.{version}.{protocol}")
                if not _is_number(entry.get("map")):
                    raise InputError(f"{path}: retrieval.{version}.{protocol}.map must be a finite number")
    return report


def read_purity_report(path: str | os.PathLike) -> dict:
    report = load_json(path)
    for name, section in report.items():
        if name.endswith(("_positives", "_negatives")):
            _numbers(path, _mapping(path, section, name), name)
    return report


INDEX_SUMMARY_KEYS = ("items", "splits", "max_side", "finetuned", "initial")


def read_index_summary(path: str | os.PathLike) -> dict:
    summary = load_json(path)
    missing = [key for key in INDEX_SUMMARY_KEYS if key not in summary]
    if missing:
        raise InputError(f"{path}: missing keys {missing} (rerun the index stage)")
    return summary
