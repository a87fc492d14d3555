import math
import os
import re

import numpy as np
import pytest
import torch

from mom import hdml, training, tuples
from mom.tuples import build_pools


class StandIn(torch.nn.Module):
    """A small trainable suffix: linear + ReLU + linear, l2-normalized."""

    def __init__(self, d_in=8, d_out=4, seed=0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.hidden = torch.nn.Linear(d_in, 16)
        self.out = torch.nn.Linear(16, d_out)
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)

    def forward(self, x):
        return torch.nn.functional.normalize(self.out(torch.relu(self.hidden(x))), dim=1)


def synthetic_problem(seed=0, n_classes=4, per_class=20, d=8):
    """Inputs: class centre in two dims, the rest strong nuisance noise.
    Pools from the labels (P+ same class, P- other class): the stand-in for
    mined pools, so training should make classes compact."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_classes), per_class)
    centres = rng.normal(size=(n_classes, 2)) * 2
    inputs = np.concatenate([centres[labels] + rng.normal(size=(len(labels), 2)) * 0.3,
                             rng.normal(size=(len(labels), d - 2)) * 3], axis=1).astype(np.float32)
    rows = []
    for anchor in range(len(labels)):
        same = [j for j in np.flatnonzero(labels == labels[anchor]) if j != anchor][:5]
        other = np.flatnonzero(labels != labels[anchor])[::3][:15]
        rows += [(anchor, j, "positive", r + 1, 0.5 + 0.1 * r) for r, j in enumerate(same)]
        rows += [(anchor, j, "negative", r + 1, 0.0) for r, j in enumerate(other)]
    anchor, member, kind, rank, weight = map(np.array, zip(*rows))
    pools = build_pools(anchor, member, kind, rank, weight)
    return torch.from_numpy(inputs), labels, pools


def small_config(**changes):
    values = dict(epochs=4, batch_size=8, lr=0.05, lr_step=3, margin=0.5, seed=1, embed_batch_size=16)
    values.update(changes)
    return training.TrainingConfig(**values)


def run(config, checkpoint=None, validate=None, seed=0, source=None):
    torch.manual_seed(0)
    inputs, labels, pools = synthetic_problem()
    module = StandIn(seed=seed)
    items = np.arange(len(inputs))
    history = training.fit(module, inputs, items, len(items), pools if source is None else source, config,
                           checkpoint_path=checkpoint, fingerprint="f", validate=validate)
    return module, history


@pytest.mark.parametrize("loss,weighted", [("triplet", False), ("triplet", True), ("contrastive", False)])
def test_fit_lowers_the_loss(loss, weighted):
    config = small_config(epochs=6, loss=loss, weighted=weighted, margin=0.5 if loss == "triplet" else 0.7)
    _, history = run(config)
    assert [row["epoch"] for row in history] == [1, 2, 3, 4, 5, 6]
    assert history[-1]["loss"] < history[0]["loss"]
    assert all(0.0 <= row["active"] <= 1.0 for row in history)
    # step schedule: lr x0.1 after lr_step = 3 epochs
    assert history[2]["lr"] == pytest.approx(0.05) and history[3]["lr"] == pytest.approx(0.005)


def test_training_is_deterministic():
    first, history_a = run(small_config())
    second, history_b = run(small_config())
    assert history_a == history_b
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)


def test_interrupted_run_resumes_from_its_checkpoint_and_ends_the_same(tmp_path):
    uninterrupted, history_full = run(small_config())

    class Interrupt(Exception):
        pass

    def crash_in_epoch_3(module):
        if len(calls) == 2:
            raise Interrupt  # epoch 3 dies before its checkpoint
        calls.append(1)
        return {}

    calls = []
    checkpoint = tmp_path / "state.pt"
    with pytest.raises(Interrupt):
        run(small_config(), checkpoint=checkpoint, validate=crash_in_epoch_3)
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["epoch"] == 2

    resumed, history = run(small_config(), checkpoint=checkpoint, seed=99)  # other init: must be overwritten
    assert history == history_full
    for a, b in zip(uninterrupted.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_checkpoint_of_another_run_is_ignored(tmp_path):
    checkpoint = tmp_path / "state.pt"
    run(small_config(epochs=2), checkpoint=checkpoint)
    state = torch.load(checkpoint, weights_only=True)
    assert training.load_training_state(checkpoint, "other") is None
    assert training.load_training_state(checkpoint, "f")["epoch"] == state["epoch"] == 2
    checkpoint.write_bytes(b"garbage")
    assert training.load_training_state(checkpoint, "f") is None


class _RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.marker}",))


def test_foreign_training_checkpoints_are_ignored_with_one_warning_line(tmp_path, caplog):
    """Issue 19: a tensor-only file raised AttributeError; an unsafe one was a multi-line warning."""
    checkpoint = tmp_path / "state.pt"
    run(small_config(epochs=1), checkpoint=checkpoint)
    state = torch.load(checkpoint, weights_only=True)
    marker = tmp_path / "pwned"
    foreign = {
        "tensor": (torch.zeros(3), r"holds a Tensor, not a training checkpoint"),
        "unsafe": ({"fingerprint": "f", "module": _RunsShell(marker)}, r"refused by torch's weights-only loader: "
                   r"Trying to load unsupported GLOBAL posix.system"),
        "missing": ({"fingerprint": "f", "epoch": 1}, r"missing keys \['module', 'optimizer', 'scheduler', "
                    r"'torch_rng', 'history'\]"),
        "types": ({**state, "module": [1, 2]}, r"keys of the wrong type or value: \['module'\]"),
        "rng": ({**state, "torch_rng": torch.zeros(3)}, r"keys of the wrong type or value: \['torch_rng'\]"),
    }
    for name, (payload, message) in foreign.items():
        path = tmp_path / f"{name}.pt"
        torch.save(payload, path)
        caplog.clear()
        with caplog.at_level("WARNING", logger="mom"):
            assert training.load_training_state(path, "f") is None
        warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
        assert len(warnings) == 1 and "\n" not in warnings[0] and re.search(message, warnings[0]), (name, warnings)
        assert str(path) in warnings[0] and warnings[0].endswith("starting afresh")
    assert not marker.exists()


@pytest.mark.parametrize("device,expected", [("cpu", None), ("cuda", ":4096:8"), ("cuda:1", ":4096:8")])
def test_deterministic_mode_gives_cublas_its_fixed_workspace_on_cuda_only(monkeypatch, device, expected):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    was_on = torch.are_deterministic_algorithms_enabled()
    try:
        training.use_deterministic_algorithms(device)
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(was_on)
    assert os.environ.get("CUBLAS_WORKSPACE_CONFIG") == expected


def test_a_cublas_workspace_set_by_the_user_is_kept(monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    was_on = torch.are_deterministic_algorithms_enabled()
    try:
        training.use_deterministic_algorithms("cuda")
    finally:
        torch.use_deterministic_algorithms(was_on)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


def test_validate_rows_join_the_log():
    _, history = run(small_config(epochs=2), validate=lambda module: {"val_recall_at_1": 0.5})
    assert all(row["val_recall_at_1"] == 0.5 for row in history)


def test_config_is_checked():
    with pytest.raises(ValueError, match="loss"):
        small_config(loss="hinge").check()
    with pytest.raises(ValueError, match="batch_size"):
        small_config(batch_size=0).check()


def test_embed_pool_scatters_rows_by_item():
    module = StandIn()
    inputs = torch.randn(3, 8)
    out = training.embed_pool(module, inputs, n_items=6, items=np.array([1, 4, 5]), batch_size=2)
    assert out.shape == (6, 4)
    assert np.allclose(out[[0, 2, 3]], 0)
    with torch.no_grad():
        assert np.allclose(out[[1, 4, 5]], module(inputs).numpy(), atol=1e-6)


def test_frozen_prefix_plus_trainable_suffix_is_the_network():
    from mom import networks

    net = networks.build_network(networks.make_meta("efficientnet_lite0", "gem", 3.0, 16), seed=0)
    pixels = torch.rand(2, 3, 32, 32) * 255
    with torch.no_grad():
        whole = net(pixels)
    prefix, suffix = training.split_for_finetuning(net, trainable_blocks=2)
    assert suffix.start == len(net.trunk_blocks()) - 2
    with torch.no_grad():
        assert torch.allclose(suffix(prefix(pixels)), whole, atol=1e-5)
    trainable = {name for name, p in net.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith(("trunk.block6", "trunk.head", "head")) for name in trainable)
    _, everything = training.split_for_finetuning(net, trainable_blocks=None)
    assert everything.start == 0 and all(p.requires_grad for p in net.parameters())


def test_fine_tuning_runs_in_channels_last_whatever_layout_its_input_has():
    """NHWC halves a training step's time on a CPU (benchmarks/finetune_step.py); the
    suffix takes cached prefix outputs in either layout and gives the same embedding."""
    from mom import networks

    net = networks.build_network(networks.make_meta("efficientnet_lite0", "gem", 3.0, None), seed=0)
    prefix, suffix = training.split_for_finetuning(net, trainable_blocks=2)
    convolutions = [p for p in suffix.parameters() if p.requires_grad and p.dim() == 4]
    assert convolutions and all(p.is_contiguous(memory_format=torch.channels_last) for p in convolutions)
    with torch.no_grad():
        cached = prefix(torch.rand(3, 3, 32, 32) * 255)
        nchw, nhwc = suffix(cached.contiguous()), suffix(cached.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(nchw, nhwc, atol=1e-6)


def test_square_pixels_resize_and_replicate_gray():
    class Store:
        def __getitem__(self, item):
            return np.full((10, 20, 1), item, np.uint8)

    batch = training.SquarePixels(Store(), np.array([3, 7]), size=8)[np.array([1, 0])]
    assert batch.shape == (2, 3, 8, 8)
    assert torch.allclose(batch[0], torch.full((3, 8, 8), 7.0)) and torch.allclose(batch[1], torch.full((3, 8, 8), 3.0))


def test_pca_head_init_projects_onto_the_principal_components():
    from mom import networks

    net = networks.build_network(networks.make_meta("efficientnet_lite0", "gem", 3.0, 4), seed=0)
    prefix, suffix = training.split_for_finetuning(net, trainable_blocks=1)
    torch.manual_seed(0)
    with torch.no_grad():
        inputs = prefix(torch.rand(12, 3, 32, 32) * 255)
    explained = training.init_head_with_pca(suffix, inputs, batch_size=5)
    assert 0 < explained <= 1
    with torch.no_grad():
        pooled = net.pool(net.trunk[suffix.start:](inputs)).double()
        outputs = suffix(inputs).double()
    centred = pooled - pooled.mean(0)
    top = torch.linalg.svd(centred, full_matrices=False).Vh[:4]
    expected = centred @ top.T
    expected = expected / expected.norm(dim=1, keepdim=True)
    # equal up to the sign of each component
    assert torch.allclose(outputs.abs(), expected.abs(), atol=1e-4)


def test_pca_whitening_head_init_gives_unit_variance_components():
    from mom import networks

    net = networks.build_network(networks.make_meta("efficientnet_lite0", "gem", 3.0, 4), seed=0)
    prefix, suffix = training.split_for_finetuning(net, trainable_blocks=1)
    torch.manual_seed(0)
    with torch.no_grad():
        inputs = prefix(torch.rand(12, 3, 32, 32) * 255)
    training.init_head_with_pca(suffix, inputs, batch_size=5, whiten=True)
    with torch.no_grad():
        pooled = net.pool(net.trunk[suffix.start:](inputs)).double()
        projected = net.head(pooled.float()).double()  # before the l2 normalization
    centred = pooled - pooled.mean(0)
    _, singular, vh = torch.linalg.svd(centred, full_matrices=False)
    expected = centred @ vh[:4].T / (singular[:4] / len(pooled) ** 0.5)  # PCA-whitened by definition
    assert torch.allclose(projected.abs(), expected.abs(), atol=1e-3)
    assert torch.allclose(projected.T @ projected / len(pooled), torch.eye(4, dtype=torch.float64), atol=1e-3)


# ------------------------------------------------------------ HDML and the supervised reference (method.md section 10)


class TinyNet(torch.nn.Module):
    """What HDML needs of an EmbeddingNet: a feature layer and an FC ``head``."""

    def __init__(self, d_in=8, channels=16, d_out=4, seed=0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.features = torch.nn.Linear(d_in, channels)
        self.head = torch.nn.Linear(channels, d_out)
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)


class TinyMetric(torch.nn.Module):
    """A suffix with ``pooled`` and ``embed_pooled`` (as NetworkSuffix)."""

    def __init__(self, seed=0):
        super().__init__()
        self.net = TinyNet(seed=seed)

    def pooled(self, x):
        return torch.relu(self.net.features(x))

    def embed_pooled(self, pooled):
        return torch.nn.functional.normalize(self.net.head(pooled), dim=-1)

    def forward(self, x):
        return self.embed_pooled(self.pooled(x))


SYNTHESIS = training.SynthesisConfig(hdml.HDMLSettings(alpha=0.2, beta=20.0, lam=0.5, margin=0.5), hidden=8)


def run_hdml(config, source=None, synthesis=SYNTHESIS, class_labels=None, checkpoint=None, validate=None, seed=0):
    torch.manual_seed(0)
    inputs, labels, pools = synthetic_problem()
    module = TinyMetric(seed=seed)
    items = np.arange(len(inputs))
    history = training.fit(module, inputs, items, len(items), pools if source is None else source, config,
                           checkpoint_path=checkpoint, fingerprint="f", validate=validate,
                           synthesis=synthesis, class_labels=class_labels)
    return module, history


def test_hdml_fit_tracks_the_previous_epochs_status():
    _, labels, _ = synthetic_problem()
    _, history = run_hdml(small_config(), class_labels=labels)
    assert history[0]["j_avg"] == math.inf and history[0]["synthetic_weight"] == 0.0
    for previous, row in zip(history, history[1:]):
        assert row["j_avg"] == pytest.approx(previous["loss"])  # J_avg: last epoch's mean real-tuple loss
        assert row["synthetic_weight"] == pytest.approx(1 - math.exp(-SYNTHESIS.settings.beta / previous["j_gen"]))
        assert row["j_gen"] == pytest.approx(row["j_recon"] + 0.5 * row["j_soft"])
    assert history[-1]["j_recon"] < history[0]["j_recon"]  # the generator learns
    assert all(row["j_ce"] > 0 and 0 <= row["farther"] <= 1 for row in history)


def test_hdml_fit_is_deterministic_and_resumes_with_generator_and_softmax_state(tmp_path):
    _, labels, _ = synthetic_problem()
    uninterrupted, history_full = run_hdml(small_config(), class_labels=labels)
    again, history_again = run_hdml(small_config(), class_labels=labels)
    assert history_again == history_full

    class Interrupt(Exception):
        pass

    calls = []

    def crash_in_epoch_3(module):
        if len(calls) == 2:
            raise Interrupt
        calls.append(1)
        return {}

    checkpoint = tmp_path / "state.pt"
    with pytest.raises(Interrupt):
        run_hdml(small_config(), class_labels=labels, checkpoint=checkpoint, validate=crash_in_epoch_3)
    saved = torch.load(checkpoint, weights_only=True)
    assert any(name.startswith("generator.") for name in saved["module"])
    assert any(name.startswith("softmax.") for name in saved["module"])
    assert len(saved["synthesis"]["optimizers"]) == 2 and math.isfinite(saved["synthesis"]["status"]["j_avg"])
    resumed, history = run_hdml(small_config(), class_labels=labels, checkpoint=checkpoint, seed=99)
    assert history == history_full
    for a, b in zip(uninterrupted.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_hdml_without_labels_trains_no_softmax():
    _, history = run_hdml(small_config(epochs=2))
    assert all(row["j_soft"] == 0 and row["j_ce"] == 0 for row in history)


def test_supervised_triplets_and_npair_from_labels():
    inputs, labels, _ = synthetic_problem()
    triplets = tuples.LabeledTriplets(labels, negatives_nearest=5)
    _, history = run(small_config(epochs=5), source=triplets)
    assert history[-1]["loss"] < history[0]["loss"]
    pairs = tuples.LabeledPairs(labels, tuples.npair_group_size(labels, 8))
    _, history = run(small_config(epochs=5, loss="npair"), source=pairs)
    assert history[-1]["loss"] < history[0]["loss"] and all(row["active"] == 1 for row in history)
    _, history = run_hdml(small_config(epochs=3, loss="npair"), source=pairs, class_labels=labels)
    assert history[1]["j_avg"] == pytest.approx(history[0]["loss"]) and history[-1]["j_ce"] > 0


def test_incompatible_losses_and_sources_are_refused():
    _, labels, pools = synthetic_problem()
    with pytest.raises(ValueError, match="npair"):
        run(small_config(loss="npair"))
    with pytest.raises(ValueError, match="npair"):
        run(small_config(), source=tuples.LabeledPairs(labels, 4))
    with pytest.raises(ValueError, match="contrastive"):
        run_hdml(small_config(loss="contrastive", margin=0.7))
    with pytest.raises(ValueError, match="FC head"):
        training.fit(StandIn(), *synthetic_problem()[:1], np.arange(80), 80, pools, small_config(), synthesis=SYNTHESIS)
