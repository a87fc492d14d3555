"""Search: top-k against brute-force inner products, the index stage and the search
command on a tiny collection (a random-trunk fine-tuned net, the real extract
stage), the contact sheet, and one-line errors for bad queries."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from mom import artifacts, networks, search, whitening
from mom.errors import InputError
from mom.imagestore import ImageStore, write_image_store
from stages import extract, index, search as search_command
from tests import tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]


def unit_rows(rng, n, d):
    rows = rng.standard_normal((n, d)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def sign_rows(rng, n, d=16):
    """Rows of +-1/4 in 16 dims: unit norm and every inner product exact in float32
    (a multiple of 1/16), so ties are exact and frequent."""
    return (rng.choice([-0.25, 0.25], size=(n, d))).astype(np.float32)


def brute_force(X, q, k, exclude=-1):
    """The first k rows of lexsort((row, -X @ q)), without ``exclude``."""
    sims = X.astype(np.float64) @ q.astype(np.float64)
    order = [row for row in np.lexsort((np.arange(len(X)), -sims)) if row != exclude]
    return np.array(order[:k]), sims[order[:k]]


@pytest.mark.parametrize("make_rows", [unit_rows, sign_rows])
def test_top_k_is_the_brute_force_order_with_ties_by_row(make_rows):
    rng = np.random.default_rng(0)
    X = make_rows(rng, 60, 16)
    X[[7, 23, 41]] = X[50]  # duplicates: exact ties however the rows are drawn
    queries = np.concatenate([X[[50, 3]], make_rows(rng, 6, 16)])
    built = search.build_index(X)
    for k in (1, 2, 5, 17, 60):
        rows, sims = search.search(built, queries, k)
        for q, got_rows, got_sims in zip(queries, rows, sims):
            expected_rows, expected_sims = brute_force(X, q, k)
            np.testing.assert_array_equal(got_rows, expected_rows)
            np.testing.assert_allclose(got_sims, expected_sims, atol=1e-5)
    rows, _ = search.search(built, X[50], 4)
    assert rows[0].tolist() == [7, 23, 41, 50], "a tie is ordered by row"


def test_ties_beyond_the_first_fetch_are_all_considered():
    # 40 rows tied at the k-th place: which 3 faiss returns first is its business,
    # the answer must be the 3 smallest rows among the tied ones
    rng = np.random.default_rng(1)
    X = sign_rows(rng, 50)
    X[10:50] = X[0]
    X[0] = -X[0]
    rows, sims = search.search(search.build_index(X), X[10], 3)
    assert rows[0].tolist() == [10, 11, 12] and np.allclose(sims, 1)


def test_a_query_can_leave_out_its_own_row():
    rng = np.random.default_rng(2)
    X = sign_rows(rng, 30)
    X[4] = X[9]
    rows, sims = search.search(search.build_index(X), X[[9, 2]], 5, exclude=[9, 2])
    for got, query in zip(rows, (9, 2)):
        np.testing.assert_array_equal(got, brute_force(X, X[query], 5, exclude=query)[0])
    assert rows[0][0] == 4 and np.isclose(sims[0][0], 1.0), "the duplicate of the query stays in"


@pytest.mark.parametrize("k,exclude,message", [
    (11, None, "k=11: must be in 1..10 (the index holds 10 items)"),
    (0, None, "k=0: must be in 1..10"),
    (10, [3], "k=10: must be in 1..9 (the index holds 10 items, one of them the query)"),
])
def test_k_larger_than_the_collection_is_refused_in_one_line(k, exclude, message):
    X = sign_rows(np.random.default_rng(3), 10)
    with pytest.raises(InputError) as error:
        search.search(search.build_index(X), X[3], k, exclude=exclude)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_embeddings_must_be_finite_unit_rows():
    X = sign_rows(np.random.default_rng(4), 5)
    with pytest.raises(InputError, match="row 2 has norm 2.0000"):
        search.build_index(np.where(np.arange(5)[:, None] == 2, 2 * X, X))
    X[1, 0] = np.nan
    with pytest.raises(InputError, match="NaN or inf in row 1"):
        search.build_index(X)


def test_index_files_are_deterministic_and_a_corrupt_one_is_refused(tmp_path):
    X = unit_rows(np.random.default_rng(5), 20, 8)
    for name in ("a.faiss", "b.faiss"):
        search.save_index(tmp_path / name, search.build_index(X))
    assert (tmp_path / "a.faiss").read_bytes() == (tmp_path / "b.faiss").read_bytes()
    loaded = search.load_index(tmp_path / "a.faiss")
    np.testing.assert_array_equal(loaded.reconstruct_n(0, 20), X)
    (tmp_path / "bad.faiss").write_bytes(b"not an index")
    with pytest.raises(InputError, match="bad.faiss: not a readable faiss index"):
        search.load_index(tmp_path / "bad.faiss")


def test_contact_sheet_shows_query_then_ranked_tiles_one_row_per_embedding():
    gray = [np.full((6, 5, 1), 40 * i, np.uint8) for i in range(4)]
    color = np.zeros((5, 7, 3), np.uint8)
    rows = [("fine-tuned", [search.Tile(gray[1], "a"), search.Tile(gray[2], "b"), search.Tile(color, "c")]),
            ("initial features", [search.Tile(gray[3], "d")])]
    figure = search.contact_sheet(search.Tile(gray[0], "query"), rows)
    axes = np.array(figure.axes).reshape(2, 4)
    assert [axis.get_title() for axis in axes[0]] == ["query", "a", "b", "c"]
    assert [axis.get_title() for axis in axes[1][:2]] == ["query", "d"] and not axes[1][2].axison
    np.testing.assert_array_equal(axes[0][2].images[0].get_array(), gray[2][:, :, 0])
    np.testing.assert_array_equal(axes[0][3].images[0].get_array(), color)
    assert axes[1][0].get_ylabel() == "initial features"


# --- the index stage and the search command on a tiny collection -------------

SCALE = 32


def synthetic_images(n, seed):
    """Three kinds of 28 x 28 gray images: horizontal bars, vertical bars, a blob."""
    rng = np.random.default_rng(seed)
    images = []
    for number in range(n):
        image = rng.integers(0, 60, size=(28, 28), dtype=np.uint8)
        offset = int(rng.integers(0, 4))
        if number % 3 == 0:
            image[offset::4, :] = 230
        elif number % 3 == 1:
            image[:, offset::4] = 230
        else:
            image[8 + offset:18 + offset, 8:20] = 200
        images.append(image)
    return images


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """data/{prepared,features,finetune,whiten} of a tiny project, the features written by extract itself."""
    data = tmp_path_factory.mktemp("search") / "data"
    for split, n, seed in (("train", 24, 0), ("new_classes", 12, 1)):
        write_image_store(data / "prepared" / split, synthetic_images(n, seed), {
            "source": ["synthetic"] * n, "split": [split] * n, "origin": [f"{split}/{i:03d}.png" for i in range(n)]})
    result = CliRunner().invoke(extract.main, ["--prepared", str(data / "prepared"), "--out-dir", str(data / "features"),
                                               "--scales", str(SCALE), "--batch_size", "16", "--threads", "1"])
    assert result.exit_code == 0, result.output
    net = networks.build_network(networks.make_meta("efficientnet_lite0", "gem", 3.0, head_dim=8),
                                 load_pretrained=False, seed=0)
    networks.save_checkpoint(data / "finetune" / "model.pt", net,
                             extra={"embedding": {"scales": [SCALE], "aggregation": "sum"}})
    rng = np.random.default_rng(0)  # a whitening that changes every vector: both sides must apply it
    whitening.save_whitening(data / "whiten" / "whitening.npz", rng.normal(0, 0.01, 8).astype(np.float32),
                             (np.eye(8) + rng.normal(0, 0.3, (8, 8))).astype(np.float32), "pca")
    result = CliRunner().invoke(index.main, index_args(data, data / "index"))
    assert result.exit_code == 0, result.output
    return data


def index_args(data, out_dir):
    return ["--prepared", str(data / "prepared"), "--features", str(data / "features"), "--threads", "1",
            "--model", str(data / "finetune" / "model.pt"), "--whitening", str(data / "whiten" / "whitening.npz"),
            "--out-dir", str(out_dir)]


def search_args(data, *args):
    return [*map(str, args), "--index-dir", str(data / "index"), "--prepared", str(data / "prepared"),
            "--model", str(data / "finetune" / "model.pt"), "--whitening", str(data / "whiten" / "whitening.npz")]


def run_search(data, *args):
    return CliRunner().invoke(search_command.main, search_args(data, *args))


def test_index_holds_both_embeddings_of_every_present_split(collection):
    summary = artifacts.load_json(collection / "index" / "index.json")
    assert summary["splits"] == {"train": 24, "new_classes": 12} and summary["items"] == 36
    assert summary["skipped"] == ["new_images", "database"]
    assert summary["initial"]["scales"] == [SCALE] and summary["finetuned"]["scales"] == [SCALE]
    items = search.load_items(collection / "index" / "items.parquet")
    assert items.column("split").to_pylist() == ["train"] * 24 + ["new_classes"] * 12
    assert items.column("item").to_pylist() == [*range(24), *range(12)]
    initial = search.load_index(collection / "index" / "initial.faiss").reconstruct_n(0, 36)
    stored = np.concatenate([np.load(collection / "features" / f"{split}.npy") for split in ("train", "new_classes")])
    np.testing.assert_array_equal(initial, stored)
    net, _ = networks.load_checkpoint(collection / "finetune" / "model.pt")
    mean, projection, _ = whitening.load_whitening(collection / "whiten" / "whitening.npz")
    from mom.extraction import embed_store

    expected = whitening.apply_whitening(embed_store(net, ImageStore.open(collection / "prepared" / "new_classes"),
                                                     scales=[SCALE], progress=False), mean, projection)
    finetuned = search.load_index(collection / "index" / "finetuned.faiss").reconstruct_n(24, 12)
    np.testing.assert_allclose(finetuned, expected, atol=1e-5)


def test_item_query_json_is_the_brute_force_top_k(collection):
    result = run_search(collection, "--item", "new_classes:4", "--k", "6", "--json")
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)["queries"][0]
    assert answer["query"] == {"split": "new_classes", "item": 4, "origin": "new_classes/004.png"}
    for name, file in (("finetuned", "finetuned.faiss"), ("initial", "initial.faiss")):
        X = search.load_index(collection / "index" / file).reconstruct_n(0, 36)
        rows, sims = brute_force(X, X[24 + 4], 6, exclude=24 + 4)
        got = answer[name]
        assert [a["rank"] for a in got] == [1, 2, 3, 4, 5, 6]
        assert [(a["split"], a["item"]) for a in got] == [("train", r) if r < 24 else ("new_classes", r - 24) for r in rows]
        assert [a["origin"] for a in got] == [f"{a['split']}/{a['item']:03d}.png" for a in got]
        np.testing.assert_allclose([a["similarity"] for a in got], sims, atol=1e-5)


def test_a_query_file_of_an_indexed_image_finds_it_first_and_the_sheet_is_written(collection, tmp_path):
    image = ImageStore.open(collection / "prepared" / "train")[5]
    Image.fromarray(image[:, :, 0]).save(tmp_path / "query.png")
    sheet = tmp_path / "sheet.png"
    result = run_search(collection, "--query", tmp_path / "query.png", "--k", "3", "--json", "--sheet", sheet)
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)["queries"][0]
    assert answer["query"] == {"file": str(tmp_path / "query.png")}
    for name in ("finetuned", "initial"):
        first = answer[name][0]
        assert (first["split"], first["item"]) == ("train", 5) and first["similarity"] > 0.9999, name
    with Image.open(sheet) as png:
        assert png.format == "PNG"
        width, height = png.size
    # 2 rows of 1 + k tiles of TILE_INCHES at 110 dpi, margins trimmed
    expected = (110 * search.TILE_INCHES * 4, 110 * (search.TILE_INCHES + 0.45) * 2)
    assert 0.75 * expected[0] < width <= expected[0] and 0.75 * expected[1] < height <= expected[1]


def test_readable_table_and_several_files_in_one_call(collection, tmp_path):
    store = ImageStore.open(collection / "prepared" / "new_classes")
    for item in (0, 7):
        Image.fromarray(store[item][:, :, 0]).save(tmp_path / f"{item}.png")
    result = run_search(collection, "--query", tmp_path / "0.png", "--query", tmp_path / "7.png", "--k", "2")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == f"query {tmp_path / '0.png'}" and lines[1] == "  fine-tuned:"
    assert lines[2].split()[0] == "1" and lines[2].split()[2:] == ["new_classes:0", "new_classes/000.png"]
    assert lines[4] == "  initial features:" and f"query {tmp_path / '7.png'}" in lines


def test_pca_whitened_initial_features_give_a_file_query_only_the_finetuned_side(collection, tmp_path):
    index_dir = tmp_path / "index"
    for file in ("finetuned.faiss", "initial.faiss", "items.parquet"):
        (index_dir / file).parent.mkdir(exist_ok=True)
        (index_dir / file).write_bytes((collection / "index" / file).read_bytes())
    summary = artifacts.load_json(collection / "index" / "index.json")
    summary["initial"]["pca_whiten"] = True
    artifacts.save_json(index_dir / "index.json", summary)
    Image.fromarray(ImageStore.open(collection / "prepared" / "train")[1][:, :, 0]).save(tmp_path / "q.png")
    result = CliRunner().invoke(search_command.main, [*search_args(collection, "--query", tmp_path / "q.png", "--json"),
                                                      "--index-dir", str(index_dir)])
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)["queries"][0]
    assert answer["initial"] is None and "does not save its PCA whitening" in answer["initial_unavailable"]
    assert answer["finetuned"][0]["item"] == 1


def bad_files(folder: Path) -> dict[str, str]:
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.png").write_text("hello")
    png = folder / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(png)
    (folder / "cut.png").write_bytes(png.read_bytes()[:2000])
    return {"missing.png": "file not found", "empty.png": "empty file (0 bytes)",
            "notes.png": "not an image", "cut.png": "corrupt or unreadable", ".": "a folder, not an image file"}


@pytest.mark.parametrize("args,message", [
    (("--item", "val:1"), "--item val:1: split 'val' is not indexed (indexed: train, new_classes)"),
    (("--item", "new_classes:12"), "--item new_classes:12: id out of range (new_classes has items 0..11)"),
    (("--item", "test"), "--item 'test': expected <split>:<id>"),
    (("--item", "train:3", "--k", "36"), "k=36: must be in 1..35"),
    ((), "give a query: --query <image file> or --item <split>:<id> (or --stdin)"),
    (("--stdin", "--item", "train:1"), "--stdin: reads its queries from standard input"),
    (("--item", "train:1", "--item", "train:2", "--sheet", "x.png"), "--sheet: draws one query"),
])
def test_bad_item_queries_fail_in_one_line(collection, args, message):
    result = run_search(collection, *args)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"search: error: {message}"), lines
    assert result.stdout == ""


def test_bad_query_files_fail_in_one_line(collection, tmp_path):
    for name, reason in bad_files(tmp_path).items():
        result = run_search(collection, "--query", tmp_path / name, "--sheet", tmp_path / "sheet.png")
        assert result.exit_code == 2, name
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"search: error: --query {tmp_path / name}: {reason}"), lines
    assert not (tmp_path / "sheet.png").exists()


def test_a_missing_index_or_a_changed_model_fails_in_one_line(collection, tmp_path):
    result = CliRunner().invoke(search_command.main, [*search_args(collection, "--item", "train:1"),
                                                      "--index-dir", str(tmp_path)])
    assert result.exit_code == 2 and result.stderr.startswith(f"search: error: {tmp_path / 'index.json'}: not found")
    (tmp_path / "index.json").write_text('{"items": 3,')
    result = CliRunner().invoke(search_command.main, [*search_args(collection, "--item", "train:1"),
                                                      "--index-dir", str(tmp_path)])
    assert result.exit_code == 2 and result.stderr.startswith(f"search: error: {tmp_path / 'index.json'}: not valid JSON")
    other = tmp_path / "model.pt"
    networks.save_checkpoint(other, networks.build_network(networks.make_meta("efficientnet_lite0", head_dim=8),
                                                           load_pretrained=False, seed=1))
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "q.png")
    result = CliRunner().invoke(search_command.main, [*search_args(collection, "--query", tmp_path / "q.png"),
                                                      "--model", str(other)])
    assert result.exit_code == 2
    assert result.stderr.strip() == f"search: error: {other}: changed since the index was built (rerun the index stage)"


def test_the_command_line_process_answers_an_item_and_errors_with_exit_2(collection):
    env = tiny_pipeline.environment(ROOT)
    ok = subprocess.run([sys.executable, "-m", "stages.search", *search_args(collection, "--item", "train:0", "--k", "2")],
                        cwd=ROOT, env=env, capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.startswith("query train:0  train/000.png"), ok.stderr
    bad = subprocess.run([sys.executable, "-m", "stages.search", *search_args(collection, "--item", "train:99")],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip() == "search: error: --item train:99: id out of range (train has items 0..23)"


def test_stdin_answers_each_line_as_the_one_shot_command_does_and_goes_on_after_a_bad_one(collection, tmp_path):
    Image.fromarray(ImageStore.open(collection / "prepared" / "new_classes")[3][:, :, 0]).save(tmp_path / "q.png")
    lines = ["train:7", str(tmp_path / "missing.png"), "", str(tmp_path / "q.png"), "new_classes:99", "new_classes:2"]
    result = CliRunner().invoke(search_command.main, search_args(collection, "--stdin", "--json", "--k", "4"),
                                input="\n".join(lines) + "\n")
    assert result.exit_code == 0, result.output
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(answers) == 5
    assert answers[1] == {"query": str(tmp_path / "missing.png"),
                          "error": f"--query {tmp_path / 'missing.png'}: file not found"}
    assert answers[3]["query"] == "new_classes:99" and "id out of range" in answers[3]["error"]
    for answer, args in ((answers[0], ("--item", "train:7")), (answers[2], ("--query", tmp_path / "q.png")),
                         (answers[4], ("--item", "new_classes:2"))):
        one_shot = run_search(collection, *args, "--json", "--k", "4")
        assert one_shot.exit_code == 0, one_shot.output
        assert answer == json.loads(one_shot.stdout)["queries"][0]
    assert answers[2]["finetuned"][0]["item"] == 3


def test_stdin_text_answers_and_one_line_errors(collection):
    result = CliRunner().invoke(search_command.main, search_args(collection, "--stdin", "--k", "2"),
                                input="train:0\nval:1\n")
    assert result.exit_code == 0
    assert result.stdout.startswith("query train:0  train/000.png\n  fine-tuned:")
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert errors == ["search: error: line 2: no such file: val:1 (nor an indexed item: give <split>:<id> of "
                      "train, new_classes)"]


def test_an_item_query_starts_no_torch(collection):
    """Item queries answer from the stored vectors: no network, so not even torch is imported."""
    code = ("import sys\nfrom stages import search\nsearch.main(sys.argv[1:], standalone_mode=False)\n"
            "assert 'torch' not in sys.modules, 'torch was imported for an item query'\n")
    run = subprocess.run([sys.executable, "-c", code, *search_args(collection, "--item", "train:0", "--k", "2")],
                         cwd=ROOT, env=tiny_pipeline.environment(ROOT), capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("query train:0")


@pytest.mark.slow
def test_the_dvc_stage_writes_the_same_index(collection, tmp_path):
    """The index command as dvc.yaml renders it, run on the tiny collection, gives the same bytes."""
    project = tiny_pipeline.make_project(tmp_path / "project")
    for folder in ("prepared", "features", "finetune", "whiten"):
        (project / "data" / folder).parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cp", "-r", str(collection / folder), str(project / "data" / folder)], check=True)
    command = tiny_pipeline.stage_commands(project, ("index",))["index"]
    tiny_pipeline.run_stage(project, command)
    for file in ("finetuned.faiss", "initial.faiss", "items.parquet", "index.json"):
        assert (project / "data" / "index" / file).read_bytes() == (collection / "index" / file).read_bytes(), file
