"""No network access at run time: every stage of the default pipeline
(tiny_pipeline.DEFAULT_TARGETS and upstream), run with the command line DVC
renders (tiny params), in subprocesses whose sockets refuse to reach
any host. A ``sitecustomize.py`` on PYTHONPATH patches ``socket`` at start-up
so that an attempt fails loudly *and* is recorded in a file, even when the
stage would have caught the error and carried on."""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import tiny_pipeline

SITECUSTOMIZE = textwrap.dedent('''
    """Test harness: refuse and record every attempt to reach a host."""
    import os
    import socket
    import traceback

    _LOG = os.environ["NO_NETWORK_LOG"]
    _INTERNET = (socket.AF_INET, socket.AF_INET6)


    def _refuse(what):
        with open(_LOG, "a") as handle:
            handle.write(f"{what}\\n{''.join(traceback.format_stack(limit=8))}\\n")
        raise OSError(f"network disabled by the no-network test: {what}")


    def _resolve(host, *args, **kwargs):
        _refuse(f"getaddrinfo({host!r})")


    def _guard(name):
        original = getattr(socket.socket, name)

        def guarded(self, *args, **kwargs):
            if self.family in _INTERNET:
                _refuse(f"socket.{name}{args!r}")
            return original(self, *args, **kwargs)  # unix sockets are local

        setattr(socket.socket, name, guarded)


    for _name in ("connect", "connect_ex", "sendto"):
        _guard(_name)
    socket.getaddrinfo = _resolve
    socket.gethostbyname = _resolve
''')


@pytest.fixture
def offline(tmp_path):
    """(folder to put first on PYTHONPATH, log file of attempts)."""
    folder = tmp_path / "offline"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return folder, tmp_path / "attempts.log"


def offline_env(project, offline):
    folder, log = offline
    env = tiny_pipeline.environment(project, NO_NETWORK_LOG=str(log))
    env["PYTHONPATH"] = f"{folder}:{project}"
    return env


def test_the_patch_refuses_and_records(offline, tmp_path):
    """The harness can fail: a download attempt is refused and logged."""
    script = ("import urllib.request\n"
              "try:\n    urllib.request.urlopen('http://example.com', timeout=5)\nexcept OSError as e:\n"
              "    print('refused', e)\n")
    result = subprocess.run([sys.executable, "-c", script], env=offline_env(tmp_path, offline),
                            capture_output=True, text=True, timeout=60)
    assert "refused" in result.stdout, result.stderr
    assert "getaddrinfo('example.com')" in offline[1].read_text()


@pytest.mark.slow
@pytest.mark.skipif(not tiny_pipeline.HAVE_FASHION, reason="Debian package dataset-fashion-mnist not installed")
def test_every_stage_runs_without_network(tmp_path, offline):
    project = tiny_pipeline.make_project(tmp_path / "project")
    commands = tiny_pipeline.stage_commands(project)
    assert set(commands) >= set(tiny_pipeline.MINING_STAGES) | {"finetune", "whiten", "evaluate"}
    env = offline_env(project, offline)
    for stage, argv in commands.items():
        tiny_pipeline.run_stage(project, argv, env=env)
        log = offline[1]
        assert not log.exists(), f"{stage} tried to reach the network:\n{log.read_text()}"
    outputs = tiny_pipeline.stage_outputs(project)
    for stage in commands:
        for path in outputs[stage]:
            assert (project / path).exists(), f"{stage} did not write {path}"
