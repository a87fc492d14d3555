"""EmbeddingNet: definition, prefix/suffix split, meta and checkpoint round trip;
foreign, unsafe and mismatched checkpoints are one-line errors (issues 18, 19)."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mom import networks
from mom.errors import InputError
from mom.pooling import gem, l2n

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def retrieval_net():
    return networks.build_network(networks.make_meta("efficientnet_lite0", "gem", 3.0))


def _pixels(batch=2, size=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, size, size), generator=generator).float()


def test_forward_is_normalize_trunk_pool_l2(retrieval_net):
    pixels = _pixels()
    with torch.inference_mode():
        feature_map = retrieval_net.trunk((pixels - 127.0) / 128.0)
        expected = gem(feature_map, 3.0)
        expected = expected / expected.norm(dim=1, keepdim=True)
        out = retrieval_net(pixels)
    assert out.shape == (2, 1280) == (2, retrieval_net.dim)
    assert torch.allclose(out, expected, atol=1e-6)


def test_head_maps_to_head_dim():
    net = networks.build_network(networks.make_meta("efficientnet_lite0", "mac", head_dim=64))
    pixels = _pixels()
    with torch.inference_mode():
        pooled = net.trunk(net.normalize(pixels)).amax(dim=(-2, -1))
        expected = l2n(net.head(pooled))
        out = net(pixels)
    assert out.shape == (2, 64) and net.meta["dim"] == 64
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-5)


def test_frozen_prefix_then_trainable_suffix(retrieval_net):
    blocks = retrieval_net.trunk_blocks()
    assert [name for name, _ in blocks][-2:] == ["block6", "head"]
    pixels = _pixels()
    with torch.inference_mode():
        whole = retrieval_net(pixels)
        for start in (0, 1, len(blocks) - 2, len(blocks)):
            cached = retrieval_net.trunk[:start](retrieval_net.normalize(pixels))
            assert torch.allclose(retrieval_net.forward_from(cached if start else pixels, start), whole, atol=1e-6)


def test_build_is_deterministic_including_the_head():
    meta = networks.make_meta("efficientnet_lite0", "spoc", head_dim=8)
    a = networks.build_network(meta, load_pretrained=False)
    b = networks.build_network(meta, load_pretrained=False)
    assert torch.equal(a.head.weight, b.head.weight)


def test_checkpoint_round_trip(tmp_path):
    meta = networks.make_meta("efficientnet_lite0", "rmac", head_dim=16)
    net = networks.build_network(meta, seed=3)
    with torch.no_grad():  # weights that no fresh build would have
        net.head.weight.mul_(2.0)
        dict(net.trunk.named_parameters())["head.0.weight"].add_(0.01)
    path = tmp_path / "model.pt"
    networks.save_checkpoint(path, net, {"epoch": 7, "history": [0.5, 0.25]})
    loaded, extra = networks.load_checkpoint(path)
    assert extra == {"epoch": 7, "history": [0.5, 0.25]}
    assert loaded.meta == meta
    pixels = _pixels(seed=4)
    with torch.inference_mode():
        assert torch.equal(loaded(pixels), net(pixels))
    # same network, same bytes (the temporary file's name does not leak into the archive)
    again = tmp_path / "again.pt"
    networks.save_checkpoint(again, loaded, {"epoch": 7, "history": [0.5, 0.25]})
    assert again.read_bytes() == path.read_bytes()


def test_learned_gem_p_survives_the_checkpoint(tmp_path):
    net = networks.build_network(networks.make_meta("efficientnet_lite0", "gem", 3.0), load_pretrained=False)
    net.pool.p.fill_(4.5)
    networks.save_checkpoint(tmp_path / "m.pt", net)
    loaded, _ = networks.load_checkpoint(tmp_path / "m.pt")
    assert float(loaded.pool.p) == 4.5


def test_bad_checkpoints_and_meta(tmp_path):
    with pytest.raises(InputError, match="not found"):
        networks.load_checkpoint(tmp_path / "missing.pt")
    torch.save({"weights": {}}, tmp_path / "other.pt")
    with pytest.raises(InputError, match=r"other.pt: not a checkpoint of this project: missing keys \['meta', "
                                         r"'state_dict'\] \(it has 'weights'\)"):
        networks.load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(InputError, match="pooling must be one of"):
        networks.make_meta("efficientnet_lite0", "avg")
    meta = networks.make_meta("efficientnet_lite0")
    meta["channels"] = 7
    with pytest.raises(InputError, match="channels"):
        networks.check_meta(meta)


class _RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.marker}",))


def _small_checkpoint(path, head_dim=8):
    net = networks.build_network(networks.make_meta("efficientnet_lite0", "gem", 3.0, head_dim), load_pretrained=False)
    networks.save_checkpoint(path, net)
    return torch.load(path, weights_only=True)


def _refusal(path) -> str:
    with pytest.raises(InputError) as error:
        networks.load_checkpoint(path)
    assert "\n" not in str(error.value)
    return str(error.value)


def test_files_that_are_not_checkpoints_are_one_line_errors(tmp_path):
    (tmp_path / "text.pt").write_text("root:x:0:0:root:/root:/bin/bash\n")
    assert _refusal(tmp_path / "text.pt").endswith("text.pt: not a torch checkpoint (neither a zip archive nor a pickle)")
    (tmp_path / "pickle.pt").write_bytes(b"\x80\x02cposix\nsystem\nX\x04\x00\x00\x00trueq\x85R.")
    assert "pickle.pt: not a readable checkpoint (" in _refusal(tmp_path / "pickle.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    assert _refusal(tmp_path / "empty.pt").endswith("empty.pt: checkpoint is an empty file")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    assert "tensor.pt: holds a Tensor, not a checkpoint of this project" in _refusal(tmp_path / "tensor.pt")
    data = (tmp_path / "tensor.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    assert "cut.pt: not a readable checkpoint (RuntimeError: PytorchStreamReader failed" in _refusal(tmp_path / "cut.pt")


def test_an_unsafe_file_is_refused_in_one_line_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"meta": _RunsShell(marker), "state_dict": {}}, tmp_path / "evil.pt")
    message = _refusal(tmp_path / "evil.pt")
    assert message.startswith(f"{tmp_path / 'evil.pt'}: not a readable checkpoint (refused by torch's weights-only "
                              "loader: Trying to load unsupported GLOBAL posix.system")
    assert not marker.exists()


def test_meta_out_of_bounds_is_refused_before_allocating(tmp_path):
    payload = _small_checkpoint(tmp_path / "model.pt")
    for key, value, message in [
        ("head_dim", 10**12, r"head_dim must be None or an integer in 1..65,536, got 1000000000000"),
        ("head_dim", True, r"head_dim must be None or an integer"),
        ("gem_p", "3", r"gem_p must be a number in \(0, 1000.0\], got '3'"),
        ("backbone", ["resnet50"], r"backbone must be one of .*got \['resnet50'\]"),
        ("normalization", {"mean": [0, 0, 0], "std": [1, 0, 1]}, r"normalization must be"),
        ("dim", 99, r"dim 99 is neither head_dim nor"),
    ]:
        bad = {**payload, "meta": {**payload["meta"], key: value}}
        torch.save(bad, tmp_path / "bad.pt")
        assert re.search(rf"bad.pt: network meta: {message}", _refusal(tmp_path / "bad.pt")), (key, value)
    torch.save({**payload, "format": 2}, tmp_path / "future.pt")
    assert "future.pt: checkpoint format 2; this code reads format 1" in _refusal(tmp_path / "future.pt")
    torch.save({**payload, "extra": torch.zeros(1)}, tmp_path / "extra.pt")
    assert "'extra' must be a dict" in _refusal(tmp_path / "extra.pt")


def test_weights_of_another_architecture_name_what_differs(tmp_path):
    payload = _small_checkpoint(tmp_path / "model.pt", head_dim=8)
    state = payload["state_dict"]
    torch.save({**payload, "state_dict": {k: v for k, v in state.items() if k != "head.bias"}}, tmp_path / "cut.pt")
    assert re.search(r"cut.pt: weights of another architecture than its meta describes \(backbone efficientnet_lite0, "
                     r"head 8\): missing 1 keys \(head.bias\)$", _refusal(tmp_path / "cut.pt"))
    wider = {**payload, "meta": {**payload["meta"], "head_dim": 16, "dim": 16}}
    torch.save(wider, tmp_path / "head.pt")
    assert re.search(r"head.pt: .*\(backbone efficientnet_lite0, head 16\): other shapes for 2 keys \(head.bias "
                     r"\(8,\) \(expected \(16,\)\), head.weight \(8, 1280\) \(expected \(16, 1280\)\)\)$",
                     _refusal(tmp_path / "head.pt"))
    headless = {**payload, "meta": {**payload["meta"], "head_dim": None, "dim": 1280}}
    torch.save(headless, tmp_path / "nohead.pt")
    assert re.search(r"head none\): unexpected 2 keys \(head.bias, head.weight\)$", _refusal(tmp_path / "nohead.pt"))
    googlenet = {**payload, "meta": networks.make_meta("googlenet", "gem", 3.0, 8)}
    torch.save(googlenet, tmp_path / "backbone.pt")
    assert re.search(r"backbone.pt: weights of another architecture than its meta describes \(backbone googlenet, "
                     r"head 8\): missing \d+ keys \(.*\); unexpected \d+ keys \(.*\)", _refusal(tmp_path / "backbone.pt"))
    torch.save({**payload, "state_dict": {"head.weight": [1, 2]}}, tmp_path / "lists.pt")
    assert "lists.pt: state_dict is not a dict of named tensors" in _refusal(tmp_path / "lists.pt")


def test_a_stage_prints_an_unsafe_model_refusal_as_one_line(tmp_path):
    """Issue 19: whiten printed torch's refusal of a malicious model.pt over six lines."""
    marker = tmp_path / "pwned"
    torch.save({"meta": _RunsShell(marker), "state_dict": {}}, tmp_path / "model.pt")
    result = subprocess.run([sys.executable, "-m", "stages.whiten", "--model", str(tmp_path / "model.pt"),
                             "--out-dir", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("whiten: error: ") and "unsupported GLOBAL posix.system" in lines[0]
    assert not marker.exists() and not (tmp_path / "out").exists()
