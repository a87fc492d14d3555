"""mom.safe_pickle: what the decoder admits equals pickle's own result; everything
else is one InputError naming the file, the opcode and its byte position.

The crafted attacks of issue 19 (object arrays, raw-memory arrays, dtype states,
huge sizes, deep nesting) run in subprocesses in tests/test_attack_suite.py;
here only inputs that cannot harm the test process are decoded in-process.
"""
import os
import pickle
import pickletools
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mom import safe_pickle
from mom.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
PROTOCOLS = range(pickle.HIGHEST_PROTOCOL + 1)


class _RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _CallsEval:
    def __reduce__(self):
        return (eval, ("1 + 1",))


def revisited_ground_truth(arrays: bool) -> dict:
    """A small ground truth shaped like revisitop's gnd_*.pkl (lists or numpy arrays of indices)."""
    index = (lambda values, dtype=np.int64: np.array(values, dtype)) if arrays else (lambda values, dtype=None: list(values))
    return {
        "imlist": ["all_souls_000001", "radcliffe_camera_000002", "ashmolean_000283", "bodleian_000107"],
        "qimlist": ["all_souls_000013", "radcliffe_camera_000519"],
        "gnd": [
            {"bbx": [136.5, 34.1, 648.5, 955.7], "easy": index([0, 1]), "hard": index([], np.int64),
             "junk": index([3], np.int32)},
            {"bbx": index([1.0, 2.0, 300.25, 400.5], np.float64) if arrays else [1.0, 2.0, 300.25, 400.5],
             "easy": index([2]), "hard": index([0, 3], np.uint16), "junk": index([])},
        ],
    }


def plain_values() -> dict:
    """Every kind of value the decoder admits, including numpy's harder cases."""
    shared = [1, 2]
    matrix = np.arange(12, dtype=np.int64).reshape(3, 4)
    return {
        "scalars": (None, True, False, 0, -1, 255, 65536, -2**31, 2**63, -2**70, 1.5, float("inf"), -0.0),
        "text": ("", "ascii", "é\n\\x00 \u20ac\U0001f600", b"", b"\x00\xffbytes"),
        "nested": [[1, [2, (3, {"k": (4,)})]], {}, (), []],
        "dict_keys": {1: "int", "s": "str", (1, "t"): "tuple", 2.5: "float", None: "none", b"b": "bytes"},
        "shared": [shared, shared],
        "arrays": [np.array([True, False]), np.arange(5, dtype=np.int8), np.arange(5, dtype=np.uint64),
                   np.zeros((2, 3), np.float32, order="F"), np.array([[1, 2], [3, 4]], ">i4"),
                   np.asfortranarray(np.array([[1.5, 2.5], [3.5, 4.5]], ">f8")), matrix[:, ::2], matrix.T,
                   np.array(2.5), np.zeros((0, 3), np.int16), np.frombuffer(b"abcd", np.uint8)],
        "same_array_twice": [matrix, matrix],
        "numpy_scalars": [np.float64(0.25), np.int64(7), np.bool_(True), np.uint8(3), np.float32(1.5)],
    }


def same(a, b) -> bool:
    """Equal values of the same types (arrays: dtype with byte order, shape, layout, values)."""
    if isinstance(a, np.ndarray):
        return (type(b) is np.ndarray and a.dtype.str == b.dtype.str and a.shape == b.shape
                and a.flags.f_contiguous == b.flags.f_contiguous and np.array_equal(a, b))
    if isinstance(a, dict):
        return type(b) is dict and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and a != a:
        return isinstance(b, float) and b != b
    return type(a) is type(b) and a == b and str(a) == str(b)


@pytest.mark.parametrize("arrays", [False, True], ids=["lists", "arrays"])
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_revisited_ground_truth_loads_as_pickle_loads_it(tmp_path, protocol, arrays):
    path = tmp_path / "gnd_roxford5k.pkl"
    path.write_bytes(pickle.dumps(revisited_ground_truth(arrays), protocol=protocol))
    assert same(safe_pickle.load(path), pickle.loads(path.read_bytes()))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_every_admitted_kind_of_value_equals_pickle_loads(protocol):
    data = pickle.dumps(plain_values(), protocol=protocol)
    decoded = safe_pickle.loads(data)
    assert same(decoded, pickle.loads(data))
    assert decoded["shared"][0] is decoded["shared"][1]  # memo references stay shared, as in pickle
    assert all(array.flags.writeable for array in decoded["arrays"])


