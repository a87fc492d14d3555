"""Run the revisited ground-truth loader on untrusted files, each in its own
forked child process, and report how each child ended (used by
tests/test_attack_suite.py).

    python -m tests.crash_runner FILE...

prints a JSON list of ``{"path", "status", "stderr"}``: ``status`` is the
child's exit code (0 loaded, 2 refused with an InputError printed as one line,
1 any other exception) or minus the signal that killed it (a crash, or
SIGALRM after TIME_LIMIT_S). Forking from one process that has imported the
loader keeps hundreds of cases fast; a crash still only kills its child.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from pathlib import Path

from mom.datasets.revisited import parse_ground_truth
from mom.errors import InputError

TIME_LIMIT_S = 20


def load_in_child(path: str) -> int:
    signal.alarm(TIME_LIMIT_S)
    try:
        parse_ground_truth(Path(path))
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except BaseException:  # noqa: BLE001 - reported to the test as status 1
        traceback.print_exc()
        return 1
    return 0


def run_case(path: str) -> dict:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        os.dup2(write_end, 2)
        code = load_in_child(path)
        sys.stderr.flush()
        os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, encoding="utf-8", errors="replace") as pipe:
        stderr = pipe.read()
    _, status = os.waitpid(pid, 0)
    return {"path": path, "status": os.waitstatus_to_exitcode(status), "stderr": stderr}


if __name__ == "__main__":
    print(json.dumps([run_case(path) for path in sys.argv[1:]]))
