"""The exercises work with nbgrader itself: its generate_assignment and autograde give the solutions full
marks and the untouched student versions zero (the README says this was checked; this keeps it true)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from nbgrader.api import Gradebook

SOURCE = Path(__file__).resolve().parents[1] / "exercises" / "source"


def nbgrader(course: Path, *args: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "nbgrader", *args, "--force"], cwd=course, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_nbgrader_generates_the_student_versions_and_autogrades_them(tmp_path):
    course = tmp_path / "course"
    shutil.copytree(SOURCE, course / "source" / "nanovlm", ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    (course / "nbgrader_config.py").write_text(
        f"c = get_config()\nc.CourseDirectory.root = {str(course)!r}\nc.CourseDirectory.course_id = 'nanovlm'\n"
    )
    nbgrader(course, "generate_assignment", "nanovlm")
    released = sorted(p.name for p in (course / "release" / "nanovlm").glob("*.ipynb"))
    assert released == sorted(p.name for p in SOURCE.glob("*.ipynb"))
    for student, folder in (("solved", course / "source" / "nanovlm"), ("untouched", course / "release" / "nanovlm")):
        shutil.copytree(folder, course / "submitted" / student / "nanovlm")
    nbgrader(course, "autograde", "nanovlm")
    with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gradebook:
        scores = {s: gradebook.find_submission("nanovlm", s).score for s in ("solved", "untouched")}
        points = gradebook.find_submission("nanovlm", "solved").max_score
    assert points == 10 * len(released)
    assert scores == {"solved": points, "untouched": 0}
