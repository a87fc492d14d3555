#!/usr/bin/env bash
# Main job: set up (if needed) and run the DVC pipeline on the embedded default.
# Extra arguments go to `dvc repro` (e.g. a stage name, or -f). The Table 1 grid:
# `bash scripts/repro.sh ablations/dvc.yaml [--jobs N]` (hidden from the main pipeline, see
# .dvcignore) runs its cells N at once, one per core by default (scripts/grid.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
[ -d .git ] || git init -q
# Stage commands call `python`: it must be the virtual environment's.
export PATH="$PWD/.venv/bin:$PATH"
for argument in "$@"; do
    case "$argument" in
        ablations/*) exec bash scripts/with_grid.sh python scripts/grid.py "$@" ;;
    esac
done
rm -f ablations/.dvcignore  # left by a killed grid run: the main pipeline must not see the grid
exec dvc repro "$@"
