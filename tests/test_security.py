"""Static security checks over the repository (issue 8, "Security").

Python files are parsed with ``ast`` so that the checks look at real calls and
their keyword arguments, not at text that merely looks like one (docstrings,
comments, ``model.eval()``). Each checker is also run on known-bad snippets,
so a checker that silently matches nothing fails its own test.

Rules:
- ``torch.load`` only with ``weights_only=True`` (a literal ``True``).
- No unpickling outside ``mom/safe_pickle.py``: ``pickle.load(s)``,
  ``pickle.Unpickler``, ``dill``/``cloudpickle``/``joblib.load``,
  ``pandas.read_pickle``, ``np.load(..., allow_pickle=<anything but False>)``.
- ``yaml.load`` only with ``Loader=yaml.SafeLoader``/``CSafeLoader``; no
  ``yaml.unsafe_load``/``full_load``.
- No ``eval``/``exec``/``compile`` builtins, no ``os.system``, no
  ``subprocess`` with ``shell=True``.
- Download addresses in ``mom/`` and ``stages/`` use https (listed exceptions).
- No credentials in tracked files; ``.dvc/config`` holds no secrets and
  ``.dvc/config.local`` (where DVC remote credentials go) is git-ignored.
"""
from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESTRICTED_LOADER = "mom/safe_pickle.py"

# (file, finding) pairs that are allowed, with the reason. Keep short.
ALLOWED = {
    ("tests/test_imagestore.py", "pickle.loads"): "round-trips an ImageStore the test itself pickled",
    ("tests/test_safe_pickle.py", "pickle.loads"): "the reference for the decoder, on data the test itself pickled",
}
# Plain-http addresses that have no https counterpart (none at present; every
# download is also checked against a SHA-256, see mom/datasets/download.py).
HTTP_ALLOWED: dict[str, str] = {}


def repository_files() -> list[str]:
    """Tracked files plus new ones git does not ignore (work in progress counts)."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    return sorted(path for path in set(listed) if (ROOT / path).is_file())


def python_files() -> list[str]:
    return [path for path in repository_files() if path.endswith(".py")]


def dotted(node: ast.AST) -> str:
    """``a.b.c`` for a name/attribute chain, '' otherwise."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def import_aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> full dotted name for every import (``np`` -> ``numpy``,
    ``load`` -> ``torch.load`` after ``from torch import load``)."""
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                aliases[alias.asname or top] = alias.name if alias.asname else top
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return aliases


def qualified(node: ast.AST, aliases: dict[str, str]) -> str:
    name = dotted(node)
    if not name:
        return ""
    head, _, rest = name.partition(".")
    head = aliases.get(head, head)
    return f"{head}.{rest}" if rest else head


def keyword(call: ast.Call, name: str):
    """The keyword's value node, or None when absent."""
    return next((kw.value for kw in call.keywords if kw.arg == name), None)


