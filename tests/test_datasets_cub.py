import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from mom import artifacts
from mom.datasets import cub
from mom.datasets.cub import load_cub, prepare_cub
from mom.errors import InputError
from mom.imagestore import ImageStore
from stages.prepare import main

# (image id, class id, relative path): classes 1-100 train, 101-200 test.
ROWS = [
    (1, 1, "001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg"),
    (2, 1, "001.Black_footed_Albatross/Black_Footed_Albatross_0009_34.jpg"),
    (3, 100, "100.Brown_Pelican/Brown_Pelican_0122_94.jpg"),
    (4, 101, "101.White_Pelican/White_Pelican_0025_97604.jpg"),
    (5, 200, "200.Common_Yellowthroat/Common_Yellowthroat_0055_190967.jpg"),
]
NAMES = {1: "001.Black_footed_Albatross", 100: "100.Brown_Pelican", 101: "101.White_Pelican",
         200: "200.Common_Yellowthroat"}


def _make_cub(top, rows=ROWS, corrupt=()):
    root = top / "CUB_200_2011"
    (root / "images").mkdir(parents=True)
    (root / "images.txt").write_text("".join(f"{i} {p}\n" for i, _, p in rows))
    (root / "image_class_labels.txt").write_text("".join(f"{i} {c}\n" for i, c, _ in rows))
    (root / "classes.txt").write_text("".join(f"{c} {NAMES.get(c, f'{c:03d}.Bird')}\n" for c in range(1, 201)))
    (root / "train_test_split.txt").write_text("".join(f"{i} {i % 2}\n" for i, _, _ in rows))
    for i, _, relative in rows:
        path = root / "images" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if relative in corrupt:
            path.write_bytes(b"\xff\xd8 truncated")
        else:
            Image.fromarray(np.full((8 + i, 10, 3), i * 20, np.uint8)).save(path, quality=95)
    return root


def test_zero_shot_split_labels_and_names(tmp_path):
    _make_cub(tmp_path)
    for root in (tmp_path, tmp_path / "CUB_200_2011"):  # either the top folder or the dataset folder
        splits = load_cub(root)
        assert [item.origin for item in splits["train"]] == [f"images/{p}" for _, _, p in ROWS[:3]]
        assert [item.label for item in splits["train"]] == [0, 0, 99]
        assert [item.label for item in splits["new_classes"]] == [100, 199]
        assert [item.class_name for item in splits["new_classes"]] == ["101.White_Pelican", "200.Common_Yellowthroat"]


def test_cli_writes_train_and_new_classes_and_reports_corrupt_files(tmp_path):
    _make_cub(tmp_path, corrupt={ROWS[1][2]})
    out = tmp_path / "prepared"
    result = CliRunner().invoke(main, ["--source", "cub", "--root", str(tmp_path), "--workers", "1",
                                       "--out-dir", str(out)])
    assert result.exit_code == 0, result.output
    train, test = ImageStore.open(out / "train"), ImageStore.open(out / "new_classes")
    assert len(train) == 2 and len(test) == 2 and len(ImageStore.open(out / "val")) == 0
    assert train.labels.tolist() == [0, 99] and test.labels.tolist() == [100, 199]
    assert train[1].shape == (11, 10, 3) and int(train[1][0, 0, 0]) in range(55, 66)
    report = artifacts.load_json(out / "report.json")
    assert report["rejected"][0]["path"] == f"images/{ROWS[1][2]}"
    assert report["full_set"] is False and report["split_rule"] == "classes 1-100 train, 101-200 new_classes"


def test_full_set_counts_are_asserted(tmp_path):
    # 11,788 listed images: 5,864 in classes 1-100 is the published split.
    rows = [(i + 1, 1 if i < 5864 else 101, f"x/{i}.jpg") for i in range(11788)]
    root = tmp_path / "ok"
    root.mkdir()
    (root / "images.txt").write_text("".join(f"{i} {p}\n" for i, _, p in rows))
    (root / "image_class_labels.txt").write_text("".join(f"{i} {c}\n" for i, c, _ in rows))
    (root / "classes.txt").write_text("".join(f"{c} {c:03d}.Bird\n" for c in range(1, 201)))
    # Counts right: it goes on and stops at the missing images (not at the counts).
    with pytest.raises(InputError, match="5864 of 5864 train images are missing"):
        prepare_cub(root)
    bad = [(i, 1 if i <= 5900 else 101, p) for i, _, p in rows]
    (root / "image_class_labels.txt").write_text("".join(f"{i} {c}\n" for i, c, _ in bad))
    with pytest.raises(InputError, match=r"CUB-200-2011 lists 11788 images but splits them \{'train': 5900"):
        prepare_cub(root)


def test_layout_errors(tmp_path):
    with pytest.raises(InputError, match="no images.txt"):
        load_cub(tmp_path)
    root = _make_cub(tmp_path)
    (root / "image_class_labels.txt").write_text("1 1\n2 1\n3 100\n4 101\n")
    with pytest.raises(InputError, match="different image ids"):
        load_cub(root)
    (root / "image_class_labels.txt").write_text("1 1\n2 1\n3 100\n4 101\n5 201\n")
    with pytest.raises(InputError, match=r"classes \[201\] missing"):
        load_cub(root)
    (root / "image_class_labels.txt").write_text("1 1\n2 x\n")
    with pytest.raises(InputError, match="not an integer"):
        load_cub(root)


def test_download_offline_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(cub, "URL", "http://127.0.0.1:9/CUB_200_2011.tgz")
    with pytest.raises(InputError, match="download: no published SHA-256 for http://127.0.0.1:9/CUB_200_2011.tgz"):
        prepare_cub(tmp_path / "cub", download=True)  # an address without a pinned hash is not even tried
    (tmp_path / "cub").mkdir()
    (tmp_path / "cub" / "SHA256SUMS").write_text(f"{'0' * 64}  CUB_200_2011.tgz\n")
    with pytest.raises(InputError, match="download: cannot fetch .*offline"):
        prepare_cub(tmp_path / "cub", download=True)