def test_arrays_are_fresh_memory_not_views_of_the_file():
    data = bytearray(pickle.dumps(np.arange(4, dtype=np.uint8), protocol=5))
    array = safe_pickle.loads(bytes(data))
    array[0] = 99
    assert safe_pickle.loads(bytes(data))[0] == 0


def test_python2_style_strings_decode_as_latin1():
    # protocol 0/1 STRING and SHORT_BINSTRING (what Python 2 wrote), as pickle.loads(encoding='latin1')
    assert safe_pickle.loads(b"(lp0\nS'caf\\xe9'\np1\naU\x03abcp2\na.") == ["caf\xe9", "abc"]


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_refuses_a_pickle_that_would_run_a_shell_command(tmp_path, protocol):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"imlist": [], "gnd": [_RunsShell(marker)]}, protocol=protocol))
    with pytest.raises(InputError, match=r"evil.pkl: refusing (STACK_)?GLOBAL at byte \d+: global (posix|os|nt)\.system "
                                         r"is not admitted"):
        safe_pickle.load(path)
    assert not marker.exists()


@pytest.mark.parametrize("crafted, message", [
    (pickle.dumps(_CallsEval(), protocol=2), r"refusing GLOBAL at byte 2: global __builtin__.eval"),
    (b"csubprocess\nPopen\n(S'true'\ntR.", r"refusing GLOBAL at byte 0: global subprocess.Popen"),
    (b"cbuiltins\ngetattr\n(cbuiltins\nset\nS'__init__'\ntR.", r"refusing GLOBAL at byte 0: global builtins.getattr"),
    (b"c_codecs\nencode\n(Vabc\nVrot13\ntR.", r"refusing REDUCE at byte 30: _codecs.encode with arguments other than"),
    (b"c__builtin__\nbytes\n(I10\ntR.", r"refusing REDUCE at byte 25: bytes\(\) with arguments"),
    (pickle.dumps({1, 2}, protocol=4), r"refusing EMPTY_SET at byte \d+: sets are not admitted"),
    (pickle.dumps({1, 2}, protocol=2), r"refusing GLOBAL at byte 2: global __builtin__.set is not admitted"),
    (pickle.dumps(2j, protocol=2), r"global __builtin__.complex is not admitted"),
    (pickle.dumps(bytearray(b"x"), protocol=5), r"refusing STOP at byte \d+: the result is a bytearray"),
    (pickle.dumps(np.dtype("f8"), protocol=2), r"refusing STOP at byte \d+: the result is a numpy dtype"),
    (b"Pid\n.", r"refusing PERSID at byte 0: persistent ids"),
    (b"(i__main__\nThing\n.", r"refusing INST at byte 1: it would build an object"),
    (b"\x80\x06N.", r"refusing PROTO at byte 0: pickle protocol 6"),
    (b"N.N", r"refusing STOP at byte 1: data after the STOP"),
    (b"NN.", r"refusing STOP at byte 2: STOP with 2 values"),
    (b"\x80\x02]q\x00h\x00a.", r"refusing APPEND at byte 7: puts a list inside itself"),
    (b"\x80\x02]q\x00]h\x00a.", r"refusing STOP at byte 9: STOP with 2 values"),
    (b"\x80\x02]q\x00]h\x00ah\x00K\x01a.", r"refusing APPEND at byte 13: changes a list that already sits inside"),
    (b"\x80\x02h\x05.", r"refusing BINGET at byte 2: memo entry 5 was never stored"),
    (b"I" + b"9" * 5000 + b"\n.", r"refusing INT at byte 0: a number written with more than 1000 characters"),
    (b"\xff", r"refusing byte b'\\xff' at byte 0: not a pickle opcode"),
    (b"", r"refusing end of file at byte 0: the pickle ends before its STOP"),
])
def test_refusals_name_the_opcode_and_its_position(crafted, message):
    with pytest.raises(InputError, match=message):
        safe_pickle.loads(crafted, where="crafted.pkl")


def test_limits_are_one_line_errors(monkeypatch):
    deep_lists = b"\x80\x02" + b"]" * 200 + b"a" * 199 + b"."
    with pytest.raises(InputError, match=r"refusing APPEND at byte \d+: containers nested deeper than 100"):
        safe_pickle.loads(deep_lists)
    with pytest.raises(InputError, match=r"refusing MARK at byte 100: MARKs nested deeper than 100"):
        safe_pickle.loads(b"(" * 200 + b"t" * 200 + b".")
    with pytest.raises(InputError, match=r"refusing TUPLE1 at byte 100: containers nested deeper than 100"):
        safe_pickle.loads(b")" + b"\x85" * 200 + b".")
    monkeypatch.setattr(safe_pickle, "MAX_VALUES", 1000)
    with pytest.raises(InputError, match=r"refusing \w+ at byte \d+: more than 1,000 values"):
        safe_pickle.loads(pickle.dumps(list(range(2000)), protocol=2))
    monkeypatch.setattr(safe_pickle, "MAX_CONTAINERS", 50)
    with pytest.raises(InputError, match=r"refusing EMPTY_LIST at byte 102: more than 50 lists, dicts, tuples and arrays"):
        safe_pickle.loads(b"\x80\x02" + b"]0" * 51 + b"].")
    monkeypatch.setattr(safe_pickle, "MAX_FILE_BYTES", 100)
    with pytest.raises(InputError, match=r"crafted.pkl: 101 bytes; pickled data files are read up to 100"):
        safe_pickle.loads(b"N" * 100 + b".", where="crafted.pkl")


