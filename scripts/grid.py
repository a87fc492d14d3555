"""Run the Table 1 grid (ablations/dvc.yaml) with several cells at once.

`dvc repro` runs one stage at a time, and a grid cell's stages use about one core
(small convolutions, numpy), so on a machine with c cores the grid's 39 cells would
take c times longer than they need. This runs what `dvc repro ablations/dvc.yaml`
would run, in the same order within a cell, and leaves DVC in the same state:

1. `dvc repro --dry --force` renders every stage's command;
2. the stages the cells read (the main pipeline's, grid_anchors, grid_diffuse) run
   through `dvc repro`; then `dvc status` says which cell stages changed (a changed
   stage's downstream stages in its cell run too);
3. the cells run in lanes, one cell's stages after each other, each lane pinned to
   its own core (so torch and faiss use one thread, as in a serial run's numbers),
   the longest cells first (by their last full run, recorded in <log-dir>/seconds.json;
   cells never timed go first), so that the lanes finish close together;
4. `dvc commit` records each stage that succeeded in dvc.lock, as `dvc repro` would,
   a cell as soon as it finishes (while the other lanes run);
5. `dvc repro` runs what is left (report, pool_figure).

A cell that fails stops only its own later stages: the others finish and are
committed, and the script exits 1 naming the failed cells and their logs
(logs/grid/<cell>.log). Ctrl-C stops every lane and commits what finished; run it
again to do the rest. Run it with the grid visible to DVC:
`bash scripts/repro.sh ablations/dvc.yaml [--jobs N]` does.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from queue import Queue

GRID_FILE = "ablations/dvc.yaml"
# A cell's stages, in the order they run (ablations/dvc.yaml).
CELL_STAGES = ("grid_mine", "grid_finetune", "grid_whiten", "grid_evaluate", "grid_proxy")
CELL_STAGE = re.compile(r"(?:.*:)?(?P<stage>" + "|".join(CELL_STAGES) + r")@(?P<cell>row\d+-\d+)$")
# Stages of the grid file that read the cells' outputs: they run last, through dvc repro.
AFTER_CELLS = ("report", "pool_figure")
SECONDS_FILE = "seconds.json"  # in --log-dir: each cell's last full run, for the order of the next run
CELL_MEMORY = 3 * 2 ** 30  # peak resident memory of one cell (finetune, 64 px): 2.7 GB measured


@dataclass
class Cell:
    name: str                 # row<i>-<seed>
    stages: list[tuple[str, str]] = field(default_factory=list)  # (stage, command) in run order
    done: list[str] = field(default_factory=list)
    recorded: int = 0         # how many of ``done`` dvc commit recorded
    failed: str | None = None
    seconds: float = 0.0


def dvc(*args: str, capture: bool = False) -> str:
    command = [sys.executable, "-m", "dvc", *args]
    if capture:
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode:
            sys.exit(f"grid: `dvc {' '.join(args)}` failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
        return result.stdout
    if subprocess.run(command).returncode:
        sys.exit(f"grid: `dvc {' '.join(args)}` failed (its output is above)")
    return ""


def pipeline_stages(targets: list[str]) -> list[tuple[str, str]]:
    """``(stage, command)`` of every stage of ``targets``' pipelines, in DVC's order
    (a forced dry run: it renders the commands and runs nothing; without --force a
    dry run stops at the first dependency that does not exist yet)."""
    stages, stage = [], None
    for line in dvc("repro", "--dry", "--force", *targets, capture=True).splitlines():
        if line.startswith("Running stage '"):
            stage = line.split("'")[1]
            stages.append((stage, ""))
        elif line.startswith("> ") and stages and stages[-1] == (stage, ""):
            stages[-1] = (stage, line[2:])
    return stages


def split_stages(stages: list[tuple[str, str]]) -> tuple[list[str], dict[str, Cell], list[str]]:
    """``(before, cells, after)``: the stages the cells read, the cells' stages by cell,
    the stages that read the cells."""
    before, after, cells = [], [], {}
    for stage, command in stages:
        match = CELL_STAGE.match(stage)
        if match:
            cells.setdefault(match["cell"], Cell(match["cell"])).stages.append((stage, command))
        elif stage.split(":")[-1].split("@")[0] in AFTER_CELLS:
            after.append(stage)
        else:
            before.append(stage)
    for cell in cells.values():
        cell.stages.sort(key=lambda entry: CELL_STAGES.index(cell_stage(entry[0])))
    return before, cells, after


def cell_stage(stage: str) -> str:
    return CELL_STAGE.match(stage)["stage"]


def stages_to_run(cell: Cell, changed: set[str]) -> list[tuple[str, str]]:
    """The cell's changed stages and every stage of the cell downstream of one:
    mine -> finetune -> whiten -> (evaluate, proxy); evaluate and proxy read
    finetune's and whiten's outputs, not each other's."""
    kinds = {cell_stage(stage) for stage, _ in cell.stages if stage in changed}
    for upstream, downstream in zip(CELL_STAGES[:3], CELL_STAGES[1:4]):
        if upstream in kinds:
            kinds.add(downstream)
    if "grid_whiten" in kinds:
        kinds.add("grid_proxy")
    return [(stage, command) for stage, command in cell.stages if cell_stage(stage) in kinds]


