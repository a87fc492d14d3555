import os
import pickle

import numpy as np
import pytest

from mom import safe_pickle
from mom.errors import InputError


class _RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _CallsEval:
    def __reduce__(self):
        return (eval, ("1 + 1",))


def _gnd_like():
    return {
        "imlist": ["all_souls_000001", "radcliffe_000002"],
        "qimlist": ["all_souls_000013"],
        "gnd": [{"bbx": [136.5, 34.1, 648.5, 955.7], "easy": np.array([0, 1]), "hard": np.array([], np.int64),
                 "junk": [1], "ok": np.arange(3, dtype=np.int32)}],
        "other": (None, True, 2**70, 1.5, 2j, b"bytes", {1, 2}, frozenset({3}), np.float64(0.25), np.int64(7)),
        "objects": np.array([np.array([1, 2]), "x"], dtype=object),
    }


def _equal(a, b):
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape and all(
            _equal(x, y) for x, y in zip(a.ravel(), b.ravel()))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_plain_data_roundtrips_in_every_protocol(tmp_path, protocol):
    data = _gnd_like()
    path = tmp_path / "gnd.pkl"
    path.write_bytes(pickle.dumps(data, protocol=protocol))
    assert _equal(safe_pickle.load(path), data)


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_refuses_a_pickle_that_would_run_a_shell_command(tmp_path, protocol):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"imlist": [], "gnd": [_RunsShell(marker)]}, protocol=protocol))
    with pytest.raises(InputError, match=r"evil.pkl: refusing to load (posix|os|nt)\.system"):
        safe_pickle.load(path)
    assert not marker.exists()


def test_refuses_other_callables_and_hand_written_opcodes(tmp_path):
    with pytest.raises(InputError, match="refusing to load builtins.eval"):
        safe_pickle.loads(pickle.dumps(_CallsEval()))
    # Protocol-0 text naming subprocess.Popen directly (GLOBAL + REDUCE).
    crafted = b"csubprocess\nPopen\n(S'true'\ntR."
    with pytest.raises(InputError, match="refusing to load subprocess.Popen"):
        safe_pickle.loads(crafted)
    # An attribute lookup smuggled through builtins.getattr.
    crafted = b"cbuiltins\ngetattr\n(cbuiltins\nset\nS'__init__'\ntR."
    with pytest.raises(InputError, match="refusing to load builtins.getattr"):
        safe_pickle.loads(crafted)
    # An object array whose element would run code is refused too.
    evil_array = np.array([None, _RunsShell(tmp_path / "pwned")], dtype=object)
    with pytest.raises(InputError, match="refusing"):
        safe_pickle.loads(pickle.dumps(evil_array, protocol=2))
    assert not (tmp_path / "pwned").exists()


def test_codecs_encode_only_for_text_codecs():
    crafted = b"c_codecs\nencode\n(Vabc\nVrot13\ntR."
    with pytest.raises(InputError, match="rot13"):
        safe_pickle.loads(crafted)
    assert safe_pickle.loads(b"c_codecs\nencode\n(Vabc\nVlatin1\ntR.") == b"abc"


def test_broken_or_missing_files_are_clear_errors(tmp_path):
    with pytest.raises(InputError, match="file not found"):
        safe_pickle.load(tmp_path / "missing.pkl")
    (tmp_path / "cut.pkl").write_bytes(pickle.dumps(_gnd_like())[:40])
    with pytest.raises(InputError, match="cut.pkl: "):
        safe_pickle.load(tmp_path / "cut.pkl")
