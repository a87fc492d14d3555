"""Run one stage's command many times without paying its imports each time.

``python tests/stage_server.py stages.<name>`` imports the stage module once,
then reads one JSON request per line on stdin: ``{"args": [...], "prefix":
"/path/run-1", "trace": false}``. For each it forks a child that runs the
stage's click command with those arguments exactly as ``python -m
stages.<name> ARGS`` would (an uncaught exception prints its traceback and
exits 1), with stdout and stderr in ``<prefix>.stdout`` / ``<prefix>.stderr``;
``trace``: the child also writes every file path it opened (Python's ``open``
audit event) to ``<prefix>.trace``, one per line. The server answers
``{"rc": <exit status>}`` per request. The parent of the children never runs
stage code (no thread pools before a fork).
"""
from __future__ import annotations

import importlib
import json
import os
import sys
import traceback


def run_child(module, request: dict) -> None:
    prefix = request["prefix"]
    for fd, suffix in ((1, ".stdout"), (2, ".stderr")):
        handle = os.open(prefix + suffix, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(handle, fd)
        os.close(handle)
    opened: list[str] = []
    if request.get("trace"):
        def record(event, args):
            if event == "open" and isinstance(args[0], (str, os.PathLike)):
                opened.append(os.path.abspath(os.fspath(args[0])))
        sys.addaudithook(record)
    code = 0
    try:
        module.main(args=request["args"], prog_name=f"python -m {module.__name__}", standalone_mode=True)
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException:  # noqa: BLE001 - what the interpreter does with an uncaught exception
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        if request.get("trace"):
            with open(prefix + ".trace", "w") as handle:
                handle.write("\n".join(sorted(set(opened))))
        os._exit(code)


def main() -> None:
    module = importlib.import_module(sys.argv[1])
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            run_child(module, request)
        _, status = os.waitpid(pid, 0)
        rc = os.waitstatus_to_exitcode(status)
        sys.stdout.write(json.dumps({"rc": rc}) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