def changed_stages(targets: list[str]) -> set[str]:
    """Stages `dvc status` finds changed (deps, outs, params, command, or never run)."""
    return set(json.loads(dvc("status", "--json", *targets, capture=True) or "{}"))


def default_jobs() -> int:
    """One lane per core, at most one per CELL_MEMORY of available memory."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        meminfo = Path("/proc/meminfo").read_text()
        available = int(re.search(r"MemAvailable:\s+(\d+) kB", meminfo)[1]) * 1024
    except (OSError, TypeError):
        return cores
    return max(1, min(cores, available // CELL_MEMORY))


# Runs a shell command pinned to one core: the affinity is set before the shell starts,
# so every process of the stage inherits it (preexec_fn is unsafe with threads).
PINNED = "import os, sys; os.sched_setaffinity(0, {int(sys.argv[1])}); os.execvp('sh', ['sh', '-c', sys.argv[2]])"
stopping = threading.Event()


def run_cell(cell: Cell, cores: Queue, log_dir: Path) -> Cell:
    """Run the cell's stages in order on one core taken from ``cores``; stop at the first failure."""
    core = cores.get()
    started = time.perf_counter()
    try:
        with open(log_dir / f"{cell.name}.log", "w") as log:
            for stage, command in cell.stages:
                if stopping.is_set():
                    break
                log.write(f"$ {command}\n")
                log.flush()
                argv = ["sh", "-c", command] if core is None else [sys.executable, "-c", PINNED, str(core), command]
                if subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT).returncode:
                    cell.failed = stage
                    break
                cell.done.append(stage)
    finally:
        cell.seconds = time.perf_counter() - started
        cores.put(core)
    return cell


def cell_order(cell: Cell) -> list[int]:
    return [int(part) for part in cell.name[3:].split("-")]


def longest_first(cells: list[Cell], seconds: dict[str, float]) -> list[Cell]:
    """``cells`` with the never-timed ones first (their cost is unknown), then the
    others by their recorded duration, longest first; ties in row and seed order."""
    def key(cell: Cell):
        recorded = seconds.get(cell.name)
        return (recorded is not None, -(recorded or 0.0), cell_order(cell))
    return sorted(cells, key=key)


def read_seconds(path: Path) -> dict[str, float]:
    try:
        seconds = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {name: float(value) for name, value in seconds.items() if isinstance(value, (int, float))} \
        if isinstance(seconds, dict) else {}


