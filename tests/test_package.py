"""The package metadata (pyproject.toml) and the lock (requirements.txt) name the
same packages, and every locked version satisfies the package's requirement."""
import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked_versions() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[normalized(name)] = Version(version)
    return pins


def declared_requirements() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = project["dependencies"] + [line for extra in project["optional-dependencies"].values() for line in extra]
    return {normalized(requirement.name): requirement for requirement in map(Requirement, lines)}


def test_lock_and_package_name_the_same_packages():
    assert set(locked_versions()) == set(declared_requirements())


def test_every_locked_version_satisfies_the_package_requirement():
    declared = declared_requirements()
    for name, version in locked_versions().items():
        assert declared[name].specifier.contains(version), f"{name}=={version} vs {declared[name]}"


def test_pytest_is_configured_in_pyproject_only():
    # a pytest.ini (or tox.ini / setup.cfg section) would silently win over pyproject.toml
    assert not (ROOT / "pytest.ini").exists()
    assert "tool" in tomllib.loads((ROOT / "pyproject.toml").read_text())