def is_literal(node, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


UNPICKLERS = {"pickle.load", "pickle.loads", "pickle.Unpickler", "_pickle.load", "_pickle.loads",
              "dill.load", "dill.loads", "cloudpickle.load", "cloudpickle.loads", "joblib.load",
              "pandas.read_pickle", "shelve.open", "marshal.load", "marshal.loads"}
NUMPY_LOADS = {"numpy.load"}
SAFE_YAML_LOADERS = {"yaml.SafeLoader", "yaml.CSafeLoader"}


def findings(source: str, path: str = "<snippet>") -> list[str]:
    """Every rule violation in ``source`` as ``'rule (line N)'``."""
    tree = ast.parse(source, filename=path)
    aliases = import_aliases(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            found.extend(f"{rule} (line {node.lineno})" for rule in _call_findings(node, aliases, path))
        elif isinstance(node, ast.ClassDef) and path != RESTRICTED_LOADER:
            bases = {qualified(base, aliases) for base in node.bases}
            if bases & {"pickle.Unpickler", "_pickle.Unpickler"}:
                found.append(f"pickle.Unpickler (line {node.lineno})")
    return found


def _call_findings(call: ast.Call, aliases: dict[str, str], path: str) -> list[str]:
    name = qualified(call.func, aliases)
    found = []
    if name == "torch.load" and not is_literal(keyword(call, "weights_only"), True):
        found.append("torch.load without weights_only=True")
    if name in UNPICKLERS and path != RESTRICTED_LOADER:
        found.append(name)
    if name in NUMPY_LOADS:
        allow = keyword(call, "allow_pickle")
        if allow is not None and not is_literal(allow, False):
            found.append("numpy.load with allow_pickle")
    if name == "yaml.load":
        loader = keyword(call, "Loader")
        loader = loader if loader is not None else (call.args[1] if len(call.args) > 1 else None)
        if loader is None or qualified(loader, aliases) not in SAFE_YAML_LOADERS:
            found.append("yaml.load without SafeLoader")
    if name in ("yaml.unsafe_load", "yaml.full_load"):
        found.append(name)
    if isinstance(call.func, ast.Name) and call.func.id in ("eval", "exec", "compile", "__import__"):
        found.append(f"builtin {call.func.id}")
    if name in ("os.system", "os.popen"):
        found.append(name)
    if name.startswith("subprocess.") and is_literal(keyword(call, "shell"), True):
        found.append(f"{name} with shell=True")
    return found


# --- the checkers can fail -------------------------------------------------

BAD_SNIPPETS = {
    "import torch\ntorch.load('m.pt')\n": "torch.load without weights_only=True",
    "import torch\ntorch.load('m.pt', weights_only=False)\n": "torch.load without weights_only=True",
    "from torch import load as L\nL('m.pt', weights_only=flag)\n": "torch.load without weights_only=True",
    "import pickle\npickle.loads(b'')\n": "pickle.loads",
    "from pickle import load\nload(open('f', 'rb'))\n": "pickle.load",
    "import pickle\nclass U(pickle.Unpickler):\n    pass\n": "pickle.Unpickler",
    "import joblib\njoblib.load('f')\n": "joblib.load",
    "import pandas as pd\npd.read_pickle('f')\n": "pandas.read_pickle",
    "import numpy as np\nnp.load('f.npy', allow_pickle=True)\n": "numpy.load with allow_pickle",
    "import numpy\nnumpy.load('f.npy', allow_pickle=flag)\n": "numpy.load with allow_pickle",
    "import yaml\nyaml.load(text)\n": "yaml.load without SafeLoader",
    "import yaml\nyaml.load(text, Loader=yaml.Loader)\n": "yaml.load without SafeLoader",
    "import yaml\nyaml.unsafe_load(text)\n": "yaml.unsafe_load",
    "eval(row['expr'])\n": "builtin eval",
    "exec(code)\n": "builtin exec",
    "import os\nos.system('ls')\n": "os.system",
    "import subprocess\nsubprocess.run(cmd, shell=True)\n": "subprocess.run with shell=True",
}
GOOD_SNIPPET = """
import numpy as np, torch, yaml
torch.load('m.pt', map_location='cpu', weights_only=True)
np.load('f.npy', allow_pickle=False)
np.load('f.npy', mmap_mode='r')
yaml.load(text, Loader=yaml.SafeLoader)
yaml.safe_load(text)
net.eval()
"pickle.loads(x) in a string is not a call"
"""


@pytest.mark.parametrize("snippet, rule", list(BAD_SNIPPETS.items()))
def test_checker_catches_known_bad_code(snippet, rule):
    assert any(finding.startswith(rule) for finding in findings(snippet)), findings(snippet)


def test_checker_passes_safe_code():
    assert findings(GOOD_SNIPPET) == []


# --- the repository --------------------------------------------------------

def test_python_files_follow_the_loading_and_execution_rules():
    files = python_files()
    assert {"mom/safe_pickle.py", "mom/networks.py", "stages/prepare.py"} <= set(files)
    violations = []
    for path in files:
        for finding in findings((ROOT / path).read_text(encoding="utf-8"), path):
            if (path, finding.split(" (line")[0]) not in ALLOWED:
                violations.append(f"{path}: {finding}")
    assert violations == [], "\n".join(violations)


def test_download_addresses_use_https():
    plain = []
    for path in python_files():
        if not path.startswith(("mom/", "stages/")):
            continue
        for node in ast.walk(ast.parse((ROOT / path).read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                for url in re.findall(r"http://\S+", node.value):
                    if url not in HTTP_ALLOWED:
                        plain.append(f"{path}:{node.lineno}: {url}")
    assert plain == [], "\n".join(plain)


CREDENTIAL_PATTERNS = {
    "AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "AWS secret key assignment": re.compile(r"aws_secret_access_key\s*[=:]\s*\S{20,}", re.I),
    "private key": re.compile(r"-----BEGIN (RSA |EC |DSA |OPENSSH |ENCRYPTED )?PRIVATE KEY-----"),
    "GitHub token": re.compile(r"\b(ghp|gho|ghs|ghu|github_pat)_[A-Za-z0-9_]{30,}"),
    "Slack token": re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}"),
    "Google API key": re.compile(r"\bAIza[0-9A-Za-z_-]{35}\b"),
    "password in a URL": re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@'\"]+:[^/\s@'\"{}]+@", re.I),
}
# DVC remote options that carry secrets: they belong in .dvc/config.local.
DVC_SECRET_KEYS = re.compile(
    r"^\s*(password|secret_access_key|access_key_id|session_token|token|ask_password|key_file|keyfile|"
    r"gdrive_client_secret|gdrive_service_account_json_file_path|connection_string|account_key|sas_token|"
    r"credentialpath)\s*=", re.I | re.M)


def credential_findings(text: str) -> list[str]:
    return [name for name, pattern in CREDENTIAL_PATTERNS.items() if pattern.search(text)]


def test_credential_patterns_can_fail():
    fake = "AKIA" + "ABCDEFGHIJKLMNOP"
    assert credential_findings(f"key = {fake}") == ["AWS access key id"]
    assert credential_findings("url = s3://user:" + "hunter2@bucket/x") == ["password in a URL"]
    assert DVC_SECRET_KEYS.search("['remote \"s3\"']\n    url = s3://b\n    secret_access_key = abc\n")
    assert not DVC_SECRET_KEYS.search("[core]\n    remote = storage\n")


def test_no_credentials_in_the_repository():
    leaks = []
    for path in repository_files():
        data = (ROOT / path).read_bytes()
        if b"\0" in data[:8192]:
            continue  # binary
        leaks.extend(f"{path}: {name}" for name in credential_findings(data.decode("utf-8", "replace")))
    assert leaks == [], "\n".join(leaks)


def test_dvc_config_holds_no_secrets_and_config_local_is_ignored():
    config = (ROOT / ".dvc" / "config").read_text()
    assert not DVC_SECRET_KEYS.search(config), "credentials belong in .dvc/config.local (dvc remote modify --local)"
    ignored = subprocess.run(["git", "check-ignore", "-q", ".dvc/config.local"], cwd=ROOT)
    assert ignored.returncode == 0, ".dvc/config.local must be git-ignored"
    tracked = subprocess.run(["git", "ls-files", ".dvc/config.local"], cwd=ROOT, capture_output=True, text=True)
    assert tracked.stdout == ""
