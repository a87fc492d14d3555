"""The attack suite of issue 19: crafted and randomly mutated ground-truth
pickles go through the project's loader in subprocesses, which must exit with
status 2 and one line on stderr (or load, for a harmless mutation): never a
signal (a segfault is -11), never a traceback (status 1).

- Crafted: each case is a ``gnd_roxford5k.pkl`` read by ``load_revisited`` in
  its own ``python -c`` process (the acceptance check), and the object-array
  case also through ``python -m stages.prepare`` (it used to exit 139).
- Mutated: revisited-style ground truth in protocols 0-5, with lists and with
  numpy arrays, with bytes replaced, cut short, opcodes swapped or replaced
  (seeded); each case runs in a child forked by tests/crash_runner.py.
Path escapes are in tests/test_dataset_paths.py, checkpoints in
tests/test_networks.py and tests/test_training.py.
"""
from __future__ import annotations

import codecs
import json
import os
import pickle
import pickletools
import random
import re
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from test_safe_pickle import revisited_ground_truth

ROOT = Path(__file__).resolve().parents[1]
LOADER = """
import sys
from mom.datasets.revisited import load_revisited
from mom.errors import InputError
try:
    benchmark = load_revisited(sys.argv[1], "roxford5k")
except InputError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
print(len(benchmark.database), len(benchmark.queries))
"""


class Reduce:
    """Pickles as a call of ``function(*args)`` (then BUILD with ``state``): what an attacker writes."""

    def __init__(self, function, args, state=None):
        self.function, self.args, self.state = function, args, state

    def __reduce__(self):
        return (self.function, self.args) if self.state is None else (self.function, self.args, self.state)


def ground_truth_with(easy=None, qimlist=("all_souls_000013",), protocol=2) -> bytes:
    """A revisited ground truth whose first query's ``easy`` is ``easy``."""
    gnd = [{"bbx": [1.0, 2.0, 30.0, 40.0], "easy": [0] if easy is None else easy, "hard": [], "junk": []}]
    data = {"imlist": ["all_souls_000001", "all_souls_000002"], "qimlist": list(qimlist), "gnd": gnd}
    return pickle.dumps(data, protocol=protocol)


def _self_containing_list() -> list:
    items = []
    items.append(items)
    return items


CRAFTED = {
    "object_array_over_raw_bytes": (ground_truth_with(Reduce(np.ndarray, ((1,), "O", b"A" * 8))),
                                    r"refusing REDUCE at byte \d+: calls numpy.ndarray directly"),
    "object_dtype_array": (ground_truth_with(np.array([1, "x"], dtype=object)),
                           r"refusing REDUCE at byte \d+: dtype 'O8' is not one of"),
    "negative_offset_read": (ground_truth_with(Reduce(np.ndarray, ((4,), "u8", b"A" * 8, -32))),
                             r"calls numpy.ndarray directly"),
    "bytearray_negative_offset_write": (ground_truth_with(Reduce(np.ndarray, ((4,), "u1", bytearray(8), -16)),
                                                         protocol=5),
                                        r"refusing REDUCE at byte \d+: calls numpy.ndarray directly"),
    "setitem_on_array": (pickle.dumps(np.arange(3), protocol=2)[:-1] + b"K\x00K\x01s.",
                         r"refusing SETITEM at byte \d+: adds items to a ndarray"),
    "dtype_build_hidden_object_field": (
        ground_truth_with(Reduce(np.dtype, ("i8", False, True), (3, "|", None, ("x",), {"x": ("O", 0)}, 8, 1, 0x3F))),
        r"refusing BUILD at byte \d+: dtype i8 with a state other than numpy's plain"),
    "dtype_offset_2_40": (
        ground_truth_with(Reduce(np.dtype, ("i8", False, True), (3, "|", None, ("x",), {"x": ("i8", 1 << 40)}, 8, 1, 0))),
        r"refusing BUILD at byte \d+: dtype i8 with a state"),
    "binbytes8_of_2_62": (b"\x80\x04\x8e" + struct.pack("<Q", 2**62) + b"abc.",
                          r"BINBYTES8 at byte 2: ValueError: expected 4611686018427387904 bytes"),
    "binunicode8_of_2_62": (b"\x80\x04\x8d" + struct.pack("<Q", 2**62) + b"abc.", r"BINUNICODE8 at byte 2"),
    "bytes_of_10e10_via_reduce": (ground_truth_with(Reduce(bytes, (10**10,))),
                                  r"refusing REDUCE at byte \d+: bytes\(\) with arguments"),
    "lists_nested_1e5_deep": (b"\x80\x02" + b"]" * 100_000 + b"a" * 99_999 + b".",
                              r"refusing APPEND at byte \d+: containers nested deeper than 100"),
    "marks_nested_1e5_deep": (b"(" * 100_000 + b"t" * 100_000 + b".", r"refusing MARK at byte 100: MARKs nested"),
    "unknown_codec": (ground_truth_with(Reduce(codecs.encode, ("abc", "no_such_codec"))),
                      r"_codecs.encode with arguments other than \(text, 'latin1'\)"),
    "rot13_codec": (ground_truth_with(Reduce(codecs.encode, ("abc", "rot13"))), r"_codecs.encode with arguments"),
    "nul_byte_in_a_query_path": (ground_truth_with(qimlist=["all_souls\x00000013"]),
                                 r"gnd_roxford5k.pkl lists 'all_souls\\x00000013.jpg', which holds a NUL byte"),
    "persistent_id": (b"\x80\x02X\x01\x00\x00\x00aQ.", r"refusing BINPERSID at byte 8: persistent ids"),
    "shell_command": (ground_truth_with(Reduce(os.system, ("touch pwned",))),
                      r"refusing GLOBAL at byte \d+: global posix.system is not admitted"),
    "list_containing_itself": (ground_truth_with(_self_containing_list()), r"puts a list inside itself"),
}


