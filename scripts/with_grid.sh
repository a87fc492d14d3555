#!/usr/bin/env bash
# Run one command with the Table 1 grid (ablations/dvc.yaml) visible to DVC, e.g.
#   bash scripts/with_grid.sh dvc repro ablations/dvc.yaml
#   bash scripts/with_grid.sh dvc status ablations/dvc.yaml
# The root .dvcignore hides the grid so that the main pipeline's `dvc exp run`, `dvc status`
# and `dvc metrics/plots show` say nothing about it; a nested ablations/.dvcignore (git-ignored)
# re-includes it for the duration of the command and is removed afterwards, also on Ctrl-C.
set -euo pipefail
switch="$(cd "$(dirname "$0")/.." && pwd)/ablations/.dvcignore"
printf '# written by scripts/with_grid.sh, removed when its command ends\n!/dvc.yaml\n' > "$switch"
trap 'rm -f "$switch"' EXIT
"$@"
