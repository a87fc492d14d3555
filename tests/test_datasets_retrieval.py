"""Classic Oxford/Paris, Holidays and INSTRE on tiny copies of their layouts."""
import numpy as np
import pytest
import scipy.io
from click.testing import CliRunner
from PIL import Image

from mom import artifacts
from mom.datasets.benchmarks import prepare_retrieval
from mom.datasets.holidays import load_holidays
from mom.datasets.instre import load_instre
from mom.datasets.oxford_classic import load_classic
from mom.datasets.retrieval import ground_truth_table, protocol_lists
from mom.errors import InputError
from mom.imagestore import ImageStore
from stages.prepare import main


def _image(path, seed, size=(20, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="PNG")  # lossless, whatever the extension says


def _triples(table):
    data = table.to_pydict()
    return list(zip(data["query"], data["database"], data["relevance"]))


def _make_oxford(root):
    for i, name in enumerate(["all_souls_000013", "all_souls_000026", "ashmolean_000007", "balliol_000051",
                              "christ_church_000179"]):
        _image(root / "jpg" / f"{name}.jpg", i)
    gt = root / "gt"
    gt.mkdir()
    (gt / "all_souls_1_query.txt").write_text("oxc1_all_souls_000013 1.4 2.0 15.6 18.0\n")
    (gt / "all_souls_1_good.txt").write_text("all_souls_000013\nall_souls_000026\n")
    (gt / "all_souls_1_ok.txt").write_text("christ_church_000179\n")
    (gt / "all_souls_1_junk.txt").write_text("balliol_000051\n")
    (gt / "ashmolean_1_query.txt").write_text("oxc1_ashmolean_000007 0 0 30 20\n")
    (gt / "ashmolean_1_good.txt").write_text("ashmolean_000007\n")
    (gt / "ashmolean_1_ok.txt").write_text("")
    (gt / "ashmolean_1_junk.txt").write_text("")


def test_classic_oxford_lists_and_query_crop(tmp_path):
    _make_oxford(tmp_path)
    benchmark = load_classic(tmp_path, "oxford5k")
    assert [item.origin for item in benchmark.database] == [
        "jpg/all_souls_000013.jpg", "jpg/all_souls_000026.jpg", "jpg/ashmolean_000007.jpg",
        "jpg/balliol_000051.jpg", "jpg/christ_church_000179.jpg"]
    assert benchmark.queries[0].crop == (1.4, 2.0, 15.6, 18.0)
    assert benchmark.queries[0].origin == "jpg/all_souls_000013.jpg#crop=1.4,2,15.6,18"
    table = ground_truth_table(benchmark.relevance, 2, 5)
    assert _triples(table) == [(0, 0, "good"), (0, 1, "good"), (0, 3, "junk"), (0, 4, "ok"), (1, 2, "good")]
    lists = protocol_lists(table, 2, "classic")
    assert [(p.tolist(), j.tolist()) for p, j in lists] == [([0, 1, 4], [3]), ([2], [])]
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["--source", "oxford5k", "--root", str(tmp_path), "--max_side", "0",
                                       "--workers", "1", "--out-dir", str(out)])
    assert result.exit_code == 0, result.output
    query = ImageStore.open(out / "query")
    full = np.asarray(Image.open(tmp_path / "jpg" / "all_souls_000013.jpg"))
    np.testing.assert_array_equal(query[0], full[2:18, 1:16])  # box rounded: (1, 2, 16, 18)
    assert artifacts.load_json(out / "report.json")["protocols"] == ["classic"]


def test_classic_paris_nested_images_and_corrupt_list(tmp_path):
    _image(tmp_path / "jpg" / "paris" / "defense" / "paris_defense_000605.jpg", 1)
    _image(tmp_path / "jpg" / "paris" / "louvre" / "paris_louvre_000136.jpg", 2)  # on the authors' corrupt list
    _image(tmp_path / "jpg" / "paris" / "louvre" / "paris_louvre_000137.jpg", 3)
    lab = tmp_path / "lab"
    lab.mkdir()
    (lab / "defense_1_query.txt").write_text("paris_defense_000605 2 2 20 15\n")
    (lab / "defense_1_good.txt").write_text("paris_defense_000605\n")
    (lab / "defense_1_ok.txt").write_text("paris_louvre_000136\n")
    (lab / "defense_1_junk.txt").write_text("paris_louvre_000137\n")
    benchmark = load_classic(tmp_path, "paris6k")
    assert [item.origin for item in benchmark.database] == [
        "jpg/paris/defense/paris_defense_000605.jpg", "jpg/paris/louvre/paris_louvre_000137.jpg"]
    assert sorted(benchmark.relevance) == [(0, 0, "good"), (0, 1, "junk")]


def test_classic_errors(tmp_path):
    with pytest.raises(InputError, match="no \\*_query.txt"):
        load_classic(tmp_path, "oxford5k")
    _make_oxford(tmp_path)
    (tmp_path / "gt" / "ashmolean_1_junk.txt").write_text("radcliffe_camera_000001\n")
    with pytest.raises(InputError, match="lists radcliffe_camera_000001, which is not among the images"):
        load_classic(tmp_path, "oxford5k")
    (tmp_path / "gt" / "ashmolean_1_junk.txt").unlink()
    with pytest.raises(InputError, match="ashmolean_1_junk.txt not found"):
        load_classic(tmp_path, "oxford5k")
    (tmp_path / "gt" / "ashmolean_1_query.txt").write_text("oxc1_ashmolean_000007 0 0 30\n")
    with pytest.raises(InputError, match="expected '<image> x0 y0 x1 y1'"):
        load_classic(tmp_path, "oxford5k")