def _run_loader(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", LOADER, str(root)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_crafted_pickles_exit_2_with_one_line_through_the_loader(tmp_path):
    roots = {}
    for name, (data, _) in CRAFTED.items():
        roots[name] = tmp_path / name
        roots[name].mkdir()
        (roots[name] / "gnd_roxford5k.pkl").write_bytes(data)
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(roots, pool.map(_run_loader, roots.values())))
    failures = []
    for name, result in results.items():
        lines = result.stderr.strip().splitlines()
        expected = CRAFTED[name][1]
        ok = (result.returncode == 2 and len(lines) == 1 and str(roots[name] / "gnd_roxford5k.pkl") in lines[0]
              and re.search(expected, lines[0]))
        if not ok:
            failures.append(f"{name}: exit {result.returncode}, stderr {result.stderr.strip()[:400]!r}")
    assert failures == [], "\n".join(failures)
    assert not (ROOT / "pwned").exists() and not any(tmp_path.rglob("pwned"))


def test_the_object_array_that_crashed_prepare_is_one_line_exit_2(tmp_path):
    root = tmp_path / "roxford5k"
    root.mkdir()
    (root / "gnd_roxford5k.pkl").write_bytes(CRAFTED["object_array_over_raw_bytes"][0])
    result = subprocess.run([sys.executable, "-m", "stages.prepare", "--source", "roxford5k", "--root", str(root),
                             "--out-dir", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"prepare: error: {root / 'gnd_roxford5k.pkl'}: refusing REDUCE at byte ")
    assert not (tmp_path / "out").exists()


MUTATIONS = ("replace_bytes", "truncate", "swap_opcodes", "replace_opcode")
CASES_PER_BASE = 24
SEED = 19


def mutate(data: bytes, kind: str, rng: random.Random, opcode_positions: list[int]) -> bytes:
    mutated = bytearray(data)
    if kind == "replace_bytes":
        for _ in range(rng.randint(1, 3)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
    elif kind == "truncate":
        del mutated[rng.randrange(len(mutated)):]
    elif kind == "swap_opcodes":
        i, j = rng.sample(opcode_positions, 2)
        mutated[i], mutated[j] = mutated[j], mutated[i]
    else:
        mutated[rng.choice(opcode_positions)] = ord(rng.choice(pickletools.opcodes).code)
    return bytes(mutated)


def mutated_ground_truths(folder: Path) -> list[Path]:
    rng = random.Random(SEED)
    paths = []
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        for arrays in (False, True):
            base = pickle.dumps(revisited_ground_truth(arrays), protocol=protocol)
            positions = [pos for _, _, pos in pickletools.genops(base)]
            for case in range(CASES_PER_BASE):
                kind = MUTATIONS[case % len(MUTATIONS)]
                path = folder / f"p{protocol}_{'arrays' if arrays else 'lists'}_{kind}_{case}.pkl"
                path.write_bytes(mutate(base, kind, rng, positions))
                paths.append(path)
    return paths


@pytest.fixture(scope="module")
def mutation_results(tmp_path_factory):
    paths = mutated_ground_truths(tmp_path_factory.mktemp("mutated"))
    halves = [paths[: len(paths) // 2], paths[len(paths) // 2:]]
    command = [sys.executable, "-m", "tests.crash_runner"]
    with ThreadPoolExecutor(max_workers=2) as pool:
        outputs = list(pool.map(lambda half: subprocess.run([*command, *map(str, half)], cwd=ROOT, capture_output=True,
                                                            text=True, timeout=600, check=True).stdout, halves))
    return [result for output in outputs for result in json.loads(output)]


def test_mutated_ground_truth_never_crashes_the_loader(mutation_results):
    assert len(mutation_results) == 6 * 2 * CASES_PER_BASE
    wrong = []
    for result in mutation_results:
        lines = result["stderr"].strip().splitlines()
        refused_in_one_line = result["status"] == 2 and len(lines) == 1 and result["path"] in lines[0]
        loaded_quietly = result["status"] == 0 and not lines
        if not (refused_in_one_line or loaded_quietly):
            wrong.append(f"{Path(result['path']).name}: status {result['status']}: {result['stderr'][-600:]!r}")
    assert wrong == [], "\n".join(wrong)
    refused = sum(result["status"] == 2 for result in mutation_results)
    assert refused >= len(mutation_results) // 2, f"only {refused} of {len(mutation_results)} mutations were refused"


def test_the_crash_runner_can_fail(tmp_path):
    """A child killed by a signal or raising a non-InputError is reported as such."""
    code = ("import os, signal, sys, json; sys.argv = ['x']; from tests import crash_runner; "
            "crash_runner.parse_ground_truth = lambda path: os.kill(os.getpid(), signal.SIGSEGV) if 'segv' in str(path) "
            "else 1 / 0; print(json.dumps([crash_runner.run_case(p) for p in ('a_segv', 'b_raise')]))")
    output = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    segv, raised = json.loads(output)
    assert segv["status"] == -11
    assert raised["status"] == 1 and "ZeroDivisionError" in raised["stderr"]
