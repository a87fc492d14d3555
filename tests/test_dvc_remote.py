"""Sharing the DVC cache through a real remote: a WebDAV server (WsgiDAV on
cheroot, started here on loopback, basic authentication) receives ``dvc push``
from one clone; a fresh ``git clone`` pulls and ``dvc repro`` finds the graph
up to date instead of recomputing it."""
import subprocess
import threading
from pathlib import Path

import pytest

from mom import artifacts
from test_pipeline_e2e import project  # noqa: F401 (a fixture)
from tiny_pipeline import HAVE_FASHION, commit_run, dvc

wsgidav_app = pytest.importorskip(
    "wsgidav.wsgidav_app", reason="WebDAV server package wsgidav not installed (requirements.txt pins it)")
cheroot_wsgi = pytest.importorskip(
    "cheroot.wsgi", reason="HTTP server package cheroot not installed (requirements.txt pins it)")
pytest.importorskip("dvc_webdav", reason="DVC's WebDAV plugin dvc-webdav not installed (requirements.txt pins it)")

USER, PASSWORD = "alice", "not-a-secret"
GRAPH_OUTPUTS = ("data/graph/adjacency.npz", "data/graph/knn.parquet", "data/features/train.npy")


@pytest.fixture
def webdav_server(tmp_path_factory):
    """``(url, folder)`` of a WebDAV server on 127.0.0.1 storing into ``folder``."""
    folder = tmp_path_factory.mktemp("webdav")
    app = wsgidav_app.WsgiDAVApp({
        "provider_mapping": {"/dvc-cache": str(folder)},
        "simple_dc": {"user_mapping": {"*": {USER: {"password": PASSWORD}}}},
        "http_authenticator": {"accept_basic": True, "accept_digest": False, "default_to_digest": False},
        "dir_browser": {"enable": False},
        "verbose": 0,
        "logging": {"enable": False},
    })
    server = cheroot_wsgi.Server(("127.0.0.1", 0), app)
    server.prepare()  # binds, so the port is known
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    try:
        yield f"webdav://127.0.0.1:{server.bind_addr[1]}/dvc-cache", folder
    finally:
        server.stop()
        thread.join(timeout=10)


def git(folder, *args):
    command = ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid", *args]
    return subprocess.run(command, cwd=folder, check=True, capture_output=True, text=True).stdout


def use_remote_credentials(folder):
    """Credentials go to .dvc/config.local, which DVC's own .gitignore keeps out of git."""
    dvc(folder, "remote", "modify", "--local", "shared", "user", USER)
    dvc(folder, "remote", "modify", "--local", "shared", "password", PASSWORD)


def stored_objects(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if path.is_file()]


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_FASHION,
                    reason="Debian package dataset-fashion-mnist not installed (scripts/setup.sh installs it)")
def test_push_then_pull_into_a_fresh_clone_keeps_the_graph(project, webdav_server, tmp_path_factory):
    url, storage = webdav_server
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", "the project")
    assert "Running stage 'graph'" in dvc(project, "repro", "graph")
    dvc(project, "remote", "add", "--default", "shared", url)
    use_remote_credentials(project)
    assert PASSWORD not in (project / ".dvc" / "config").read_text()
    commit_run(project, "graph on tiny data")  # the README's git add after a run
    git(project, "add", ".dvc/config")
    git(project, "commit", "-q", "-m", "the shared remote")
    assert git(project, "status", "--porcelain") == ""
    assert "config.local" not in git(project, "ls-files", ".dvc")
    dvc(project, "push")
    assert len(stored_objects(storage)) >= len(GRAPH_OUTPUTS)

    clone = tmp_path_factory.mktemp("colleague") / "clone"
    git(clone.parent, "clone", "-q", str(project), str(clone))
    assert not (clone / GRAPH_OUTPUTS[0]).exists() and not (clone / ".dvc" / "cache").exists()
    with pytest.raises(AssertionError, match="401|nauthori"):  # the clone has no credentials yet
        dvc(clone, "pull", "--with-deps", "graph")
    use_remote_credentials(clone)
    dvc(clone, "pull", "--with-deps", "graph")
    for output in GRAPH_OUTPUTS:
        assert (clone / output).read_bytes() == (project / output).read_bytes(), output

    reproduced = dvc(clone, "repro", "graph")
    assert "Running stage" not in reproduced, reproduced
    assert "Stage 'graph' didn't change, skipping" in reproduced
    report = "data/graph/report.json"
    assert artifacts.load_json(clone / report) == artifacts.load_json(project / report)
