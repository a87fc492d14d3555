#!/usr/bin/env bash
# Main job: set up (if needed) and run the DVC pipeline on the embedded default.
# Extra arguments go to `dvc repro` (e.g. a stage name, or -f).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
[ -d .git ] || git init -q
# Stage commands call `python`: it must be the virtual environment's.
export PATH="$PWD/.venv/bin:$PATH"
exec dvc repro "$@"
