"""Corrupt inputs between stages, generated from dvc.yaml: every stage refuses
each corruption of each artifact it reads in one line, exit status 2, nothing written.

The table is derived, not written down: a stage's *artifact inputs* are its
``deps`` in dvc.yaml that another stage writes (an ``outs`` entry, or a folder
holding one). A tiny valid pipeline is built once (tests/tiny_pipeline.py, with
params under which every stage reads every such input: Lw whitening, truncated
diffusion); each stage then runs once on it with its file opens traced, which
gives the files it reads under each input. For every (stage, input) pair and
every file name read under it (``manifest.parquet`` and ``pixels.npy`` of every
split of ``data/prepared``; the input itself when it is a file), each corruption
that applies to the file's format (:data:`CORRUPTIONS`) is substituted into every
such file at once, the stage's command (as DVC renders it) runs, and the test
checks: exit status 2, exactly one line on stderr besides the log lines, that
line names the input, no traceback, and none of the stage's outputs (dvc.yaml
``outs``) exists afterwards. A new stage or input in dvc.yaml is covered without
editing this file; an input the stage never opens fails the test.

The stage commands run in tests/stage_server.py (imports paid once per stage; the
corrupt-input runs in forked children), as ``python -m stages.<name>`` runs them.
"""
from __future__ import annotations

import fractions
import io
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

import tiny_pipeline as tiny

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not tiny.HAVE_FASHION, reason="Debian package dataset-fashion-mnist not installed")]

# On top of tiny_pipeline's params: settings under which each stage reads all of its deps.
READ_EVERY_INPUT = {"whiten": {"method": "lw"}, "diffuse": {"truncate": 30}}
FOREIGN_TEXT = b"root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n"


# --- corruptions: (name, applies to a file?, corrupt the file in place) -----------------------------------------