def amplified_array(copies: int) -> bytes:
    """A protocol-5 pickle of a 64 KiB array, then ``copies`` more calls of
    _frombuffer on the same memoized arguments (5 bytes each)."""
    data = pickle.dumps(np.zeros(1 << 16, np.uint8), protocol=5)
    ops = list(pickletools.genops(data))
    memoized, memo = {}, 0
    for (op, _, _), (following, _, _) in zip(ops, ops[1:]):
        if following.name == "MEMOIZE":
            memoized.setdefault(op.name, []).append(memo)
        memo += op.name == "MEMOIZE"
    function, args = memoized["STACK_GLOBAL"][0], memoized["TUPLE"][-1]
    return data[:-1] + (b"h" + bytes([function]) + b"h" + bytes([args]) + b"R") * copies + b"l."


def test_array_contents_are_checked_against_their_dtype_and_shape():
    bools = bytearray(pickle.dumps(np.array([True, False]), protocol=5))
    start = bools.index(b"\x96") + 9  # BYTEARRAY8, 8 length bytes, then the data
    bools[start:start + 2] = b"\x02\x00"
    with pytest.raises(InputError, match=r"refusing REDUCE at byte \d+: bool array data holds bytes other than 0 and 1"):
        safe_pickle.loads(bytes(bools))
    with pytest.raises(InputError, match=r"an array shape must be a tuple of at most 32 sizes"):
        safe_pickle.loads(pickle.dumps(np.zeros((1,) * 33, np.uint8), protocol=5))
    short = pickle.dumps(np.arange(3, dtype=np.int64), protocol=3).replace(b"C\x18", b"C\x10", 1)
    with pytest.raises(InputError, match=r"array data has 16 bytes; shape \(3,\) of int64 needs exactly 24"):
        safe_pickle.loads(short[:short.index(b"C\x10") + 2 + 16] + short[short.index(b"C\x10") + 2 + 24:])


def test_the_decoded_size_is_bounded_by_the_file_size():
    assert same(safe_pickle.loads(amplified_array(0)[:-2] + b"."), np.zeros(1 << 16, np.uint8))
    with pytest.raises(InputError, match=r"refusing REDUCE at byte \d+: decoded data would exceed [\d,]+ bytes "
                                         r"\(4x the file size"):
        safe_pickle.loads(amplified_array(100))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_every_truncation_of_a_valid_file_is_an_input_error(protocol):
    data = pickle.dumps(revisited_ground_truth(arrays=True), protocol=protocol)
    for end in range(len(data)):
        with pytest.raises(InputError):
            safe_pickle.loads(data[:end])


def test_missing_and_unreadable_files_are_clear_errors(tmp_path):
    with pytest.raises(InputError, match="file not found"):
        safe_pickle.load(tmp_path / "missing.pkl")
    (tmp_path / "cut.pkl").write_bytes(pickle.dumps(revisited_ground_truth(False))[:40])
    with pytest.raises(InputError, match=r"cut.pkl: not a readable pickle of plain data: \w+ at byte \d+"):
        safe_pickle.load(tmp_path / "cut.pkl")


def test_huge_declared_sizes_do_not_allocate():
    for crafted in (b"\x80\x04\x8e" + struct.pack("<Q", 2**62) + b"abc.",
                    b"\x80\x04\x8d" + struct.pack("<Q", 2**62) + b"abc.",
                    b"\x80\x05\x96" + struct.pack("<Q", 2**62) + b"abc.",
                    b"\x80\x02\x8b" + struct.pack("<i", 2**31 - 1) + b"abc."):
        with pytest.raises(InputError, match=r"not a readable pickle of plain data: \w+ at byte 2: ValueError"):
            safe_pickle.loads(crafted)


def test_the_decoder_does_not_import_torch():
    code = "import sys; import mom.safe_pickle; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
