import gzip
import struct

import numpy as np
import pytest
from click.testing import CliRunner

from mom import artifacts
from mom.datasets import per_class_sample
from mom.datasets.fashion_mnist import (
    CLASS_NAMES,
    FILES,
    load_fashion_mnist,
    prepare_fashion_mnist,
    read_idx,
    validate_params,
)
from mom.errors import InputError
from mom.imagestore import ImageStore, write_image_store
from stages.prepare import main

ROOT = "/usr/share/datasets/fashion-mnist"


@pytest.fixture(scope="module")
def fashion():
    return load_fashion_mnist(ROOT)


def _write(dataset, folder):
    for split, stream in dataset.splits.items():
        write_image_store(folder / split, stream.images(), stream.columns)
    return {split: ImageStore.open(folder / split) for split in dataset.splits}


def test_real_files_counts(fashion):
    images, labels, origins = fashion
    train = read_idx(f"{ROOT}/{FILES[0][0]}")
    test = read_idx(f"{ROOT}/{FILES[1][1]}")
    assert train.shape == (60000, 28, 28) and test.shape == (10000,)
    assert images.shape == (70000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [7000] * 10
    assert origins[0] == "train-images-idx3-ubyte.gz#0" and origins[60000] == "t10k-images-idx3-ubyte.gz#0"


def _idx_bytes(array):
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def test_read_idx_layout_and_errors(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "ok.gz").write_bytes(gzip.compress(_idx_bytes(array)))
    np.testing.assert_array_equal(read_idx(tmp_path / "ok.gz"), array)
    (tmp_path / "short.gz").write_bytes(gzip.compress(_idx_bytes(array)[:-1]))
    with pytest.raises(InputError, match="root: .*header says"):
        read_idx(tmp_path / "short.gz")
    (tmp_path / "magic.gz").write_bytes(gzip.compress(b"\x00\x00\x0d\x01" + b"\x00" * 8))
    with pytest.raises(InputError, match="bad magic"):
        read_idx(tmp_path / "magic.gz")
    (tmp_path / "notgz.gz").write_bytes(b"garbage, not gzip")
    with pytest.raises(InputError, match="not a readable gzip"):
        read_idx(tmp_path / "notgz.gz")
    with pytest.raises(InputError, match="not found"):
        read_idx(tmp_path / "missing.gz")
    # a header whose sizes multiply to 2**65: 0 in int64, which must not pass for an empty file
    (tmp_path / "wrap.gz").write_bytes(gzip.compress(bytes([0, 0, 8, 4]) + struct.pack(">4I", 2**31, 2**31, 4, 2)))
    with pytest.raises(InputError, match=r"holds 0 data bytes, its header says 36893488147419103232"):
        read_idx(tmp_path / "wrap.gz")


def test_corrupt_or_missing_release_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="root: .* is not a directory"):
        prepare_fashion_mnist(tmp_path / "nowhere")
    labels = np.zeros(3, np.uint8)
    for image_file, label_file in FILES:
        (tmp_path / image_file).write_bytes(gzip.compress(_idx_bytes(np.zeros((3, 28, 28), np.uint8))))
        (tmp_path / label_file).write_bytes(gzip.compress(_idx_bytes(labels)))
    with pytest.raises(InputError, match="fewer than 7000"):
        prepare_fashion_mnist(tmp_path)
    (tmp_path / FILES[1][1]).write_bytes(gzip.compress(_idx_bytes(np.zeros(2, np.uint8))))
    with pytest.raises(InputError, match="do not describe the same images"):
        prepare_fashion_mnist(tmp_path)
    (tmp_path / FILES[0][0]).write_bytes(b"\x1f\x8b truncated gzip")
    with pytest.raises(InputError, match="root: .*train-images"):
        prepare_fashion_mnist(tmp_path)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"train_classes": [5, 6], "test_classes": [6, 7]}, "overlap on \\[6\\]"),
        ({"train_classes": [], "test_classes": [0]}, "train_classes: must list"),
        ({"train_classes": [5], "test_classes": []}, "test_classes: must list"),
        ({"train_classes": [5, 10], "test_classes": [0]}, "train_classes: unknown class ids \\[10\\]"),
        ({"train_classes": [5], "test_classes": [-1]}, "test_classes: unknown"),
        ({"train_classes": [5, 5], "test_classes": [0]}, "listed twice"),
        ({"train_classes": [5], "test_classes": [0], "per_class": 6900, "val_per_class": 200}, "per_class: 6900"),
        ({"train_classes": [5], "test_classes": [0], "per_class": 7001, "val_per_class": 0}, "per_class"),
        ({"train_classes": [5], "test_classes": [0], "per_class": -1}, "per_class: must be >= 0"),
        ({"train_classes": [5], "test_classes": [0], "val_per_class": 7000}, "val_per_class"),
        # train and val come from the train file: 6,000 images per class
        ({"train_classes": [5], "test_classes": [0], "per_class": 5900, "val_per_class": 200}, "train file"),
        ({"train_classes": [5], "test_classes": [0], "new_images_per_class": 1001}, "new_images_per_class: must be in 0..1000"),
        ({"train_classes": [5], "test_classes": [0], "new_images_per_class": -1}, "new_images_per_class"),
    ],
)
def test_parameter_validation(kwargs, message):
    params = {"per_class": 1200, "val_per_class": 200, **kwargs}
    with pytest.raises(InputError, match=message):
        validate_params(**params)