def save_seconds(path: Path, cell: Cell) -> None:
    """Record the duration of a cell that ran all its stages (a partial rerun's would mislead the order)."""
    if cell.failed or len(cell.done) != len(CELL_STAGES):
        return
    seconds = read_seconds(path)
    seconds[cell.name] = round(cell.seconds, 1)
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(seconds, indent=1, sort_keys=True))
    os.replace(partial, path)


def record(cell: Cell) -> None:
    """`dvc commit` the cell's finished stages not yet recorded (a cell's stages are
    committed together: one DVC call per cell rather than per stage)."""
    stages = cell.done[cell.recorded:]
    if stages:
        dvc("commit", "--force", "--quiet", *stages)
        cell.recorded = len(cell.done)


def run_cells(cells: list[Cell], jobs: int, log_dir: Path) -> None:
    """Run ``cells`` ``jobs`` at once; on Ctrl-C (which reaches the running stages too:
    they leave no partial outputs) start nothing more and re-raise."""
    log_dir.mkdir(parents=True, exist_ok=True)
    available = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_setaffinity") else []
    cores: Queue = Queue()
    for lane in range(jobs):
        cores.put(available[lane] if len(available) >= jobs else None)
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(run_cell, cell, cores, log_dir) for cell in cells]
        try:
            for finished, future in enumerate(as_completed(futures), 1):
                cell = future.result()
                status = f"FAILED at {cell.failed} (log: {log_dir / cell.name}.log)" if cell.failed else "done"
                print(f"grid: [{finished}/{len(cells)}] {cell.name} {status} in {cell.seconds:.0f} s "
                      f"({time.perf_counter() - started:.0f} s since the cells started)", flush=True)
                record(cell)
                save_seconds(log_dir / SECONDS_FILE, cell)
        except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or a dvc commit that failed
            stopping.set()
            for future in futures:
                future.cancel()
            raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("targets", nargs="*", default=[GRID_FILE], help=f"dvc repro targets (default {GRID_FILE})")
    parser.add_argument("--jobs", "-j", type=int, default=0,
                        help="cells at once (default: one per core, at most one per 3 GiB of free memory)")
    parser.add_argument("--log-dir", default="logs/grid", help="one log per cell")
    options = parser.parse_args(argv)
    if options.jobs < 0:
        parser.error("--jobs: 0 (one per core) or more")
    jobs = options.jobs or default_jobs()
    started = time.perf_counter()
    before, cells, after = split_stages(pipeline_stages(options.targets))
    if before:
        print(f"grid: the {len(before)} stages the cells read, through dvc repro (those up to date are skipped)",
              flush=True)
        dvc("repro", *before)
    changed = changed_stages(options.targets)
    todo = []
    for cell in cells.values():
        cell.stages = stages_to_run(cell, changed)
        if cell.stages:
            todo.append(cell)
    todo = longest_first(todo, read_seconds(Path(options.log_dir) / SECONDS_FILE))
    print(f"grid: {len(todo)} cells to run ({sum(len(c.stages) for c in todo)} stages), {jobs} at once", flush=True)
    interrupted = False
    try:
        run_cells(todo, jobs, Path(options.log_dir))
    except KeyboardInterrupt:
        interrupted = True
    left = [stage for cell in todo for stage in cell.done[cell.recorded:]]  # cells cut off by Ctrl-C
    if left:
        dvc("commit", "--force", "--quiet", *left)
    print(f"grid: recorded {sum(len(cell.done) for cell in todo)} stages in dvc.lock", flush=True)
    if interrupted:
        print("grid: interrupted; run it again to do the rest", file=sys.stderr)
        return 130
    failed = [cell for cell in todo if cell.failed]
    if failed:
        print("grid: failed cells (the others are recorded): " + ", ".join(
            f"{cell.name} at {cell.failed.split(':')[-1]} ({Path(options.log_dir) / cell.name}.log)" for cell in failed),
            file=sys.stderr)
        return 1
    if after:
        dvc("repro", *options.targets)
    print(f"grid: finished in {time.perf_counter() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
