import pickle

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from mom import artifacts
from mom.datasets import revisited
from mom.datasets.retrieval import PROTOCOLS, protocol_lists
from mom.datasets.benchmarks import prepare_retrieval
from mom.errors import InputError
from mom.imagestore import ImageStore, write_image_store
from stages.prepare import main


def _pattern(seed, height=24, width=32):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _make_revisited(root, name="roxford5k", gnd=None, pickle_protocol=2):
    """A tiny copy of the revisitop layout: gnd_<name>.pkl + jpg/<name>.jpg."""
    imlist = [f"all_souls_{i:06d}" for i in range(6)]
    qimlist = ["ashmolean_000001", "bodleian_000002"]
    (root / "jpg").mkdir(parents=True)
    for seed, im in enumerate(imlist + qimlist):
        Image.fromarray(_pattern(seed)).save(root / "jpg" / f"{im}.jpg", quality=95)
    if gnd is None:
        gnd = [
            # Arrays as the released pickle holds them, and plain lists: both are read.
            {"bbx": np.array([2.4, 3.6, 20.5, 17.0]), "easy": np.array([0, 2]), "hard": np.array([5]),
             "junk": np.array([1])},
            {"bbx": [0, 0, 32, 24], "easy": [], "hard": [3, 4], "junk": []},
        ]
    data = {"imlist": imlist, "qimlist": qimlist, "gnd": gnd}
    (root / f"gnd_{name}.pkl").write_bytes(pickle.dumps(data, protocol=pickle_protocol))
    return imlist, qimlist


def _write(dataset, folder):
    for split, stream in dataset.splits.items():
        write_image_store(folder / split, stream.images(), stream.columns)
    return {split: ImageStore.open(folder / split) for split in dataset.splits}


def test_splits_crops_and_ground_truth(tmp_path):
    imlist, qimlist = _make_revisited(tmp_path / "roxford5k")
    dataset = prepare_retrieval("roxford5k", tmp_path / "roxford5k", max_side=0)
    stores = _write(dataset, tmp_path / "out")
    database, query = stores["database"], stores["query"]
    assert database.origins == [f"jpg/{im}.jpg" for im in imlist]
    assert query.origins == ["jpg/ashmolean_000001.jpg#crop=2.4,3.6,20.5,17", "jpg/bodleian_000002.jpg#crop=0,0,32,24"]
    for i, im in enumerate(imlist):
        np.testing.assert_array_equal(database[i], np.asarray(Image.open(tmp_path / "roxford5k" / "jpg" / f"{im}.jpg")))
    full = np.asarray(Image.open(tmp_path / "roxford5k" / "jpg" / f"{qimlist[0]}.jpg"))
    # Pillow's crop rounds the box: (2, 4, 20, 17) -> rows 4..16, columns 2..19.
    np.testing.assert_array_equal(query[0], full[4:17, 2:20])
    assert query[1].shape == (24, 32, 3)
    assert stores["train"].origins == database.origins  # unlabeled training collection = database by default
    assert len(stores["val"]) == 0 and "new_classes" not in stores and "new_images" not in stores
    table = dataset.ground_truth.to_pydict()
    assert list(zip(table["query"], table["database"], table["relevance"])) == [
        (0, 0, "easy"), (0, 1, "junk"), (0, 2, "easy"), (0, 5, "hard"), (1, 3, "hard"), (1, 4, "hard")]
    assert dataset.info["protocols"] == ["easy", "medium", "hard"] and dataset.info["full_set"] is False


