"""`pip install .` (the Docker image) carries every data file the packages read at run time."""

from __future__ import annotations

import subprocess
import tomllib
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath

ROOT = Path(__file__).resolve().parents[1]


def _package_data() -> dict[str, list[str]]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return dict(pyproject["tool"]["setuptools"]["package-data"])


def _packaged(path: PurePosixPath, package_data: dict[str, list[str]]) -> bool:
    """Whether setuptools' package-data of an enclosing package matches ``path``."""
    for depth in range(1, len(path.parts)):
        package = path.parts[:depth]
        if not (ROOT.joinpath(*package) / "__init__.py").is_file():
            continue
        relative = PurePosixPath(*path.parts[depth:]).as_posix()
        patterns = package_data.get(".".join(package), []) + package_data.get("", [])
        if any(fnmatch(relative, pattern) for pattern in patterns):
            return True
    return False


def test_tracked_data_files_are_package_data() -> None:
    tracked = subprocess.run(
        ["git", "ls-files", "medbatch", "worker", "api_shim", "db", "models"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    data = [PurePosixPath(p) for p in tracked if not p.endswith(".py")]
    assert any(p.name == "registry.json" for p in data)
    package_data = _package_data()
    missing = [p.as_posix() for p in data if not _packaged(p, package_data)]
    assert not missing, f"not in [tool.setuptools.package-data], so not installed: {missing}"
