"""The artifact readers of mom.artifacts refuse bad files in one line naming them,
and the cases of the corrupt-inputs report give exit status 2 with one line.

(tests/test_fuzz_artifacts.py substitutes every corruption into every input of
every stage of dvc.yaml; this file is the fast, in-process part.)
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp

from mom import artifacts
from mom.artifacts import arrays, reports, tables
from mom.errors import InputError


def one_line(error: pytest.ExceptionInfo, path) -> str:
    message = str(error.value)
    assert "\n" not in message and str(path) in message, message
    return message


def assert_refused(read, path, expected: str, named=None, **options) -> str:
    """``read(path, **options)`` raises an InputError matching ``expected``, one line naming ``named`` (``path``)."""
    with pytest.raises(InputError, match=expected) as error:
        read(path, **options)
    return one_line(error, path if named is None else named)


@pytest.fixture
def features(tmp_path):
    values = np.random.default_rng(0).standard_normal((20, 4)).astype(np.float32)
    values /= np.linalg.norm(values, axis=1, keepdims=True)
    return values


@pytest.mark.parametrize("content, expected", [
    (b"", "empty file"),
    (b"root:x:0:0:root:/root:/bin/bash\n", "not a .npy file"),
])
def test_npy_reader_refuses_foreign_and_empty_files(tmp_path, content, expected):
    path = tmp_path / "train.npy"
    path.write_bytes(content)
    assert_refused(arrays.read_features, path, expected)


def test_npy_reader_refuses_objects_without_loading_them(tmp_path):
    path = tmp_path / "train.npy"
    np.save(path, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    for mmap in (False, True):
        assert_refused(arrays.read_features, path, "Python objects", mmap=mmap)


def test_npy_reader_refuses_truncated_and_padded_files(tmp_path, features):
    path = tmp_path / "train.npy"
    artifacts.save_npy(path, features)
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    for mmap in (False, True):
        assert_refused(arrays.read_features, path, "truncated", mmap=mmap)
    path.write_bytes(whole + b"\0" * 8)
    with pytest.raises(InputError, match="longer than its header"):
        arrays.read_features(path)


@pytest.mark.parametrize("array, expected", [
    (np.zeros(5, np.float32), "2-D"),
    (np.zeros((5, 3), np.int64), "floating point"),
])
def test_features_reader_checks_shape_and_dtype(tmp_path, array, expected):
    path = tmp_path / "train.npy"
    np.save(path, array)
    with pytest.raises(InputError, match=expected):
        arrays.read_features(path)


def test_features_reader_checks_rows_and_values(tmp_path, features):
    path = tmp_path / "new_images.npy"
    artifacts.save_npy(path, features)
    assert np.array_equal(arrays.read_features(path, n_items=20, check_finite=True), features)
    with pytest.raises(InputError, match="20 rows, the manifest has 21"):
        arrays.read_features(path, n_items=21, owner="the manifest")
    features[3, 1] = np.nan
    artifacts.save_npy(path, features)
    with pytest.raises(InputError, match="NaN or inf values in rows 3"):
        arrays.read_features(path, check_finite=True)


def test_adjacency_reader(tmp_path):
    dense = np.array([[0, 0.5, 0], [0.5, 0, 0.25], [0, 0.25, 0]], dtype=np.float32)
    path = tmp_path / "adjacency.npz"
    arrays.write_adjacency(path, sp.csr_matrix(dense))
    assert np.array_equal(arrays.read_adjacency(path, n_items=3).toarray(), dense)
    with pytest.raises(InputError, match="3 nodes, the features have 4"):
        arrays.read_adjacency(path, n_items=4)
    for bad, expected in ((np.triu(dense), "not symmetric"), (dense + np.eye(3, dtype=np.float32), "self-loops"),
                          (-dense, "finite and positive")):
        arrays.write_adjacency(path, sp.csr_matrix(bad))
        with pytest.raises(InputError, match=expected):
            arrays.read_adjacency(path)
    np.save(tmp_path / "features.npy", dense)
    (tmp_path / "features.npy").rename(path)  # an .npy where the .npz belongs
    assert_refused(arrays.read_adjacency, path, "not an .npz archive")


def test_npz_reader_refuses_objects_and_missing_arrays(tmp_path):
    path = tmp_path / "adjacency.npz"
    np.savez(path, format=np.array([{"x": 1}], dtype=object), shape=np.array([2, 2]), indptr=np.zeros(3),
             indices=np.zeros(0), data=np.zeros(0))
    with pytest.raises(InputError, match="Python objects"):
        artifacts.load_csr(path)
    np.savez(path, format=np.array(b"csr"))
    with pytest.raises(InputError, match="missing arrays"):
        artifacts.load_csr(path)


def write_anchors(path, items=(3, 1, 2)):
    tables.write_anchors(path, np.array(items), np.full(len(items), 0.1), "all")


def test_anchors_roundtrip_and_ids(tmp_path):
    path = tmp_path / "anchors.parquet"
    write_anchors(path)
    assert tables.read_anchors(path, n_items=4).tolist() == [3, 1, 2]
    assert_refused(tables.read_anchors, path, "id 3 outside 0..2", n_items=3)
    write_anchors(path, (1, 1))
    with pytest.raises(InputError, match="listed twice"):
        tables.read_anchors(path)


@pytest.mark.parametrize("change, expected", [
    (lambda t: t.drop_columns(["probability"]), "missing columns"),
    (lambda t: t.set_column(0, "item", t.column("item").cast(pa.string())), "column item holds string"),
    (lambda t: t.set_column(1, "probability", pa.array([np.nan, 0.1, 0.1])), "NaN or inf"),
    (lambda t: t.set_column(0, "item", pa.array([3, None, 2], pa.int64())), "null values"),
    (lambda t: t.set_column(2, "rank", pa.array([0, 1, 2], pa.int32())), "rank must start at 1"),
    (lambda t: t.slice(0, 0), "no anchors"),
])
def test_table_contract_is_checked(tmp_path, change, expected):
    path = tmp_path / "anchors.parquet"
    write_anchors(path)
    pq.write_table(change(pq.read_table(path)), path)
    assert_refused(tables.read_anchors, path, expected)


def test_parquet_reader_refuses_text_truncation_and_empty(tmp_path):
    path = tmp_path / "anchors.parquet"
    write_anchors(path)
    whole = path.read_bytes()
    for content, expected in ((b"item,rank\n1,1\n", "not a Parquet file"), (whole[:-10], "truncated"),
                              (b"", "empty file")):
        path.write_bytes(content)
        assert_refused(tables.read_anchors, path, expected)


def test_manifold_and_pools_consistency_with_anchors(tmp_path):
    path = tmp_path / "manifold_knn.parquet"
    tables.write_manifold_knn(path, np.array([4, 7]), np.array([[1, 2, -1], [3, -1, -1]]),
                              np.array([[0.9, 0.5, 0], [0.8, 0, 0]], dtype=np.float32))
    table = tables.read_manifold_knn(path, n_items=8, anchors=np.array([7, 4]))
    ids, values = tables.manifold_neighbour_matrix(path, table, np.array([7, 4]))
    assert ids.tolist() == [[3, -1], [1, 2]] and values[1, 1] == np.float32(0.5)
    with pytest.raises(InputError, match="not in the anchor list"):
        tables.read_manifold_knn(path, anchors=np.array([4]))
    pools = tmp_path / "pools.parquet"
    tables.write_pools(pools, {"anchor": [4, 4], "member": [1, 5], "kind": ["positive", "negative"], "rank": [1, 1],
                               "manifold_similarity": np.float32([0.9, 0]), "euclidean_similarity": np.float32([1, 0])},
                       np.array([True, False]))
    columns = tables.pool_columns(tables.read_pools(pools, n_items=8, anchors=np.array([4])))
    assert np.isnan(columns["manifold_similarity"][1]) and columns["member"].tolist() == [1, 5]
    with pytest.raises(InputError, match="pool anchors are not in"):
        tables.read_pools(pools, anchors=np.array([7]))


def test_manifold_neighbours_at_one_rank_are_refused(tmp_path):
    path = tmp_path / "manifold_knn.parquet"
    tables.write_table(path, tables.MANIFOLD_KNN, {"anchor": [4, 4], "neighbour": [1, 2], "rank": [2, 2],
                                                   "similarity": np.float32([0.9, 0.5])})
    table = tables.read_manifold_knn(path, n_items=8, anchors=np.array([4]))
    assert_refused(lambda p: tables.manifold_neighbour_matrix(p, table, np.array([4])), path,
                   "two neighbours at the same rank")


@pytest.mark.parametrize("text, expected", [
    (b"", "empty file"), (b"{\"backbone\": ", "not valid JSON"), (b"\xff\xfe\x00", "not UTF-8"),
    (b"[1, 2]", "expected a JSON object"), (b"{\"backbone\": \"x\", \"pooling\": \"gem\", \"scales\": [\"a\"]}", "scales"),
])
def test_report_readers(tmp_path, text, expected):
    path = tmp_path / "report.json"
    path.write_bytes(text)
    assert_refused(reports.read_extract_report, path, expected)


def test_proxy_report_reader_checks_the_numbers_the_headline_reads(tmp_path):
    path = tmp_path / "proxy.json"
    artifacts.save_json(path, {"new_images": {"levels": {"mild": {"initial": {"map": 0.5}}}}})
    assert reports.read_proxy_report(path)["new_images"]["levels"]["mild"]["initial"]["map"] == 0.5
    artifacts.save_json(path, {"new_images": {"levels": {"mild": {"initial": {"map": "x"}}}}})
    with pytest.raises(InputError, match="new_images.levels.mild.initial.map"):
        reports.read_proxy_report(path)


# The seven cases of the corrupt-inputs report: each stage run with one input replaced.

def run_stage(module, args, capsys) -> tuple[int, list[str]]:
    with pytest.raises(SystemExit) as stop:
        module.main(args=[str(arg) for arg in args], standalone_mode=True)
    errors = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    return stop.value.code, errors


@pytest.fixture
def bad_inputs(tmp_path, features):
    made = {}
    made["passwd"] = tmp_path / "passwd.npy"
    made["passwd"].write_bytes(b"root:x:0:0:root:/root:/bin/bash\n")
    made["objects"] = tmp_path / "objects.npy"
    np.save(made["objects"], np.array([{"a": 1}], dtype=object), allow_pickle=True)
    made["half"] = tmp_path / "half.npy"
    artifacts.save_npy(made["half"], features)
    made["half"].write_bytes(made["half"].read_bytes()[:100])
    made["empty"] = tmp_path / "empty.npy"
    made["empty"].write_bytes(b"")
    made["one_d"] = tmp_path / "one_d.npy"
    np.save(made["one_d"], features.ravel())
    made["int64"] = tmp_path / "int64.npy"
    np.save(made["int64"], np.zeros((20, 4), np.int64))
    made["npy_as_npz"] = tmp_path / "adjacency.npz"
    np.save(tmp_path / "plain.npy", features)
    (tmp_path / "plain.npy").rename(made["npy_as_npz"])
    made["text_parquet"] = tmp_path / "anchors.parquet"
    made["text_parquet"].write_text("item,rank\n0,1\n")
    return made


def test_the_seven_reported_cases_are_one_line_with_exit_status_2(tmp_path, bad_inputs, capsys):
    from stages import anchors, diffuse, graph

    out = tmp_path / "out"
    cases = [(graph, ["--features", bad_inputs[name], "--out-dir", out], bad_inputs[name])
             for name in ("passwd", "objects", "half", "empty", "one_d", "int64")]
    cases.append((anchors, ["--graph", bad_inputs["npy_as_npz"], "--out-dir", out], bad_inputs["npy_as_npz"]))
    good_graph = tmp_path / "graph.npz"
    arrays.write_adjacency(good_graph, sp.csr_matrix(np.array([[0, 1.0], [1.0, 0]], dtype=np.float32)))
    cases.append((diffuse, ["--graph", good_graph, "--anchors", bad_inputs["text_parquet"], "--k", 1,
                            "--out-dir", out], bad_inputs["text_parquet"]))
    for module, args, path in cases:
        code, errors = run_stage(module, args, capsys)
        assert code == 2 and len(errors) == 1 and str(path) in errors[0], (module.__name__, path, errors)
    assert not out.exists()


def test_training_log_is_checked_against_its_summary(tmp_path):
    from mom.training_log import read_training_log, write_training_log

    folder = tmp_path / "live"
    write_training_log(folder, [{"epoch": 1, "loss": 0.5, "active": 0.2}, {"epoch": 2, "loss": 0.25, "active": 0.1}],
                       initial_val_recall=0.7)
    assert [row["epoch"] for row in read_training_log(folder)] == [0, 1, 2]
    loss = folder / "plots" / "metrics" / "loss.tsv"
    whole = loss.read_text()
    loss.write_text("\n".join(whole.splitlines()[:-1]) + "\n")  # the last epoch lost
    assert_refused(read_training_log, folder, "differs from", named=loss)
    loss.unlink()
    with pytest.raises(InputError, match="file not found"):
        read_training_log(folder)
    with pytest.raises(InputError, match="folder not found"):
        read_training_log(tmp_path / "nothing")


def test_a_split_folder_without_its_files_is_an_error(tmp_path):
    from mom.imagestore import ImageStore, split_written, write_image_store

    assert not split_written(tmp_path / "val")
    write_image_store(tmp_path / "val", (np.zeros((2, 2), np.uint8) for _ in range(2)),
                      {"source": ["t"] * 2, "split": ["val"] * 2, "origin": ["a", "b"]})
    assert split_written(tmp_path / "val") and len(ImageStore.open(tmp_path / "val")) == 2
    (tmp_path / "val" / "manifest.parquet").unlink()
    assert split_written(tmp_path / "val")
    with pytest.raises(InputError, match="manifest.parquet: file not found"):
        ImageStore.open(tmp_path / "val")