def test_easy_medium_hard_lists(tmp_path):
    _make_revisited(tmp_path / "r")
    table = prepare_retrieval("roxford5k", tmp_path / "r").ground_truth
    lists = {protocol: protocol_lists(table, 2, protocol) for protocol in ("easy", "medium", "hard")}
    as_lists = {p: [(pos.tolist(), junk.tolist()) for pos, junk in v] for p, v in lists.items()}
    assert as_lists["easy"] == [([0, 2], [1, 5]), ([], [3, 4])]
    assert as_lists["medium"] == [([0, 2, 5], [1]), ([3, 4], [])]
    assert as_lists["hard"] == [([5], [0, 1, 2]), ([3, 4], [])]
    assert PROTOCOLS["medium"] == (("easy", "hard"), ("junk",))
    with pytest.raises(InputError, match="protocol"):
        protocol_lists(table, 2, "extreme")


def test_distractors_and_train_root(tmp_path):
    _make_revisited(tmp_path / "r", name="rparis6k")
    distractors = tmp_path / "revisitop1m" / "jpg"
    distractors.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(_pattern(100 + i)).save(distractors / f"d{i}.jpg")
    (distractors / "broken.jpg").write_bytes(b"not a jpeg")
    train = tmp_path / "train"
    train.mkdir()
    Image.fromarray(_pattern(200)).save(train / "t.png")
    dataset = prepare_retrieval("rparis6k", tmp_path / "r", distractors_root=tmp_path / "revisitop1m",
                                train_root=train, max_side=16)
    stores = _write(dataset, tmp_path / "out")
    assert len(stores["database"]) == 6 + 3
    assert stores["database"].origins[6:] == [f"distractors/jpg/d{i}.jpg" for i in range(3)]
    assert stores["train"].origins == ["t.png"]
    assert stores["database"].shapes[:, :2].max() <= 16
    assert [entry["path"] for entry in dataset.rejected] == ["distractors/jpg/broken.jpg"]
    assert dataset.ground_truth.column("database").to_numpy().max() < 6  # distractors are never relevant


def test_bad_ground_truth_files(tmp_path):
    with pytest.raises(InputError, match=r"gnd_roxford5k.pkl \(or .mat\) not found"):
        prepare_retrieval("roxford5k", tmp_path)
    _make_revisited(tmp_path / "a", gnd=[{"bbx": [0, 0, 5, 5], "easy": [6], "hard": [], "junk": []}] * 2)
    with pytest.raises(InputError, match=r"gnd\[0\]\['easy'\]: indices must be integers in 0..5"):
        prepare_retrieval("roxford5k", tmp_path / "a")
    _make_revisited(tmp_path / "b", gnd=[{"bbx": [5, 0, 5, 5], "easy": [], "hard": [], "junk": []}] * 2)
    with pytest.raises(InputError, match="bounding box"):
        prepare_retrieval("roxford5k", tmp_path / "b")
    _make_revisited(tmp_path / "c", gnd=[{"bbx": [0, 0, 5, 5], "easy": [1], "hard": [1], "junk": []}] * 2)
    with pytest.raises(InputError, match="under two levels"):
        prepare_retrieval("roxford5k", tmp_path / "c")
    _make_revisited(tmp_path / "d")
    (tmp_path / "d" / "jpg" / "all_souls_000003.jpg").unlink()
    with pytest.raises(InputError, match="1 of 6 database images are missing, first: .*all_souls_000003.jpg"):
        prepare_retrieval("roxford5k", tmp_path / "d")


class _Exploit:
    def __reduce__(self):
        import os
        return (os.system, ("echo owned",))


def test_a_ground_truth_pickle_that_runs_code_is_refused(tmp_path):
    _make_revisited(tmp_path / "e", gnd=[_Exploit(), _Exploit()])
    with pytest.raises(InputError, match=r"gnd_roxford5k.pkl: refusing (STACK_)?GLOBAL at byte \d+: global posix.system"):
        prepare_retrieval("roxford5k", tmp_path / "e")


def test_download_offline_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(revisited, "GROUND_TRUTH_URL", "http://127.0.0.1:9/{name}/gnd_{name}.pkl")
    (tmp_path / "roxford5k").mkdir()
    (tmp_path / "roxford5k" / "SHA256SUMS").write_text(f"{'0' * 64}  gnd_roxford5k.pkl\n")
    with pytest.raises(InputError, match=r"download: cannot fetch http://127.0.0.1:9/roxford5k/gnd_roxford5k.pkl .*offline\?"):
        prepare_retrieval("roxford5k", tmp_path / "roxford5k", download=True)
    assert not list((tmp_path / "roxford5k").glob("*.part"))