def test_per_class_sample_is_disjoint_and_seeded():
    labels = np.repeat(np.arange(3), 50)
    first, second, rest = per_class_sample(labels, [0, 2], [5, 10, None], seed=3)
    assert len(first) == 10 and len(second) == 20 and len(rest) == 2 * 35
    union = np.concatenate([first, second, rest])
    assert len(np.unique(union)) == len(union) == 100
    assert set(labels[union].tolist()) == {0, 2}
    assert np.array_equal(first, np.sort(first))
    again = per_class_sample(labels, [0, 2], [5, 10, None], seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(again, (first, second, rest)))
    other = per_class_sample(labels, [0, 2], [5, 10, None], seed=4)
    assert not np.array_equal(other[0], first)
    # A class's sample does not depend on which other classes are drawn.
    alone = per_class_sample(labels, [2], [5, 10, None], seed=3)
    assert np.array_equal(alone[0], first[labels[first] == 2])


def test_default_splits_counts_and_disjointness(tmp_path, fashion):
    images, labels, origins = fashion
    stores = _write(prepare_fashion_mnist(ROOT, per_class=40, val_per_class=10, seed=0), tmp_path)
    train, val, test = stores["train"], stores["val"], stores["new_classes"]
    new_images = stores["new_images"]
    assert (len(train), len(val), len(new_images), len(test)) == (200, 50, 3000, 200)
    assert np.bincount(train.labels, minlength=10)[5:].tolist() == [40] * 5
    assert np.bincount(val.labels, minlength=10)[5:].tolist() == [10] * 5
    assert np.bincount(new_images.labels, minlength=10)[5:].tolist() == [600] * 5
    assert np.bincount(test.labels, minlength=10)[:5].tolist() == [40] * 5
    assert set(train.labels.tolist()) == {5, 6, 7, 8, 9} and set(test.labels.tolist()) == {0, 1, 2, 3, 4}
    # By origin: train and val come from the train file, new images from the t10k file only.
    assert all(origin.startswith("train-images") for origin in train.origins + val.origins)
    assert all(origin.startswith("t10k-images") for origin in new_images.origins)
    assert not set(train.origins) & set(val.origins)
    assert not set(new_images.origins) & (set(train.origins) | set(val.origins))
    assert train.class_names == {c: CLASS_NAMES[c] for c in range(5, 10)}
    # Every stored item is the exact image of the file position its origin names.
    index = {origin: position for position, origin in enumerate(origins)}
    for store in (train, val, new_images, test):
        for item in (0, len(store) // 2, len(store) - 1):
            position = index[store.origins[item]]
            np.testing.assert_array_equal(store[item][:, :, 0], images[position])
            assert store.labels[item] == labels[position]
        assert store.manifest.column("channels").to_pylist() == [1] * len(store)
        assert store.manifest.column("source").to_pylist() == ["fashion-mnist"] * len(store)


def test_all_images_when_per_class_is_zero(fashion):
    dataset = prepare_fashion_mnist(ROOT, train_classes=[5], test_classes=[0], per_class=0, val_per_class=200)
    assert dataset.splits["train"].expected == 5800  # the train file's 6,000 minus val
    assert dataset.splits["val"].expected == 200
    assert dataset.splits["new_images"].expected == 600
    assert dataset.splits["new_classes"].expected == 7000


def test_splits_are_deterministic_and_seeded(tmp_path):
    for run, seed in (("a", 0), ("b", 0), ("c", 1)):
        _write(prepare_fashion_mnist(ROOT, per_class=20, val_per_class=5, seed=seed), tmp_path / run)
    for split in ("train", "val", "new_images", "new_classes"):
        for name in ("pixels.npy", "manifest.parquet"):
            assert (tmp_path / "a" / split / name).read_bytes() == (tmp_path / "b" / split / name).read_bytes()
        assert ImageStore.open(tmp_path / "a" / split).origins != ImageStore.open(tmp_path / "c" / split).origins


def test_cli_end_to_end(tmp_path):
    out = tmp_path / "prepared"
    args = ["--per_class", "30", "--val_per_class", "5", "--train_classes", "8", "--train_classes", "9",
            "--test_classes", "0", "--out-dir", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = artifacts.load_json(out / "report.json")
    assert report["splits"]["train"] == {"count": 60, "unlabeled": 0, "classes": {"Bag": 30, "Ankle boot": 30}}
    assert report["splits"]["val"]["count"] == 10 and report["splits"]["new_classes"]["count"] == 30
    assert report["rejected"] == []
    first = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert CliRunner().invoke(main, args).exit_code == 0
    assert first == {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    # "none" (how a null renders) means all images of a class.
    result = CliRunner().invoke(main, ["--per_class", "none", "--val_per_class", "0", "--train_classes", "9",
                                       "--test_classes", "0", "--out-dir", str(out)])
    assert result.exit_code == 0, result.output
    assert artifacts.load_json(out / "report.json")["splits"]["train"]["count"] == 6000  # all of the train file


def test_cli_bad_option_is_one_line_and_status_2(tmp_path):
    result = CliRunner().invoke(main, ["--train_classes", "3", "--test_classes", "3", "--out-dir", str(tmp_path / "p")])
    assert result.exit_code == 2
    assert "prepare: error: train_classes and test_classes overlap on [3]" in result.output
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("given,missing", [(["--test_classes", "0"], "train_classes"), (["--train_classes", "5"], "test_classes")])
def test_a_class_list_left_empty_is_an_error_not_a_default(tmp_path, given, missing):
    """`train_classes: []` in params.yaml reaches the stage as no option at all (DVC
    renders an empty list as nothing): it must be an error, never a silent default."""
    from click.testing import CliRunner

    from stages.prepare import main

    result = CliRunner().invoke(main, [*given, "--out-dir", str(tmp_path / "p")])
    assert result.exit_code == 2
    assert f"{missing}: must list" in result.output
    assert not (tmp_path / "p").exists()
