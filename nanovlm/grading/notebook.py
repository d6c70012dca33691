"""Reading a notebook for grading: its cells, which of them hold the exercises' answers, and the cells to run."""

import json
import re
from pathlib import Path

from .exercises import EXERCISES


def read_notebook(path: str | Path) -> dict:
    """A notebook file as a dict (plain JSON: grading needs neither nbformat nor nbgrader)."""
    try:
        nb = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a readable notebook: {e}") from e
    if not isinstance(nb, dict) or not isinstance(nb.get("cells"), list):
        raise ValueError(f"{path} is not a Jupyter notebook: it has no list of cells")
    return nb


def cell_source(cell: dict) -> str:
    source = cell.get("source", "")
    return "".join(source) if isinstance(source, list) else source


def nbgrader_meta(cell: dict) -> dict:
    return cell.get("metadata", {}).get("nbgrader", {})


def _is_test(cell: dict) -> bool:
    """An autograded test cell: graded, and not where the student writes."""
    meta = nbgrader_meta(cell)
    return bool(meta.get("grade")) and not meta.get("solution")


def find_exercises(nb: dict) -> dict[str, int]:
    """{exercise name: index of the cell with the student's function}.

    Solution cells are found by their nbgrader grade_id; a notebook whose metadata was lost (some editors drop
    it) falls back to the code cells that define a function with an exercise's name.
    """
    found = {}
    for i, cell in enumerate(nb["cells"]):
        meta = nbgrader_meta(cell)
        if cell.get("cell_type") == "code" and meta.get("solution") and meta.get("grade_id") in EXERCISES:
            found[meta["grade_id"]] = i
    if found:
        return found
    for i, cell in enumerate(nb["cells"]):
        if cell.get("cell_type") == "code" and not _is_test(cell):
            for name in re.findall(r"^def\s+(\w+)\s*\(", cell_source(cell), re.M):
                if name in EXERCISES:
                    found[name] = i
    return found


def cells_to_run(nb: dict, answer: int, answers: set[int]) -> list[tuple[int, str, bool]]:
    """(index, source, is the answer) of the code cells to run to define the function of cell `answer`.

    The cells before it run (the setup: imports, constants; their errors are ignored) and then the answer;
    test cells, other exercises' answers and everything after the answer do not.
    """
    return [
        (i, cell_source(cell), i == answer)
        for i, cell in enumerate(nb["cells"][: answer + 1])
        if cell.get("cell_type") == "code" and not _is_test(cell) and (i == answer or i not in answers)
    ]
