import numpy as np
import pytest
import scipy.io
from click.testing import CliRunner
from PIL import Image

from mom import artifacts
from mom.datasets.cars import load_cars, prepare_cars
from mom.datasets.sop import load_sop, prepare_sop
from mom.errors import InputError
from mom.imagestore import ImageStore
from stages.prepare import main


def _image(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((6, 9, 3), value, np.uint8)).save(path)


def _make_cars(root, classes=(1, 98, 99, 196, 5), test_flags=(0, 1, 0, 1, 1)):
    """cars_annos.mat as released: a 1xN struct array and a 1x196 cell of names."""
    dtype = [("relative_im_path", object), ("bbox_x1", object), ("bbox_y1", object), ("bbox_x2", object),
             ("bbox_y2", object), ("class", object), ("test", object)]
    annotations = np.zeros((1, len(classes)), dtype=dtype)
    for i, (c, t) in enumerate(zip(classes, test_flags)):
        relative = f"car_ims/{i + 1:06d}.jpg"
        annotations[0, i] = (relative, np.array([[1]], np.uint8), np.array([[2]], np.uint8),
                             np.array([[8]], np.uint8), np.array([[5]], np.uint8),
                             np.array([[c]], np.uint8), np.array([[t]], np.uint8))
        _image(root / relative, i * 30)
    names = np.empty((1, 196), dtype=object)
    for c in range(196):
        names[0, c] = f"Make Model {c + 1} 2012"
    scipy.io.savemat(root / "cars_annos.mat", {"annotations": annotations, "class_names": names})


def test_cars_zero_shot_split_ignores_the_official_test_flag(tmp_path):
    _make_cars(tmp_path)
    splits = load_cars(tmp_path)
    assert [item.origin for item in splits["train"]] == ["car_ims/000001.jpg", "car_ims/000002.jpg", "car_ims/000005.jpg"]
    assert [item.label for item in splits["train"]] == [0, 97, 4]
    assert [item.label for item in splits["new_classes"]] == [98, 195]
    assert splits["new_classes"][1].class_name == "Make Model 196 2012"
    dataset = prepare_cars(tmp_path, max_side=0)
    assert dataset.info["full_set"] is False and dataset.splits["new_classes"].expected == 2


def test_cars_errors(tmp_path):
    with pytest.raises(InputError, match="cars_annos.mat not found"):
        load_cars(tmp_path)
    (tmp_path / "cars_annos.mat").write_bytes(b"MATLAB 5.0 MAT-file, but not really")
    with pytest.raises(InputError, match="not the Cars196 annotation file"):
        load_cars(tmp_path)
    _make_cars(tmp_path / "bad", classes=(1, 197), test_flags=(0, 0))
    with pytest.raises(InputError, match="class ids must lie in 1..196"):
        load_cars(tmp_path / "bad")
    with pytest.raises(InputError, match="download: Cars196 has no stable public address"):
        prepare_cars(tmp_path, download=True)


SOP_TRAIN = """image_id class_id super_class_id path
1 1 1 bicycle_final/111085122871_0.JPG
2 1 1 bicycle_final/111085122871_1.JPG
3 2 2 cabinet_final/111265328556_0.JPG
"""
SOP_TEST = """image_id class_id super_class_id path
1 11319 1 bicycle_final/251952414262_0.JPG
2 11320 12 toaster_final/252010281442_0.JPG
"""


def _make_sop(root, train=SOP_TRAIN, test=SOP_TEST):
    root.mkdir(parents=True, exist_ok=True)
    (root / "Ebay_train.txt").write_text(train)
    (root / "Ebay_test.txt").write_text(test)
    (root / "Ebay_info.txt").write_text("image_id class_id super_class_id path\n")
    for value, text in enumerate((train, test)):
        for line in text.splitlines()[1:]:
            _image(root / line.split()[3], value * 100 + len(line))


def test_sop_splits_labels_and_cli(tmp_path):
    _make_sop(tmp_path / "Stanford_Online_Products")
    splits = load_sop(tmp_path / "Stanford_Online_Products")
    assert [item.label for item in splits["train"]] == [0, 0, 1]
    assert [item.class_name for item in splits["new_classes"]] == ["bicycle_final/11319", "toaster_final/11320"]
    out = tmp_path / "prepared"
    result = CliRunner().invoke(main, ["--source", "sop", "--root", str(tmp_path / "Stanford_Online_Products"),
                                       "--workers", "1", "--out-dir", str(out)])
    assert result.exit_code == 0, result.output
    report = artifacts.load_json(out / "report.json")
    assert report["splits"]["train"]["count"] == 3 and report["splits"]["new_classes"]["count"] == 2
    assert ImageStore.open(out / "new_classes").origins == ["bicycle_final/251952414262_0.JPG", "toaster_final/252010281442_0.JPG"]


def test_sop_errors(tmp_path):
    with pytest.raises(InputError, match="Ebay_train.txt not found"):
        load_sop(tmp_path)
    _make_sop(tmp_path / "a", train=SOP_TRAIN.replace("image_id class_id", "id class"))
    with pytest.raises(InputError, match="first line must be the header"):
        load_sop(tmp_path / "a")
    _make_sop(tmp_path / "b", test=SOP_TEST.replace("11320", "2"))
    with pytest.raises(InputError, match="share class ids"):
        load_sop(tmp_path / "b")
    _make_sop(tmp_path / "c")
    (tmp_path / "c" / "cabinet_final" / "111265328556_0.JPG").unlink()
    with pytest.raises(InputError, match="1 of 3 train images are missing"):
        prepare_sop(tmp_path / "c")