def test_holidays_groups_queries_and_junk_self(tmp_path):
    for i, stem in enumerate(["100000", "100001", "100002", "100100", "100200", "100201"]):
        _image(tmp_path / "jpg" / f"{stem}.jpg", i)
    benchmark = load_holidays(tmp_path)
    assert [item.origin for item in benchmark.queries] == ["jpg/100000.jpg", "jpg/100100.jpg", "jpg/100200.jpg"]
    assert len(benchmark.database) == 6 and all(item.crop is None for item in benchmark.queries)
    table = ground_truth_table(benchmark.relevance, 3, 6)
    lists = protocol_lists(table, 3, "positive")
    assert [(p.tolist(), j.tolist()) for p, j in lists] == [([1, 2], [0]), ([], [3]), ([5], [4])]
    dataset = prepare_retrieval("holidays", tmp_path, max_side=8)
    assert dataset.info["queries"] == 3 and dataset.info["full_set"] is False
    (tmp_path / "jpg" / "100300_rotated.jpg").write_bytes(b"")
    with pytest.raises(InputError, match="six digits"):
        load_holidays(tmp_path)
    with pytest.raises(InputError, match="download: INRIA Holidays has no stable"):
        prepare_retrieval("holidays", tmp_path, download=True)


def test_holidays_group_without_query_is_an_error(tmp_path):
    _image(tmp_path / "100001.jpg", 0)
    with pytest.raises(InputError, match="group 1000 has no query image 100000.jpg"):
        load_holidays(tmp_path)


def _make_instre(root, ok=((1, 2), (3,)), boxes=((2, 3, 10, 12), (0, 0, 30, 20))):
    imlist = ["INSTRE-S1/01a_canada_book/001.jpg", "INSTRE-S1/01a_canada_book/002.jpg",
              "INSTRE-S2/02_pair/003.jpg", "INSTRE-M/01/004.jpg"]
    qimlist = ["INSTRE-S1/01a_canada_book/005.jpg", "INSTRE-M/01/006.jpg"]
    for i, name in enumerate(imlist + qimlist):
        _image(root / name, i)
    gnd = np.zeros((1, len(qimlist)), dtype=[("ok", object), ("bbx", object)])
    for q in range(len(qimlist)):
        gnd[0, q] = (np.array([ok[q]], dtype=np.float64), np.array([boxes[q]], dtype=np.float64))
    cell = lambda names: np.array([names], dtype=object)  # noqa: E731 - a 1xN MATLAB cell
    scipy.io.savemat(root / "gnd_instre.mat", {"imlist": cell(imlist), "qimlist": cell(qimlist), "gnd": gnd})
    return imlist, qimlist


def test_instre_split_boxes_and_ground_truth(tmp_path):
    imlist, qimlist = _make_instre(tmp_path)
    benchmark = load_instre(tmp_path)
    assert [item.origin for item in benchmark.database] == imlist
    assert benchmark.queries[0].crop == (2.0, 3.0, 12.0, 15.0)  # (x, y, w, h) -> (x0, y0, x1, y1)
    assert sorted(benchmark.relevance) == [(0, 0, "positive"), (0, 1, "positive"), (1, 2, "positive")]
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["--source", "instre", "--root", str(tmp_path), "--max_side", "0",
                                       "--workers", "1", "--out-dir", str(out)])
    assert result.exit_code == 0, result.output
    full = np.asarray(Image.open(tmp_path / qimlist[0]))
    np.testing.assert_array_equal(ImageStore.open(out / "query")[0], full[3:15, 2:12])
    table = artifacts.load_parquet(out / "ground_truth.parquet")
    assert _triples(table) == [(0, 0, "positive"), (0, 1, "positive"), (1, 2, "positive")]


def test_instre_errors(tmp_path):
    with pytest.raises(InputError, match="gnd_instre.mat not found"):
        load_instre(tmp_path)
    _make_instre(tmp_path / "a", ok=((0,), (3,)))
    with pytest.raises(InputError, match="1-based indices"):
        load_instre(tmp_path / "a")
    _make_instre(tmp_path / "b", boxes=((2, 3, 0, 12), (0, 0, 30, 20)))
    with pytest.raises(InputError, match="bounding box"):
        load_instre(tmp_path / "b")


def test_classic_download_offline_is_one_clear_error(tmp_path, monkeypatch):
    from mom.datasets import oxford_classic
    monkeypatch.setattr(oxford_classic, "ARCHIVES", {"oxford5k": {"gt": ["http://127.0.0.1:9/gt_files_170407.tgz"]}})
    (tmp_path / "SHA256SUMS").write_text(f"{'0' * 64}  gt_files_170407.tgz\n")
    with pytest.raises(InputError, match="download: cannot fetch http://127.0.0.1:9/gt_files_170407.tgz"):
        prepare_retrieval("oxford5k", tmp_path, download=True)
