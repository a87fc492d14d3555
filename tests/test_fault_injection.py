"""Kill a stage (SIGKILL: no handler, no cleanup) and check that nothing
half-written is left, then that a rerun gives the outputs of an uninterrupted
run (issue 8, "Fault injection").

Tiny data (tests/tiny_pipeline.py), the commands DVC renders from dvc.yaml.
Two kinds of kill per stage, each from a state without the stage's outputs:
- at random moments (seeded) within its measured run time: most land in
  imports or computation;
- at chosen commits: a ``sitecustomize.py`` on PYTHONPATH wraps ``os.replace``
  so that the n-th rename of a ``.tmp-`` file (the atomic writers' publish
  step, mom/artifacts/files.py) logs its destination and pauses; the test kills the
  stage there, with the temporary file complete and the destination not yet
  renamed: the worst moment for a writer that is not atomic.
After every kill each declared output is absent or complete and equal to the
uninterrupted run's (bytes; JSON metrics: content apart from the run times
they record); only ``.tmp-*`` files may be extra. Every output file must be
published by such a rename (none written in place). The rerun starts from the
last kill's state, as a user's ``dvc repro`` would, and must leave no
``.tmp-`` file behind (they would sit inside DVC directory outputs).
The later stages (finetune, whiten, evaluate, proxy_retrieval) build a
network and write only at their end: a few seconds of imports and extraction
each, so fewer kills (``KILLS``): finetune at a random moment and at its last
commit, the others at their last commit (every other output published, the
last complete in its temporary file). Killed at its last commit, finetune has
saved its epoch checkpoint (``checkpoints/finetune``, outside the outputs): the
rerun must resume from it (not retrain) and still give the uninterrupted
run's bytes. Multi-epoch kill-and-resume is tested in
tests/test_finetune_stage.py.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import textwrap
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

import tiny_pipeline
from mom import artifacts

LATER_STAGES = ("finetune", "whiten", "evaluate", "proxy_retrieval")
# Per stage: random kills, and which commits to kill at ("first", "last").
KILLS = {**{stage: (1, ("first", "last")) for stage in tiny_pipeline.MINING_STAGES},
         "finetune": (1, ("last",)), **{stage: (0, ("last",)) for stage in LATER_STAGES[1:]}}
STAGES = (*tiny_pipeline.MINING_STAGES, *LATER_STAGES)
CHECKPOINTS = "checkpoints"  # finetune's resume state, outside the outputs (dvc.yaml)
SITECUSTOMIZE = textwrap.dedent('''
    """Test harness: log every publish of an atomic write; pause at the n-th."""
    import os
    import time

    _LOG = os.environ["FAULT_COMMIT_LOG"]
    _PAUSE_AT = int(os.environ.get("FAULT_PAUSE_AT_COMMIT", "0"))
    _replace = os.replace
    _count = 0


    def replace(source, destination, *args, **kwargs):
        global _count
        if os.path.basename(os.fsdecode(source)).startswith(".tmp-"):
            _count += 1
            with open(_LOG, "a") as handle:
                handle.write(f"{_count}\\t{os.path.abspath(os.fsdecode(destination))}\\n")
            if _count == _PAUSE_AT:
                time.sleep(120)
        return _replace(source, destination, *args, **kwargs)


    os.replace = replace
''')
TIMING_KEY = re.compile(r"seconds|per_second|elapsed")


def is_temporary(relative: str) -> bool:
    return Path(relative).name.startswith(".tmp-")


def without_timings(value):
    if isinstance(value, dict):
        return {key: without_timings(item) for key, item in value.items() if not TIMING_KEY.search(key)}
    if isinstance(value, list):
        return [without_timings(item) for item in value]
    return value


def comparable(relative: str, data: bytes):
    """The bytes; for JSON (metrics record run times; DVC does not cache them)
    the parsed content without timings: a half-written JSON fails to parse."""
    return without_timings(json.loads(data)) if relative.endswith(".json") else data


def comparable_outputs(files: dict[str, bytes]) -> dict:
    return {path: comparable(path, data) for path, data in files.items() if not is_temporary(path)}


def test_a_successful_write_removes_temporaries_of_killed_writes(tmp_path):
    (tmp_path / ".tmp-a.json-killed1").write_text("{")
    (tmp_path / ".tmp-b.json-other").write_text("{")
    artifacts.save_json(tmp_path / "a.json", {"x": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-b.json-other", "a.json"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The project after an uninterrupted run of the default pipeline (every
    stage of dvc.yaml, in run order): commands, outputs (bytes), run time and
    atomic commits per stage."""
    folder = tmp_path_factory.mktemp("faults")
    project = tiny_pipeline.make_project(folder / "project")
    (folder / "hook").mkdir()
    (folder / "hook" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    commands = tiny_pipeline.stage_commands(project)
    declared = tiny_pipeline.stage_outputs(project)
    outputs, seconds, commits = {}, {}, {}
    for stage in commands:  # run order
        log = folder / f"{stage}.commits"
        start = time.perf_counter()
        tiny_pipeline.run_stage(project, commands[stage], env=hooked_env(project, folder / "hook", log))
        seconds[stage] = time.perf_counter() - start
        commits[stage] = log.read_text().splitlines()
        outputs[stage] = tiny_pipeline.output_files(project, declared[stage])
        assert outputs[stage] and not any(map(is_temporary, outputs[stage]))
    return dict(project=project, hook=folder / "hook", commands=commands, declared=declared, outputs=outputs,
                seconds=seconds, commits=commits)


def hooked_env(project: Path, hook: Path, log: Path, pause_at: int = 0) -> dict:
    env = tiny_pipeline.environment(project, FAULT_COMMIT_LOG=str(log), FAULT_PAUSE_AT_COMMIT=str(pause_at))
    env["PYTHONPATH"] = f"{hook}:{project}"
    return env


def remove_outputs(project: Path, paths: list[str]) -> None:
    """A state without the stage's outputs (and without finetune's resume
    state: a fresh run)."""
    for relative in tiny_pipeline.output_files(project, paths):
        (project / relative).unlink()
    shutil.rmtree(project / CHECKPOINTS, ignore_errors=True)


def kill_group(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGKILL)  # the stage and any decoding workers it forked
    process.wait()


def start(project: Path, argv: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(argv, cwd=project, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def kill_after(project: Path, argv: list[str], env: dict, delay: float) -> bool:
    """True when the kill landed before the stage finished."""
    process = start(project, argv, env)
    try:
        process.wait(timeout=delay)
        return False
    except subprocess.TimeoutExpired:
        kill_group(process)
        return True


def kill_at_commit(project: Path, argv: list[str], env: dict, log: Path, number: int) -> str:
    """Kill the stage paused at its ``number``-th publish; return that destination."""
    process = start(project, argv, env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        lines = log.read_text().splitlines() if log.exists() else []
        if len(lines) >= number:
            time.sleep(0.05)  # inside the pause
            kill_group(process)
            return lines[number - 1].split("\t")[1]
        time.sleep(0.02)
    kill_group(process) if process.poll() is None else None
    raise AssertionError(f"{argv[2]} never reached commit {number} (exit {process.returncode})")


def check_nothing_half_written(found: dict[str, bytes], expected: dict[str, bytes], when: str) -> None:
    for relative, data in found.items():
        if is_temporary(relative):
            continue
        assert relative in expected, f"{when}: unexpected file {relative}"
        assert comparable(relative, data) == comparable(relative, expected[relative]), \
            f"{when}: {relative} differs from the uninterrupted run (half-written?)"


@pytest.mark.slow
@pytest.mark.skipif(not tiny_pipeline.HAVE_FASHION, reason="dataset-fashion-mnist not installed")
@pytest.mark.parametrize("stage", STAGES)
def test_killed_stage_leaves_no_half_written_output_and_reruns_identically(reference, stage, tmp_path):
    project, argv, declared = reference["project"], reference["commands"][stage], reference["declared"][stage]
    expected, seconds = reference["outputs"][stage], reference["seconds"][stage]
    rng = np.random.default_rng(zlib.crc32(stage.encode()))
    random_kills, commit_kills = KILLS[stage]
    leftovers = set()

    for delay in sorted(rng.uniform(0.2, 1.0, random_kills) * seconds):
        remove_outputs(project, declared)
        killed = kill_after(project, argv, tiny_pipeline.environment(project), delay)
        found = tiny_pipeline.output_files(project, declared)
        check_nothing_half_written(found, expected, f"{stage} killed after {delay:.2f} of {seconds:.2f} s")
        if not killed:
            assert comparable_outputs(found) == comparable_outputs(expected)
        leftovers |= {path for path in found if is_temporary(path)}

    published = {line.split("\t")[1] for line in reference["commits"][stage]}
    direct = [path for path in expected if str(project / path) not in published]
    assert direct == [], f"{stage}: written without an atomic rename: {direct}"
    commits = len(reference["commits"][stage])
    for number in sorted({dict(first=1, last=commits)[which] for which in commit_kills}):
        remove_outputs(project, declared)
        log = tmp_path / f"commits-{number}"
        destination = kill_at_commit(project, argv, hooked_env(project, reference["hook"], log, number), log, number)
        found = tiny_pipeline.output_files(project, declared)
        when = f"{stage} killed at commit {number}/{commits} ({Path(destination).name})"
        check_nothing_half_written(found, expected, when)
        assert not Path(destination).exists(), f"{when}: the destination exists before its rename"
        temporaries = {path for path in found if is_temporary(path)}
        assert temporaries, f"{when}: no temporary file of the write in progress"
        leftovers |= temporaries

    checkpoints = sorted((project / CHECKPOINTS).rglob("*.pt"))  # finetune: its epoch was saved
    rerun = tiny_pipeline.run_stage(project, argv)  # from the last kill's state
    if stage == "finetune":
        assert checkpoints, "finetune killed at its last commit without an epoch checkpoint"
        assert "resuming after epoch 1 of 1" in rerun.stderr, rerun.stderr[-2000:]
        assert not list((project / CHECKPOINTS).rglob("*.pt")), "finetune kept its checkpoint after finishing"
    after = tiny_pipeline.output_files(project, declared)
    assert comparable_outputs(after) == comparable_outputs(expected), f"{stage}: the rerun differs"
    assert not [path for path in after if is_temporary(path)], f"{stage}: the rerun left temporaries"
    print(f"\n{stage}: {seconds:.2f} s, {commits} atomic commits; temporaries left by kills: {sorted(leftovers)}")


@pytest.mark.slow
@pytest.mark.skipif(not tiny_pipeline.HAVE_FASHION, reason="dataset-fashion-mnist not installed")
def test_dvc_sees_a_killed_stage_as_changed_and_repro_restores_it(reference, tmp_path):
    """The DVC view: after a kill between two outputs of ``graph``, ``dvc status``
    names the stage (and nothing downstream yet); rerunning it gives outputs
    with the locked hashes, so the whole mining pipeline is up to date."""
    project, declared = reference["project"], reference["declared"]["graph"]
    tiny_pipeline.dvc(project, "commit", "--force", "--with-deps", "mine")  # lock the reference outputs
    assert "up to date" in tiny_pipeline.dvc(project, "status", "--with-deps", "mine")
    remove_outputs(project, declared)
    log = tmp_path / "commits"
    kill_at_commit(project, reference["commands"]["graph"], hooked_env(project, reference["hook"], log, 2), log, 2)
    status = tiny_pipeline.dvc(project, "status", "--with-deps", "mine")
    assert "graph:" in status and "anchors:" not in status, status
    # Plain `dvc repro` would check the outputs out of the cache (deps unchanged): force the rerun.
    output = tiny_pipeline.dvc(project, "repro", "--force", "graph")
    assert "Running stage 'graph'" in output, output
    assert "up to date" in tiny_pipeline.dvc(project, "status", "--with-deps", "mine"), "rerun outputs differ"
    after = tiny_pipeline.output_files(project, declared)
    assert comparable_outputs(after) == comparable_outputs(reference["outputs"]["graph"])
    assert not [path for path in after if is_temporary(path)]
