"""Every chapter opens with the drawn map of the model, its own pieces in colour (tools/course_map.py)."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
_spec = importlib.util.spec_from_file_location("course_map", ROOT / "tools" / "course_map.py")
course_map = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(course_map)


def test_every_notebook_has_a_chapter_in_the_map():
    assert sorted(p.name[:2] for p in NOTEBOOKS) == sorted(course_map.PIECES)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_the_notebook_opens_with_its_own_map(path):
    assert course_map.problems(path) == []


def test_every_piece_lit_is_a_piece_drawn():
    drawn = set(course_map.BOXES) | {course_map.TRAINER}
    assert all(set(pieces) <= drawn for pieces in course_map.PIECES.values())


def test_the_check_finds_a_missing_or_wrong_map(tmp_path):
    nb = json.loads(NOTEBOOKS[3].read_text(encoding="utf-8"))
    first = next(c for c in nb["cells"] if c["cell_type"] == "markdown")
    copy = tmp_path / NOTEBOOKS[3].name
    first["source"] = [line.replace("ViT in colour", "decoder in colour") for line in first["source"]]
    copy.write_text(json.dumps(nb), encoding="utf-8")
    assert "names other pieces" in course_map.problems(copy)[0]
    course_map.embed(copy)
    assert course_map.problems(copy) == []
    del first["attachments"]
    copy.write_text(json.dumps(nb), encoding="utf-8")
    assert "no course_map.png attachment" in course_map.problems(copy)[0]
