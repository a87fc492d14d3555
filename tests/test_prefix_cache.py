"""The prefix stage's cache (mom/prefix_cache.py): finetune and evaluate given
``--prefix-cache`` write byte-identical outputs to the runs that compute the
frozen prefix themselves, and a cache that does not fit the run is refused in
one line."""
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mom import artifacts, extraction, networks, prefix_cache, training
from mom.errors import InputError
from mom.imagestore import ImageStore, write_image_store
from stages import evaluate, finetune, prefix, whiten
from test_finetune_stage import stage_args, trained, workspace, write_split  # noqa: F401 (fixtures)

SPLITS = ("train", "val", "new_images", "new_classes")


def prefix_args(prepared, out, splits=SPLITS, **extra):
    """The prefix of test_finetune_stage's networks: 32 px, the last trunk stage trains."""
    args = ["--prepared", prepared, "--out-dir", out, "--trainable_blocks", "1", "--image_size", "32",
            "--batch_size", "256"]
    for split in splits:
        args += ["--splits", split]
    for key, value in extra.items():
        args += [f"--{key}", value]
    return [str(arg) for arg in args]


@pytest.fixture(scope="module")
def cache(trained):
    out = trained[0]
    result = CliRunner().invoke(prefix.main, prefix_args(out / "prepared", out / "prefix"))
    assert result.exit_code == 0, result.output
    return out / "prefix"


def test_the_cache_holds_the_prefix_of_every_item_as_finetune_computes_it(trained, cache):
    out = trained[0]
    record = artifacts.load_json(cache / prefix_cache.RECORD_NAME)
    net = networks.build_network(networks.make_meta("efficientnet_lite0"))
    start = len(net.trunk_blocks()) - 1
    assert record["start"] == start and record["image_size"] == 32
    assert record["frozen_digest"] == prefix_cache.frozen_digest(net, start)
    front, _ = training.split_for_finetuning(net, 1)
    for split in SPLITS:
        store = ImageStore.open(out / "prepared" / split)
        expected = training.cache_prefix(front, training.SquarePixels(store, np.arange(len(store)), 32), 256)
        assert record["splits"][split]["items"] == len(store)
        assert torch.equal(torch.from_numpy(np.load(cache / f"{split}.npy")), expected), split


def test_finetune_with_the_cache_writes_the_same_model_and_log(workspace, cache, tmp_path, monkeypatch):
    runner = CliRunner()
    plain = runner.invoke(finetune.main, stage_args(workspace, tmp_path / "plain"))

    def computed(*args, **kwargs):
        raise AssertionError("the frozen prefix ran despite --prefix-cache")
    monkeypatch.setattr(training, "cache_prefix", computed)
    cached = runner.invoke(finetune.main, stage_args(workspace, tmp_path / "cached") + ["--prefix-cache", str(cache)])
    assert plain.exit_code == 0 and cached.exit_code == 0, plain.output + str(cached.exception)
    assert (tmp_path / "plain" / "model.pt").read_bytes() == (tmp_path / "cached" / "model.pt").read_bytes()
    live = [(path.relative_to(tmp_path / "plain").as_posix(), path.read_bytes())
            for path in sorted((tmp_path / "plain" / "live").rglob("*")) if path.is_file()]
    assert live == [(path.relative_to(tmp_path / "cached").as_posix(), path.read_bytes())
                    for path in sorted((tmp_path / "cached" / "live").rglob("*")) if path.is_file()]


def test_training_items_read_their_rows_of_the_cache(workspace, cache):
    """Bit-identical for the whole split in order (every item an anchor, the default);
    a subset's rows come from other batches, and oneDNN's rounding depends on the batch."""
    net = networks.build_network(networks.make_meta("efficientnet_lite0"))
    front, _ = training.split_for_finetuning(net, 1)
    store = ImageStore.open(workspace / "train")
    for items, exact in ((np.arange(len(store)), True), (np.array([30, 2, 17, 5]), False)):
        inputs, _ = finetune._inputs(front, len(net.trunk_blocks()) - 1, store, items, None, 32, 256, "cpu",
                                     (cache, net))
        expected = training.cache_prefix(front, training.SquarePixels(store, items, 32), 256)
        assert torch.equal(inputs, expected) if exact else torch.allclose(inputs, expected, atol=1e-4, rtol=1e-4)


def refused(*args, **kwargs):
    raise AssertionError("embedded pixels despite --prefix-cache")