def _npy_bytes(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def _npz_bytes(arrays: dict) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _load_npz(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def _first(names, predicate):
    return next((name for name in names if predicate(name)), None)


def _npy_wrong_shape(path: Path) -> bytes:
    array = np.load(path)
    return _npy_bytes(array.reshape(1, -1) if array.ndim == 1 else array.ravel())


def _npy_wrong_dtype(path: Path) -> bytes:
    array = np.load(path)
    return _npy_bytes(array.astype(np.float32 if array.dtype == np.uint8 else np.int64))


def _npy_nan(path: Path) -> bytes | None:
    array = np.load(path)
    if not np.issubdtype(array.dtype, np.floating) or array.size == 0:
        return None
    array = array.copy()
    array.flat[0] = np.nan
    return _npy_bytes(array)


def _npy_one_row_fewer(path: Path) -> bytes | None:
    array = np.load(path)
    return _npy_bytes(array[:-1]) if len(array) else None


def _npz_objects(path: Path) -> bytes:
    arrays = _load_npz(path)
    arrays[next(iter(arrays))] = np.array([{"not": "numbers"}], dtype=object)
    return _npz_bytes(arrays)


def _npz_missing_array(path: Path) -> bytes:
    arrays = _load_npz(path)
    arrays.pop(sorted(arrays)[0])
    return _npz_bytes(arrays)


def _npz_float_member(path: Path, change) -> bytes | None:
    arrays = _load_npz(path)
    name = _first(sorted(arrays), lambda key: np.issubdtype(arrays[key].dtype, np.floating) and arrays[key].size)
    if name is None:
        return None
    arrays[name] = change(arrays[name].copy())
    return _npz_bytes(arrays)


def _with_nan(array):
    array.flat[0] = np.nan
    return array


def _parquet(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def _int_column(table: pa.Table):
    return _first(table.column_names, lambda name: pa.types.is_integer(table.schema.field(name).type))


def _parquet_missing_column(path: Path) -> bytes:
    table = pq.read_table(path)
    return _parquet(table.drop_columns([table.column_names[0]]))


def _parquet_ids_as_strings(path: Path) -> bytes | None:
    table = pq.read_table(path)
    name = _int_column(table)
    if name is None:
        return None
    index = table.column_names.index(name)
    return _parquet(table.set_column(index, name, table.column(name).cast(pa.string())))


def _parquet_id_out_of_range(path: Path) -> bytes | None:
    table = pq.read_table(path)
    name = _int_column(table)
    if name is None or len(table) == 0:
        return None
    values = table.column(name).to_numpy().copy()
    values[0] = 10 ** 6
    index = table.column_names.index(name)
    return _parquet(table.set_column(index, name, pa.array(values, table.schema.field(name).type)))


def _parquet_nan(path: Path) -> bytes | None:
    table = pq.read_table(path)
    name = _first(table.column_names, lambda key: pa.types.is_floating(table.schema.field(key).type))
    if name is None or len(table) == 0:
        return None
    values = table.column(name).to_numpy(zero_copy_only=False).copy()
    values[0] = np.nan
    index = table.column_names.index(name)
    return _parquet(table.set_column(index, name, pa.array(values, table.schema.field(name).type)))


def _torch_bytes(payload) -> bytes:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def _checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _pt_other_architecture(path: Path) -> bytes:
    payload = _checkpoint(path)
    payload["meta"] = {**payload["meta"], "head_dim": 16}  # weights without the head that meta describes
    return _torch_bytes(payload)


def _pt_missing_keys(path: Path) -> bytes:
    payload = _checkpoint(path)
    state = dict(payload["state_dict"])
    state.pop(sorted(state)[-1])
    payload["state_dict"] = state
    return _torch_bytes(payload)


def _pt_pickled_object(path: Path) -> bytes:
    payload = _checkpoint(path)
    payload["extra"] = {"note": fractions.Fraction(1, 3)}  # a class outside torch's weights-only allow list
    return _torch_bytes(payload)


def _json_numbers_as_strings(path: Path) -> bytes:
    def change(value):
        if isinstance(value, dict):
            return {key: change(item) for key, item in value.items()}
        if isinstance(value, list):
            return [change(item) for item in value]
        return "x" if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    return json.dumps(change(json.loads(path.read_text()))).encode()


def _tsv_values(path: Path, value: str) -> bytes:
    header = path.read_text().splitlines()[0]
    return (header + "\n" + "\t".join(["1"] + [value] * (len(header.split("\t")) - 1)) + "\n").encode()


@dataclass(frozen=True)
class Corruption:
    name: str
    suffixes: tuple[str, ...]  # file name endings it applies to ("" = every file)
    make: Callable[[Path], bytes | None]  # new bytes for the file (None: not applicable to this file)
    inconsistent: bool = False  # valid alone, wrong beside the stage's other inputs (needs some)


CORRUPTIONS = (
    Corruption("empty file", ("",), lambda path: b""),
    Corruption("truncated to half", ("",), lambda path: path.read_bytes()[:path.stat().st_size // 2]),
    Corruption("a text file (/etc/passwd)", ("",), lambda path: FOREIGN_TEXT),
    Corruption("another format (.npy bytes)", (".npz", ".parquet", ".pt", ".json", ".tsv"),
               lambda path: _npy_bytes(np.arange(12, dtype=np.float32).reshape(3, 4))),
    Corruption("another format (.npz bytes)", (".npy",), lambda path: _npz_bytes({"x": np.zeros(3)})),
    Corruption("Python objects (pickle)", (".npy",), lambda path: _npy_bytes(np.array([{"a": 1}], dtype=object), True)),
    Corruption("wrong shape", (".npy",), _npy_wrong_shape),
    Corruption("wrong dtype", (".npy",), _npy_wrong_dtype),
    Corruption("NaN value", (".npy",), _npy_nan),
    Corruption("one row fewer", (".npy",), _npy_one_row_fewer, inconsistent=True),
    Corruption("Python objects (pickle)", (".npz",), _npz_objects),
    Corruption("missing array", (".npz",), _npz_missing_array),
    Corruption("NaN value", (".npz",), lambda path: _npz_float_member(path, _with_nan)),
    Corruption("wrong shape", (".npz",), lambda path: _npz_float_member(path, lambda array: array.ravel()[:-1])),
    Corruption("missing column", (".parquet",), _parquet_missing_column),
    Corruption("ids as strings", (".parquet",), _parquet_ids_as_strings),
    Corruption("id out of range", (".parquet",), _parquet_id_out_of_range),
    Corruption("NaN value", (".parquet",), _parquet_nan),
    Corruption("another architecture", (".pt",), _pt_other_architecture),
    Corruption("missing weights", (".pt",), _pt_missing_keys),
    Corruption("pickled object", (".pt",), _pt_pickled_object),
    Corruption("a JSON list", (".json",), lambda path: b"[1, 2, 3]\n"),
    Corruption("strings for numbers", (".json",), _json_numbers_as_strings),
    Corruption("not numbers", (".tsv",), lambda path: _tsv_values(path, "abc")),
    Corruption("NaN value", (".tsv",), lambda path: _tsv_values(path, "nan")),
)
MISSING = "missing"


# --- the table from dvc.yaml ------------------------------------------------------------------------------------

def declared_outputs(stage: dict) -> list[str]:
    return [next(iter(entry)) if isinstance(entry, dict) else entry for entry in stage.get("outs", [])]


def artifact_inputs(stages: dict) -> dict[str, list[str]]:
    """Per stage, its deps that another stage writes (an output, or a folder above one)."""
    written = {name: declared_outputs(stage) for name, stage in stages.items()}
    inputs = {}
    for name, stage in stages.items():
        others = [out for other, outs in written.items() if other != name for out in outs]
        inputs[name] = [dep for dep in stage.get("deps", []) if isinstance(dep, str) and any(
            out == dep or out.startswith(dep.rstrip("/") + "/") or dep.startswith(out.rstrip("/") + "/")
            for out in others)]
    return inputs


# --- running stages ---------------------------------------------------------------------------------------------

class StageServer:
    def __init__(self, project: Path, module: str, scratch: Path):
        self.scratch = scratch
        self.module = module
        self.count = 0
        self.process = subprocess.Popen([sys.executable, str(tiny.ROOT / "tests" / "stage_server.py"), module],
                                        cwd=project, env=tiny.environment(project), stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)

    def run(self, args: list[str], trace: bool = False) -> tuple[int, str, Path]:
        """Run the stage; ``trace``: in the server itself, recording the files it opens."""
        self.count += 1
        prefix = self.scratch / f"{self.module}-{self.count}"
        request = {"args": args, "prefix": str(prefix), "trace": trace, "in_process": trace}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        rc = json.loads(self.process.stdout.readline())["rc"]
        return rc, Path(f"{prefix}.stderr").read_text(errors="replace"), Path(f"{prefix}.trace")

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def message_lines(stderr: str) -> list[str]:
    """stderr without the log lines (``HH:MM:SS stage: ...``) and progress bars."""
    lines = []
    for line in stderr.splitlines():
        line = line.split("\r")[-1].strip()
        if line and not (len(line) > 9 and line[2] == ":" and line[5] == ":" and line[8] == " "):
            lines.append(line)
    return lines


def tiny_project(folder: Path) -> tuple[Path, dict, dict]:
    """The tiny project (params: tiny_pipeline's and READ_EVERY_INPUT), its
    stages and their rendered commands, in run order; nothing run yet."""
    from dvc.utils.hydra import apply_overrides

    project = tiny.make_project(folder)
    apply_overrides(str(project / "params.yaml"), [f"{section}.{key}={json.dumps(value)}"
                                                   for section, values in READ_EVERY_INPUT.items()
                                                   for key, value in values.items()])
    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    return project, stages, tiny.stage_commands(project, tuple(stages))


def stash(project: Path, paths: list[str], where: Path) -> None:
    for relative in paths:
        if (project / relative).exists():
            (where / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.move(project / relative, where / relative)


def leftovers(project: Path, outputs: list[str]) -> list[str]:
    found = []
    for relative in outputs:
        target = project / relative
        if target.exists():
            found.append(relative)
        if target.parent.is_dir():
            found += [str(p.relative_to(project)) for p in target.parent.glob(f".tmp-{target.name}-*")]
    return found


def read_files(project: Path, dep: str, trace: Path) -> dict[str, list[Path]]:
    """Files the traced run opened under ``dep``, grouped by file name."""
    base = (project / dep).resolve()
    groups: dict[str, list[Path]] = {}
    for line in trace.read_text().splitlines():
        path = Path(line).resolve()
        if path.is_file() and (path == base or base in path.parents):
            groups.setdefault(path.name, []).append(path)
    return groups


def corruptions_for(files: list[Path], other_inputs: bool):
    """(name, {file: new bytes or None to delete}) for every corruption that applies to these files
    (``other_inputs``: the stage reads other artifact files too)."""
    yield MISSING, {path: None for path in files}
    for corruption in CORRUPTIONS:
        if not all(any(path.name.endswith(suffix) for suffix in corruption.suffixes) for path in files):
            continue
        if corruption.inconsistent and not other_inputs:
            continue
        contents = {path: corruption.make(path) for path in files}
        if all(content is not None for content in contents.values()):
            yield corruption.name, contents


def test_every_stage_refuses_every_corrupt_input(tmp_path, capsys):
    """Stages run in order; each first runs on the valid inputs (building its
    outputs and tracing what it reads), then once per corruption of each input."""
    project, stages, commands = tiny_project(tmp_path / "project")
    inputs = artifact_inputs(stages)
    failures, pairs, cases = [], 0, 0
    for stage, argv in commands.items():
        outputs = declared_outputs(stages[stage])
        server = StageServer(project, argv[2], tmp_path)
        try:
            rc, stderr, trace = server.run(argv[3:], trace=True)
            assert rc == 0, f"{stage} fails on the valid pipeline:\n{stderr[-3000:]}"
            stash(project, outputs, tmp_path / "outputs" / stage)
            groups_of = {dep: read_files(project, dep, trace) for dep in inputs[stage]}
            read = sum(len(files) for groups in groups_of.values() for files in groups.values())
            for dep, groups in groups_of.items():
                if not groups:
                    failures.append(f"{stage}: never opens anything under its dep {dep} (fuzz params: "
                                    f"{READ_EVERY_INPUT})")
                    continue
                pairs += 1
                for files in groups.values():
                    problems, runs = fuzz_files(project, server, stage, argv, dep, files, outputs, tmp_path / "stray",
                                                other_inputs=read > len(files))
                    failures, cases = failures + problems, cases + runs
        finally:
            server.close()
            stash(tmp_path / "outputs" / stage, outputs, project)
    with capsys.disabled():
        print(f"\nfuzz: {pairs} (stage, artifact input) pairs of dvc.yaml, {cases} corrupt-input runs, "
              f"{len(failures)} failures")
    assert pairs == sum(len(deps) for deps in inputs.values()) and not failures, "\n".join(failures)


def fuzz_files(project, server, stage, argv, dep, files, outputs, stray, other_inputs) -> tuple[list[str], int]:
    """Run the stage once per corruption of ``files`` (all at once): the problems found, the runs."""
    originals = {path: path.read_bytes() for path in files}
    problems, runs = [], 0
    for name, contents in corruptions_for(files, other_inputs):
        runs += 1
        for path, content in contents.items():
            if content is None:
                path.unlink()
            else:
                path.write_bytes(content)
        try:
            rc, stderr, _ = server.run(argv[3:])
        finally:
            for path, content in originals.items():
                path.write_bytes(content)
        problem = judge(stage, dep, rc, stderr, leftovers(project, outputs))
        if problem:
            problems.append(f"{stage} {files[0].relative_to(project)} ({name}): {problem}")
        stash(project, outputs, stray / f"{stage}-{server.count}")
    return problems, runs


def judge(stage: str, dep: str, rc: int, stderr: str, written: list[str]) -> str | None:
    lines = message_lines(stderr)
    if "Traceback" in stderr:
        return f"traceback (exit {rc}): {stderr.strip().splitlines()[-1]}"
    if rc != 2:
        return f"exit status {rc}, expected 2; stderr: {' | '.join(lines)[-300:]}"
    if len(lines) != 1 or not lines[0].startswith(f"{stage}: error: "):
        return f"expected one error line, got {lines}"
    if dep.rstrip("/") not in lines[0]:
        return f"the error does not name {dep}: {lines[0]}"
    if written:
        return f"outputs written: {written}"
    return None
