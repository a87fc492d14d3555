"""Run one stage's command many times without paying its imports each time.

``python tests/stage_server.py stages.<name>`` imports the stage module once,
then reads one JSON request per line on stdin: ``{"args": [...], "prefix":
"/path/run-1", "trace": false, "in_process": false}``. It runs the stage's
click command with those arguments as ``python -m stages.<name> ARGS`` would
(an uncaught exception prints its traceback and exits 1), with stdout and
stderr in ``<prefix>.stdout`` / ``<prefix>.stderr``, in a forked child, or with
``in_process`` in the server itself (the first, valid run: the modules it
imports lazily are then loaded once for every later child; the tests run with
one thread per library, so no thread pool is forked). ``trace``: every file
path the run opened (Python's ``open`` audit event) goes to ``<prefix>.trace``,
one per line. The server answers ``{"rc": <exit status>}`` per request.
"""
from __future__ import annotations

import importlib
import json
import os
import sys
import traceback


OPENED: list[str] = []
TRACING = False


def record_open(event, args):
    if TRACING and event == "open" and isinstance(args[0], (str, os.PathLike)):
        OPENED.append(os.path.abspath(os.fspath(args[0])))


def run_stage(module, request: dict) -> int:
    """The stage's command with stdout/stderr in the request's files: its exit status."""
    global TRACING
    prefix = request["prefix"]
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    for fd, suffix in ((1, ".stdout"), (2, ".stderr")):
        handle = os.open(prefix + suffix, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(handle, fd)
        os.close(handle)
    OPENED.clear()
    TRACING = bool(request.get("trace"))
    code = 0
    try:
        module.main(args=request["args"], prog_name=f"python -m {module.__name__}", standalone_mode=True)
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException:  # noqa: BLE001 - what the interpreter does with an uncaught exception
        traceback.print_exc()
        code = 1
    finally:
        TRACING = False
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
        if request.get("trace"):
            with open(prefix + ".trace", "w") as handle:
                handle.write("\n".join(sorted(set(OPENED))))
    return code


def main() -> None:
    module = importlib.import_module(sys.argv[1])
    sys.addaudithook(record_open)
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("in_process"):
            rc = run_stage(module, request)
        else:
            pid = os.fork()
            if pid == 0:
                os._exit(run_stage(module, request))
            _, status = os.waitpid(pid, 0)
            rc = os.waitstatus_to_exitcode(status)
        sys.stdout.write(json.dumps({"rc": rc}) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
