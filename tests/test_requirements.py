"""requirements.txt asks for what pyproject.toml installs: the package's dependencies and its notebooks extra."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_requirements_txt_matches_pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["notebooks"]
    lines = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    assert [line for line in lines if line and not line.startswith("#")] == wanted
