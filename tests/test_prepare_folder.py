import io

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from mom import artifacts
from mom.datasets.folder import decode_image, downscale, prepare_folder, RejectedImage
from mom.errors import InputError
from mom.imagestore import ImageStore, write_image_store
from stages.prepare import main


def _save(path, image, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)


def _rgb_pattern(height, width):
    y, x = np.mgrid[:height, :width]
    return np.stack([x * 7 % 256, y * 11 % 256, (x + y) * 3 % 256], axis=2).astype(np.uint8)


@pytest.fixture
def collection(tmp_path):
    """A folder with every kind of file the stage must handle."""
    root = tmp_path / "images"
    _save(root / "cats" / "rgb.png", Image.fromarray(_rgb_pattern(6, 4)))
    _save(root / "cats" / "gray.png", Image.fromarray(np.array([[0, 100], [200, 255]], np.uint8)))
    _save(root / "cats" / "sub" / "deep" / "tiny.PNG", Image.fromarray(np.array([[[9, 8, 7]]], np.uint8)))
    _save(root / "dogs" / "cmyk.tif", Image.new("CMYK", (3, 2), (0, 0, 0, 0)))
    _save(root / "dogs" / "cmyk.jpg", Image.new("CMYK", (8, 8), (0, 255, 255, 0)), quality=95)
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red
    rgba[0, 1] = (0, 0, 255, 0)  # fully transparent
    rgba[1, 0] = (0, 0, 0, 128)  # half-transparent black
    _save(root / "dogs" / "rgba.png", Image.fromarray(rgba, "RGBA"))
    sixteen = np.array([[0, 65535], [32896, 257]], np.uint16)  # 32896 = 128 * 257
    _save(root / "dogs" / "sixteen.png", Image.fromarray(sixteen))
    _save(root / "dogs" / "bits.bmp", Image.fromarray(np.array([[True, False]])).convert("1"))
    _save(root / "dogs" / "photo.JPEG", Image.fromarray(_rgb_pattern(40, 30)), quality=90)
    _save(root / "loose.webp", Image.fromarray(_rgb_pattern(5, 5)), lossless=True)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    _save(root / "rotated.png", Image.fromarray(_rgb_pattern(2, 3)), exif=exif)
    buffer = io.BytesIO()
    Image.fromarray(_rgb_pattern(64, 64)).save(buffer, format="JPEG")
    (root / "corrupt.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (root / "empty.png").write_bytes(b"")
    (root / "notes.jpg").write_text("this is text, not a JPEG\n")
    (root / "readme.txt").write_text("not an image\n")
    (root / ".thumbnails").mkdir()
    _save(root / ".thumbnails" / "hidden.png", Image.fromarray(_rgb_pattern(2, 2)))
    return root


EXPECTED_ORDER = [
    "cats/gray.png", "cats/rgb.png", "cats/sub/deep/tiny.PNG", "dogs/bits.bmp", "dogs/cmyk.jpg", "dogs/cmyk.tif",
    "dogs/photo.JPEG", "dogs/rgba.png", "dogs/sixteen.png", "loose.webp", "rotated.png",
]


def _write(dataset, folder):
    for split, stream in dataset.splits.items():
        write_image_store(folder / split, stream.images(), stream.columns)
    return {split: ImageStore.open(folder / split) for split in dataset.splits}


def test_folder_collection_modes_and_rejections(collection, tmp_path):
    dataset = prepare_folder(collection)
    stores = _write(dataset, tmp_path / "out")
    train = stores["train"]
    assert train.origins == EXPECTED_ORDER
    assert len(stores["val"]) == len(stores["new_images"]) == len(stores["new_classes"]) == 0
    assert set(train.manifest.column("channels").to_pylist()) == {3}
    assert train.labels.tolist() == [-1] * len(EXPECTED_ORDER)  # unlabeled by default
    item = {origin: train[i] for i, origin in enumerate(train.origins)}
    np.testing.assert_array_equal(item["cats/rgb.png"], _rgb_pattern(6, 4))
    np.testing.assert_array_equal(item["cats/gray.png"][:, :, 1], [[0, 100], [200, 255]])
    assert (item["cats/gray.png"] == item["cats/gray.png"][:, :, :1]).all()  # grey replicated
    np.testing.assert_array_equal(item["cats/sub/deep/tiny.PNG"], [[[9, 8, 7]]])
    np.testing.assert_array_equal(item["dogs/cmyk.tif"], np.full((2, 3, 3), 255))
    assert np.abs(item["dogs/cmyk.jpg"].astype(int) - [255, 0, 0]).max() <= 8  # C=0 M=Y=255: red
    np.testing.assert_array_equal(item["dogs/rgba.png"][0, 0], [255, 0, 0])
    np.testing.assert_array_equal(item["dogs/rgba.png"][0, 1], [255, 255, 255])  # transparent over white
    np.testing.assert_array_equal(item["dogs/rgba.png"][1, 0], [127, 127, 127])  # 255 * (255 - 128) / 255
    np.testing.assert_array_equal(item["dogs/sixteen.png"][:, :, 0], [[0, 255], [128, 1]])
    np.testing.assert_array_equal(item["dogs/bits.bmp"][:, :, 0], [[255, 0]])
    assert item["dogs/photo.JPEG"].shape == (40, 30, 3)
    np.testing.assert_array_equal(item["loose.webp"], _rgb_pattern(5, 5))
    np.testing.assert_array_equal(item["rotated.png"], np.rot90(_rgb_pattern(2, 3), k=-1))
    reasons = {entry["path"]: entry["reason"] for entry in dataset.rejected}
    assert set(reasons) == {"corrupt.jpg", "empty.png", "notes.jpg", "readme.txt"}
    assert reasons["empty.png"].startswith("empty file")
    assert reasons["notes.jpg"].startswith("not an image")
    assert reasons["corrupt.jpg"].startswith("corrupt")
    assert reasons["readme.txt"].startswith("not an image extension")


def test_labels_from_folders_and_test_root_split_new_images_from_new_classes(collection, tmp_path):
    test_root = tmp_path / "held_out"
    _save(test_root / "birds" / "b.png", Image.fromarray(_rgb_pattern(3, 3)))
    _save(test_root / "cats" / "c.png", Image.fromarray(_rgb_pattern(3, 3)))
    _save(test_root / "dogs" / "d.png", Image.fromarray(_rgb_pattern(3, 3)))
    _save(test_root / "loose.png", Image.fromarray(_rgb_pattern(3, 3)))
    (test_root / "birds" / "broken.png").write_bytes(b"")
    dataset = prepare_folder(collection, test_root=test_root, labels_from_folders=True)
    stores = _write(dataset, tmp_path / "out")
    train, new_images, new_classes = stores["train"], stores["new_images"], stores["new_classes"]
    names = {"birds": 0, "cats": 1, "dogs": 2}  # sorted union over both roots
    expected = [names.get(origin.split("/")[0], -1) if "/" in origin else -1 for origin in EXPECTED_ORDER]
    assert train.labels.tolist() == expected
    assert train.class_names == {1: "cats", 2: "dogs"}
    # cats and dogs occur in the collection: new images of its classes; birds do not: a new class.
    # A file directly in the test root has no class: it counts as a new image (unlabeled).
    assert new_images.origins == ["cats/c.png", "dogs/d.png", "loose.png"]
    assert new_images.labels.tolist() == [1, 2, -1]
    assert new_classes.origins == ["birds/b.png"] and new_classes.labels.tolist() == [0]
    assert set(new_classes.manifest.column("split").to_pylist()) == {"new_classes"}
    assert [(entry["split"], entry["path"]) for entry in dataset.rejected if entry["path"].startswith("birds")] == [
        ("new_classes", "birds/broken.png")]


def test_without_labels_every_test_image_is_a_new_image(collection, tmp_path):
    test_root = tmp_path / "held_out"
    _save(test_root / "birds" / "b.png", Image.fromarray(_rgb_pattern(3, 3)))
    _save(test_root / "cats" / "c.png", Image.fromarray(_rgb_pattern(3, 3)))
    stores = _write(prepare_folder(collection, test_root=test_root), tmp_path / "out")
    assert stores["new_images"].origins == ["birds/b.png", "cats/c.png"] and len(stores["new_classes"]) == 0


def test_roots_must_be_separate_directories(collection, tmp_path):
    with pytest.raises(InputError, match="test_root: .* must not contain each other"):
        prepare_folder(collection, test_root=collection / "cats")
    with pytest.raises(InputError, match="test_root: .* is not a directory"):
        prepare_folder(collection, test_root=tmp_path / "missing")
    with pytest.raises(InputError, match="max_side"):
        prepare_folder(collection, max_side=-1)


def test_empty_folder_is_an_error(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="root: no image files under"):
        prepare_folder(tmp_path / "empty")
    with pytest.raises(InputError, match="root: .* is not a directory"):
        prepare_folder(tmp_path / "missing")


def test_downscale_keeps_aspect(tmp_path):
    pixels = _rgb_pattern(300, 1000)
    small = downscale(pixels, 100)
    assert small.shape == (30, 100, 3)
    assert downscale(pixels, 0) is pixels and downscale(pixels, 1000) is pixels
    assert downscale(_rgb_pattern(1, 1000), 10).shape == (1, 10, 3)
    _save(tmp_path / "big.jpg", Image.fromarray(_rgb_pattern(1200, 900)), quality=90)
    assert decode_image(tmp_path / "big.jpg", 512).shape == (512, 384, 3)
    _save(tmp_path / "tall.png", Image.fromarray(_rgb_pattern(700, 70)))
    assert decode_image(tmp_path / "tall.png", 350).shape == (350, 35, 3)


def test_decompression_bomb_is_reported(tmp_path, monkeypatch):
    _save(tmp_path / "bomb.png", Image.fromarray(_rgb_pattern(100, 100)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(RejectedImage, match="decompression bomb"):
        decode_image(tmp_path / "bomb.png", 512)


def test_parallel_decoding_gives_the_same_bytes(collection, tmp_path):
    _write(prepare_folder(collection, workers=1), tmp_path / "serial")
    _write(prepare_folder(collection, workers=2), tmp_path / "parallel")
    for name in ("train/pixels.npy", "train/manifest.parquet"):
        assert (tmp_path / "serial" / name).read_bytes() == (tmp_path / "parallel" / name).read_bytes()


def test_cli_folder_end_to_end(collection, tmp_path, caplog):
    out = tmp_path / "prepared"
    args = ["--source", "folder", "--root", str(collection), "--labels_from_folders", "--max_side", "16",
            "--workers", "1", "--out-dir", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = artifacts.load_json(out / "report.json")
    assert report["splits"]["train"]["count"] == len(EXPECTED_ORDER)
    assert report["splits"]["train"]["classes"] == {"cats": 3, "dogs": 6}
    assert report["splits"]["train"]["unlabeled"] == 2
    assert report["rejected_count"] == 4
    assert [entry["path"] for entry in report["rejected"]] == ["corrupt.jpg", "empty.png", "notes.jpg", "readme.txt"]
    assert "skipped 4 files" in caplog.text
    store = ImageStore.open(out / "train")
    assert store.shapes[:, :2].max() <= 16
    first = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert CliRunner().invoke(main, args).exit_code == 0
    assert first == {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}


def test_cli_collection_of_only_broken_files_is_an_error(tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.jpg").write_bytes(b"")
    (tmp_path / "broken" / "b.png").write_text("text")
    result = CliRunner().invoke(main, ["--source", "folder", "--root", str(tmp_path / "broken"),
                                       "--out-dir", str(tmp_path / "out"), "--workers", "1"])
    assert result.exit_code == 2
    assert "prepare: error: root:" in result.output and "no readable image (2 files skipped)" in result.output


def _retrieval_folders(tmp_path):
    train, database, queries = tmp_path / "train", tmp_path / "db", tmp_path / "queries"
    _save(train / "t.png", Image.fromarray(_rgb_pattern(4, 4)))
    (database / "a").mkdir(parents=True)
    (database / "a" / "0_broken.jpg").write_bytes(b"")  # unreferenced and corrupt: skipped, shifts positions
    for name in ("a/1.png", "a/2.png", "b/3.png"):
        _save(database / name, Image.fromarray(_rgb_pattern(5, 6)))
    _save(queries / "q1.png", Image.fromarray(_rgb_pattern(3, 3)))
    _save(queries / "q0.png", Image.fromarray(_rgb_pattern(2, 2)))
    return train, database, queries


def test_folder_with_queries_and_ground_truth_csv(tmp_path):
    train, database, queries = _retrieval_folders(tmp_path)
    csv_path = tmp_path / "gt.csv"
    csv_path.write_text("query,database,relevance\nq1.png,b/3.png,positive\nq0.png,a/2.png,positive\n"
                        "q0.png,a/1.png,junk\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["--source", "folder", "--root", str(train), "--test_root", str(database),
                                       "--query_root", str(queries), "--ground_truth", str(csv_path),
                                       "--labels_from_folders", "--workers", "1", "--out-dir", str(out)])
    assert result.exit_code == 0, result.output
    db = ImageStore.open(out / "database")
    assert db.origins == ["a/1.png", "a/2.png", "b/3.png"] and db.labels.tolist() == [0, 0, 1]
    assert ImageStore.open(out / "query").origins == ["q0.png", "q1.png"]
    assert not (out / "new_images").exists() and not (out / "new_classes").exists()
    table = artifacts.load_parquet(out / "ground_truth.parquet").to_pydict()
    assert list(zip(table["query"], table["database"], table["relevance"])) == [
        (0, 0, "junk"), (0, 1, "positive"), (1, 2, "positive")]
    report = artifacts.load_json(out / "report.json")
    assert report["rejected"] == [{"split": "database", "path": "a/0_broken.jpg", "reason": "empty file (0 bytes)"}]
    assert report["protocols"] == ["positive"]


def test_folder_ground_truth_parquet_without_relevance_column(tmp_path):
    import pyarrow as pa
    train, database, _ = _retrieval_folders(tmp_path)
    artifacts.save_parquet(tmp_path / "gt.parquet", pa.table({"query": ["a/1.png"], "database": ["a/2.png"]}))
    dataset = prepare_folder(train, test_root=database, ground_truth=tmp_path / "gt.parquet")
    _write(dataset, tmp_path / "out")
    assert dataset.ground_truth().to_pydict() == {"query": [0], "database": [1], "relevance": ["positive"]}


@pytest.mark.parametrize(
    "text, message",
    [
        ("query,database\nmissing.png,a/1.png\n", "1 query images not found"),
        ("query,database\nq0.png,a/9.png\n", "1 database images not found under .*first: a/9.png"),
        ("query,database,relevance\nq0.png,a/1.png,maybe\n", "row 2: relevance 'maybe'"),
        ("query,target\nq0.png,a/1.png\n", "needs columns query, database"),
        ("query,database\n", "lists no pairs"),
    ],
)
def test_folder_ground_truth_errors(tmp_path, text, message):
    train, database, queries = _retrieval_folders(tmp_path)
    (tmp_path / "gt.csv").write_text(text)
    with pytest.raises(InputError, match=message):
        prepare_folder(train, test_root=database, query_root=queries, ground_truth=tmp_path / "gt.csv")


def test_folder_ground_truth_needs_test_root(tmp_path):
    train, _, _ = _retrieval_folders(tmp_path)
    (tmp_path / "gt.csv").write_text("query,database\nq0.png,a/1.png\n")
    with pytest.raises(InputError, match="ground_truth: needs test_root"):
        prepare_folder(train, ground_truth=tmp_path / "gt.csv")


def test_cli_rejects_negative_max_side_for_every_source(tmp_path):
    result = CliRunner().invoke(main, ["--source", "cub", "--root", str(tmp_path), "--max_side", "-5",
                                       "--out-dir", str(tmp_path / "out")])
    assert result.exit_code == 2 and "prepare: error: max_side: must be >= 0" in result.output
