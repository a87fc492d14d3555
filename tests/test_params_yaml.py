"""params.yaml survives DVC's own YAML round trip: ``dvc exp run -S key=value``
loads the file with ruamel (round-trip mode), merges the override and writes
the whole file back (dvc.utils.hydra.apply_overrides). Lists come back as
block lists and a comment inside a list is dropped, so params.yaml is written
in that form: an experiment's diff is the one line it edits.

``python tests/test_params_yaml.py`` prints params.yaml as DVC would write it
(to fix the file after an edit that this test refuses)."""
import shutil
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params.yaml"

hydra = pytest.importorskip("dvc.utils.hydra", reason="dvc not installed (requirements.txt pins it)")


def dvc_rewrite(path: Path, overrides: list[str]) -> None:
    """What ``dvc exp run -S`` does to a params file."""
    hydra.apply_overrides(str(path), overrides)


def changed_lines(before: str, after: str) -> list[tuple[str, str]]:
    old, new = before.splitlines(), after.splitlines()
    assert len(old) == len(new), "the rewrite added or removed lines"
    return [(a, b) for a, b in zip(old, new) if a != b]


def test_dvc_round_trip_keeps_params_yaml_byte_for_byte(tmp_path):
    copy = tmp_path / "params.yaml"
    shutil.copy(PARAMS, copy)
    dvc_rewrite(copy, [])
    assert copy.read_text() == PARAMS.read_text(), (
        "DVC rewrites params.yaml differently (flow lists, comments inside lists?): "
        "run `python tests/test_params_yaml.py > params.yaml` and restore lost comments on key lines")


@pytest.mark.parametrize("override, key_line", [
    ("finetune.lr=0.002", "  lr: 0.002 "),
    ("graph.k=20", "  k: 20 "),
    ("prepare.source=folder", "  source: folder "),
])
def test_one_set_param_changes_exactly_one_line(tmp_path, override, key_line):
    copy = tmp_path / "params.yaml"
    shutil.copy(PARAMS, copy)
    dvc_rewrite(copy, [override])
    changes = changed_lines(PARAMS.read_text(), copy.read_text())
    assert len(changes) == 1, changes
    assert changes[0][1].startswith(key_line), changes
    assert changes[0][0].split("#", 1)[1:] == changes[0][1].split("#", 1)[1:], "the line's comment changed"


def test_a_list_override_changes_only_that_list(tmp_path):
    copy = tmp_path / "params.yaml"
    shutil.copy(PARAMS, copy)
    dvc_rewrite(copy, ["evaluate.ks=[1,2,4,8,16]"])
    before, after = PARAMS.read_text().splitlines(), copy.read_text().splitlines()
    assert len(after) == len(before) + 1
    ks = after.index("  ks:                        # Recall@K")
    assert after[ks + 1:ks + 6] == ["  - 1", "  - 2", "  - 4", "  - 8", "  - 16"]
    assert after[:ks + 5] + after[ks + 6:] == before
    assert yaml.safe_load(copy.read_text())["evaluate"]["ks"] == [1, 2, 4, 8, 16]


def test_a_list_param_given_as_auto_and_back(tmp_path):
    """extract.scales: auto (a string) -> a list by -S, the README's multi-scale commands."""
    copy = tmp_path / "params.yaml"
    shutil.copy(PARAMS, copy)
    dvc_rewrite(copy, ["extract.scales=[224,317]"])
    assert yaml.safe_load(copy.read_text())["extract"]["scales"] == [224, 317]


def test_params_yaml_has_no_unread_section():
    """`base.seed` was read by no stage: every section belongs to a stage or the grid."""
    assert "base" not in yaml.safe_load(PARAMS.read_text())


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        copy = Path(folder) / "params.yaml"
        shutil.copy(PARAMS, copy)
        dvc_rewrite(copy, [])
        sys.stdout.write(copy.read_text())