def test_evaluate_with_the_cache_writes_the_same_report(trained, cache, tmp_path, monkeypatch):
    out = trained[0]
    assert CliRunner().invoke(whiten.main, ["--model", str(out / "finetune" / "model.pt"), "--method", "none",
                                            "--out-dir", str(tmp_path / "whiten")]).exit_code == 0
    reports = {}
    for name, extra in (("plain", []), ("cached", ["--prefix-cache", str(cache)])):
        args = ["--model", out / "finetune" / "model.pt", "--start", out / "finetune" / "start.pt",
                "--whitening", tmp_path / "whiten" / "whitening.npz", "--prepared", out / "prepared",
                "--features", out / "features", "--finetune-log", "", "--proxy-report", "",
                "--report", tmp_path / f"{name}.json", "--metrics", "", "--plots-dir", tmp_path / f"plots-{name}",
                "--kmeans_n_init", "2", *extra]
        result = CliRunner().invoke(evaluate.main, [str(arg) for arg in args])
        assert result.exit_code == 0, result.output
        reports[name] = (tmp_path / f"{name}.json").read_bytes()
        monkeypatch.setattr(extraction, "embed_store", refused)  # the cached run must not embed pixels
    assert reports["plain"] == reports["cached"]


def test_cached_descriptors_are_embed_stores(trained, cache):
    """Bit-identical where the batches are (the cache ran its 30 items in one batch);
    equal up to float rounding at other batch sizes."""
    out = trained[0]
    net, _ = networks.load_checkpoint(out / "finetune" / "model.pt")
    store = ImageStore.open(out / "prepared" / "new_classes")
    expected = extraction.embed_store(net, store, scales=(32,), batch_size=128, progress=False)
    assert np.array_equal(prefix_cache.embed_split(cache, net, store, [32], 128), expected)
    for batch_size in (1, 7):
        assert np.allclose(prefix_cache.embed_split(cache, net, store, [32], batch_size), expected, atol=1e-5)


def refusal(call) -> str:
    with pytest.raises(InputError) as error:
        call()
    message = str(error.value)
    assert "\n" not in message
    return message


def test_a_cache_that_does_not_fit_the_run_is_refused_in_one_line(trained, cache, tmp_path):
    out = trained[0]
    net, _ = networks.load_checkpoint(out / "finetune" / "model.pt")
    start = len(net.trunk_blocks()) - 1
    store = ImageStore.open(out / "prepared" / "new_images")
    assert "at 32 px" in refusal(lambda: prefix_cache.read_outputs(cache, store, net, start, 64))
    assert "stages 0.." in refusal(lambda: prefix_cache.read_outputs(cache, store, net, start - 1, 32))
    assert "scales [64]" in refusal(lambda: prefix_cache.embed_split(cache, net, store, [64], 8))
    other = networks.build_network(net.meta, load_pretrained=False, seed=3)
    assert "other frozen weights" in refusal(lambda: prefix_cache.read_outputs(cache, store, other, start, 32))
    write_split(tmp_path / "new_images", "new_images", 21, seed=99)  # same name and size, other images
    changed = ImageStore.open(tmp_path / "new_images")
    assert "other images" in refusal(lambda: prefix_cache.read_outputs(cache, changed, net, start, 32))
    write_split(tmp_path / "queries", "queries", 4, seed=0)
    assert "no split 'queries'" in refusal(
        lambda: prefix_cache.read_outputs(cache, ImageStore.open(tmp_path / "queries"), net, start, 32))
    write_image_store(tmp_path / "wide", [np.zeros((20, 40), np.uint8)] * 2, {
        "source": ["s"] * 2, "split": ["wide"] * 2, "origin": ["a", "b"], "label": [0, 1], "class_name": ["a", "b"]})
    assert "aspect ratios" in refusal(
        lambda: prefix_cache.embed_split(cache, net, ImageStore.open(tmp_path / "wide"), [32], 8))
    (tmp_path / "not-a-cache").mkdir()
    assert "not found" in refusal(lambda: prefix_cache.read_record(tmp_path / "not-a-cache"))


@pytest.mark.parametrize("extra,message", [
    ({"trainable_blocks": "all"}, "no frozen prefix"),
    ({"trainable_blocks": "9"}, "leave no frozen prefix"),
    ({"batch_size": "0"}, "batch_size"),
    ({"image_size": "8"}, "image_size"),
])
def test_bad_prefix_options_fail_in_one_line(trained, tmp_path, extra, message):
    result = CliRunner().invoke(prefix.main, prefix_args(trained[0] / "prepared", tmp_path / "p", **extra))
    assert result.exit_code != 0 and message in result.output, result.output
    assert not (tmp_path / "p" / prefix_cache.RECORD_NAME).exists()
