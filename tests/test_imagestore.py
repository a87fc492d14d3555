import numpy as np
import pyarrow as pa
import pytest

from mom import artifacts
from mom.errors import InputError
from mom.imagestore import ImageStore, write_image_store


def _images(seed=0):
    rng = np.random.default_rng(seed)
    return [
        rng.integers(0, 256, (5, 7), dtype=np.uint8),  # grayscale (h, w)
        rng.integers(0, 256, (3, 4, 3), dtype=np.uint8),  # RGB
        rng.integers(0, 256, (1, 1, 1), dtype=np.uint8),  # 1x1 grayscale (h, w, 1)
        rng.integers(0, 256, (9, 2, 3), dtype=np.uint8),
    ]


def _columns(n, labels=(3, None, -1, 0)):
    return {
        "source": ["test"] * n,
        "split": ["train"] * n,
        "origin": [f"img{i}.png" for i in range(n)],
        "label": list(labels),
        "class_name": ["three", None, None, "zero"],
    }


def test_roundtrip_items_labels_and_offsets(tmp_path):
    images = _images()
    count = write_image_store(tmp_path / "s", iter(images), _columns(len(images)))
    store = ImageStore.open(tmp_path / "s")
    assert count == len(store) == 4
    for i, image in enumerate(images):
        expected = image if image.ndim == 3 else image[:, :, None]
        assert store[i].dtype == np.uint8
        np.testing.assert_array_equal(store[i], expected)
    np.testing.assert_array_equal(store[-1], images[-1])
    assert store.labels.dtype == np.int64
    assert store.labels.tolist() == [3, -1, -1, 0]
    assert store.class_names == {0: "zero", 3: "three"}
    manifest = store.manifest.to_pydict()
    assert manifest["item"] == [0, 1, 2, 3]
    assert manifest["channels"] == [1, 3, 1, 3]
    sizes = [im.size for im in images]
    assert manifest["offset"] == [0, sizes[0], sizes[0] + sizes[1], sum(sizes[:3])]
    assert manifest["label"] == [3, None, None, 0]
    # The layout is the documented one: a flat uint8 npy, sliced by offset.
    pixels = np.load(tmp_path / "s" / "pixels.npy")
    assert pixels.dtype == np.uint8 and pixels.ndim == 1 and pixels.size == sum(sizes)
    with pytest.raises(IndexError):
        store[4]


def test_writes_are_deterministic(tmp_path):
    for run in ("a", "b"):
        write_image_store(tmp_path / run, _images(), _columns(4))
    for name in ("pixels.npy", "manifest.parquet"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_empty_store(tmp_path):
    write_image_store(tmp_path / "e", [], {"source": [], "split": [], "origin": []})
    store = ImageStore.open(tmp_path / "e")
    assert len(store) == 0 and store.labels.shape == (0,) and store.class_names == {}


def test_streams_from_a_generator_once(tmp_path):
    consumed = []

    def generate():
        for i in range(3):
            consumed.append(i)
            yield np.full((2, 2), i, np.uint8)

    write_image_store(tmp_path / "g", generate(), {"source": ["x"] * 3, "split": ["val"] * 3, "origin": ["a", "b", "c"]})
    store = ImageStore.open(tmp_path / "g")
    assert consumed == [0, 1, 2]
    assert [int(store[i][0, 0, 0]) for i in range(3)] == [0, 1, 2]
    assert store.labels.tolist() == [-1, -1, -1]


@pytest.mark.parametrize(
    "image",
    [np.zeros((2, 2), np.float32), np.zeros((2, 2, 4), np.uint8), np.zeros((0, 3), np.uint8), np.zeros(5, np.uint8)],
)
def test_rejects_bad_images(tmp_path, image):
    with pytest.raises(InputError):
        write_image_store(tmp_path / "bad", [image], {"source": ["x"], "split": ["train"], "origin": ["a"]})


def test_rejects_column_length_mismatch_and_unknown_columns(tmp_path):
    with pytest.raises(InputError, match="origin"):
        write_image_store(tmp_path / "m", _images(), {"source": ["x"] * 4, "split": ["t"] * 4, "origin": ["a"]})
    with pytest.raises(InputError, match="unknown columns"):
        write_image_store(tmp_path / "m", _images(), {**_columns(4), "colour": [1] * 4})


def test_open_detects_inconsistent_folders(tmp_path):
    with pytest.raises(InputError, match="file not found"):
        ImageStore.open(tmp_path / "missing")
    write_image_store(tmp_path / "s", _images(), _columns(4))
    # pixels.npy rewritten by an interrupted run: sizes no longer match.
    artifacts.save_npy(tmp_path / "s" / "pixels.npy", np.zeros(10, np.uint8))
    with pytest.raises(InputError, match="do not match"):
        ImageStore.open(tmp_path / "s")
    write_image_store(tmp_path / "s", _images(), _columns(4))
    manifest = artifacts.load_parquet(tmp_path / "s" / "manifest.parquet")
    artifacts.save_parquet(tmp_path / "s" / "manifest.parquet", manifest.drop_columns(["offset"]))
    with pytest.raises(InputError, match="missing columns"):
        ImageStore.open(tmp_path / "s")
    artifacts.save_parquet(
        tmp_path / "s" / "manifest.parquet",
        manifest.set_column(
            manifest.schema.get_field_index("channels"), "channels", pa.array([1, 3, 2, 3], pa.int32())
        ),
    )
    with pytest.raises(InputError, match="channels must be 1 or 3"):
        ImageStore.open(tmp_path / "s")


def test_pickles_as_its_folder_not_its_pixels(tmp_path):
    import pickle

    write_image_store(tmp_path / "s", _images(), _columns(4))
    store = ImageStore.open(tmp_path / "s")
    data = pickle.dumps(store)
    assert len(data) < 500
    again = pickle.loads(data)
    assert len(again) == 4
    np.testing.assert_array_equal(again[3], store[3])