def test_cli_writes_query_database_and_ground_truth(tmp_path):
    _make_revisited(tmp_path / "roxford5k")
    out = tmp_path / "prepared"
    (out / "val").mkdir(parents=True)  # a stale split from an earlier source is replaced
    result = CliRunner().invoke(main, ["--source", "roxford5k", "--root", str(tmp_path / "roxford5k"),
                                       "--workers", "1", "--out-dir", str(out)])
    assert result.exit_code == 0, result.output
    report = artifacts.load_json(out / "report.json")
    assert report["splits"]["query"]["count"] == 2 and report["splits"]["database"]["count"] == 6
    assert report["ground_truth_pairs"] == {"easy": 2, "hard": 3, "junk": 1}
    table = artifacts.load_parquet(out / "ground_truth.parquet")
    assert table.schema.names == ["query", "database", "relevance"] and table.num_rows == 6
    assert ImageStore.open(out / "val").manifest.num_rows == 0


def test_protocol_lists_match_a_brute_force_filter_on_random_tables():
    from mom.datasets.retrieval import ground_truth_table

    rng = np.random.default_rng(0)
    n_queries, n_database = 7, 40
    pairs = {(int(q), int(d)) for q, d in zip(rng.integers(0, n_queries, 150), rng.integers(0, n_database, 150))}
    triples = [(q, d, str(rng.choice(["easy", "hard", "junk"]))) for q, d in sorted(pairs)]
    table = ground_truth_table(triples[::-1], n_queries, n_database)
    for protocol in ("easy", "medium", "hard"):
        positive, junk = PROTOCOLS[protocol]
        for q, (got_positive, got_junk) in enumerate(protocol_lists(table, n_queries, protocol)):
            assert got_positive.tolist() == sorted(d for qq, d, level in triples if qq == q and level in positive)
            assert got_junk.tolist() == sorted(d for qq, d, level in triples if qq == q and level in junk)


def test_matlab_release_gives_the_same_benchmark(tmp_path):
    import scipy.io

    from mom.datasets.revisited import load_revisited

    _make_revisited(tmp_path / "pkl")
    _make_revisited(tmp_path / "mat")
    (tmp_path / "mat" / "gnd_roxford5k.pkl").unlink()
    # The MATLAB layout: cells of names, a 1xQ struct with 1-based index rows.
    gnd = np.zeros((1, 2), dtype=[("bbx", object), ("easy", object), ("hard", object), ("junk", object)])
    gnd[0, 0] = (np.array([[2.4, 3.6, 20.5, 17.0]]), np.array([[1, 3]]), np.array([[6]]), np.array([[2]]))
    gnd[0, 1] = (np.array([[0, 0, 32, 24]]), np.zeros((1, 0)), np.array([[4, 5]]), np.zeros((1, 0)))
    cell = lambda names: np.array([names], dtype=object)  # noqa: E731
    imlist = [f"all_souls_{i:06d}" for i in range(6)]
    scipy.io.savemat(tmp_path / "mat" / "gnd_roxford5k.mat",
                     {"imlist": cell(imlist), "qimlist": cell(["ashmolean_000001", "bodleian_000002"]), "gnd": gnd})
    from_pickle, from_mat = load_revisited(tmp_path / "pkl", "roxford5k"), load_revisited(tmp_path / "mat", "roxford5k")
    assert sorted(from_mat.relevance) == sorted(from_pickle.relevance)
    assert [q.crop for q in from_mat.queries] == [q.crop for q in from_pickle.queries]
    assert [d.origin for d in from_mat.database] == [d.origin for d in from_pickle.database]
