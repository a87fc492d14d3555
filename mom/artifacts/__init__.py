"""The files stages pass each other: one schema, one writer and one checked reader each.

Where each artifact's contract lives (docs/stages.md says which stage writes and reads it):

=========================================  ==========================================================
artifact                                   writer / reader
=========================================  ==========================================================
``<split>/manifest.parquet``, ``pixels.npy``  :class:`mom.imagestore.ImageStore` (``write_image_store``, ``open``)
features ``<split>.npy``                   :mod:`mom.artifacts.arrays` (``write_features``, ``read_features``)
graph ``adjacency.npz``                    :mod:`mom.artifacts.arrays` (``write_adjacency``, ``read_adjacency``)
``knn.parquet``, ``anchors.parquet``,      :mod:`mom.artifacts.tables` (``write_<table>``, ``read_<table>``)
``manifold_knn.parquet``, ``pools.parquet``,
``ground_truth.parquet``
``whitening.npz``                          :mod:`mom.whitening` (``save_whitening``, ``load_whitening``)
``model.pt``, ``start.pt``, checkpoints    :mod:`mom.networks` (``save_checkpoint``, ``load_checkpoint``),
                                           :mod:`mom.training` (the resumable training state)
fine-tuning log (DVCLive folder)           :mod:`mom.training_log`
JSON reports read by later stages          :mod:`mom.artifacts.reports`
=========================================  ==========================================================

Every reader raises one :class:`~mom.errors.InputError` line naming the file
for a missing, empty, truncated or foreign file, object (pickled) content
(never loaded), wrong dtypes, shapes, columns or column types, NaN/inf where
the contract forbids them and ids out of range or inconsistent with the other
inputs. Every writer is atomic and deterministic (:mod:`mom.artifacts.files`).
"""
from mom.artifacts.files import (  # noqa: F401 - the format-level helpers, importable from mom.artifacts
    NPY_MAGIC, atomic_path, load_csr, load_json, load_npy, load_npz, load_parquet, npy_header,
    open_npy_for_writing, require_file, save_csr, save_figure, save_json, save_npy, save_parquet, save_text,
    to_jsonable,
)
