#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian machine: the Debian data package, a
# virtual environment in .venv, the pinned requirements and this project
# (editable). Safe to run twice: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

FASHION_DIR=/usr/share/datasets/fashion-mnist
if [ ! -f "$FASHION_DIR/train-images-idx3-ubyte.gz" ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  echo "setup: installing Debian package dataset-fashion-mnist"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PYTHON --version)"
  $PYTHON -m venv .venv
fi

# Reinstall only when requirements.txt or pyproject.toml changed since the last
# successful install: the pinned requirements first (the lock), then this
# project itself in editable mode without dependencies (so `import mom`, bare
# `pytest` and `python benchmarks/...` work, and edits take effect at once).
stamp=.venv/.requirements.sha256
want=$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing pinned requirements (a few minutes the first time)"
  # (grep drops pip's notes about this machine's unreachable extra index folders)
  .venv/bin/python -m pip install -q --upgrade pip 2> >(grep -v "is ignored: it is neither" >&2)
  .venv/bin/python -m pip install -q -r requirements.txt 2> >(grep -v "is ignored: it is neither" >&2)
  echo "setup: installing this project (editable, no dependencies)"
  .venv/bin/python -m pip install -q --no-deps -e . 2> >(grep -v "is ignored: it is neither" >&2)
  echo "$want" > "$stamp"
fi
