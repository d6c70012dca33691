"""Student versions of the exercise notebooks, made as `nbgrader generate_assignment` makes them."""

import copy
import json
from pathlib import Path

from .notebook import cell_source, nbgrader_meta, read_notebook

STUB = "# YOUR CODE HERE\nraise NotImplementedError()"  # what nbgrader puts in place of a solution
TEXT_STUB = "YOUR ANSWER HERE"


def _clear_regions(source: str, begin: str, end: str, stub: list[str] | None, where: str) -> tuple[str, bool]:
    """Replace each begin..end region (marker lines included) with stub, indented like the marker, or drop it."""
    lines, inside, found = [], False, False
    for line in source.split("\n"):
        if begin in line:
            if inside:
                raise ValueError(f"{where}: {begin} inside another {begin} region")
            inside = found = True
            indent = line[: len(line) - len(line.lstrip())]
            lines += [indent + s for s in stub or []]
        elif end in line:
            if not inside:
                raise ValueError(f"{where}: {end} without a {begin} before it")
            inside = False
        elif not inside:
            lines.append(line)
    if inside:
        raise ValueError(f"{where}: {begin} without an {end}")
    return "\n".join(lines), found


def student_version(nb: dict, name: str = "notebook") -> dict:
    """The notebook as nbgrader generate_assignment releases it.

    Solution regions become `# YOUR CODE HERE / raise NotImplementedError()` (a solution cell without a region
    is replaced whole), hidden test regions are deleted, outputs and execution counts are cleared. As nbgrader
    does, a solution region outside a solution cell or hidden tests outside a test cell are errors.
    """
    nb = copy.deepcopy(nb)
    for i, cell in enumerate(nb["cells"]):
        where, meta, code = f"{name}, cell {i + 1}", nbgrader_meta(cell), cell.get("cell_type") == "code"
        stub = (STUB if code else TEXT_STUB).split("\n")
        source, replaced = _clear_regions(cell_source(cell), "BEGIN SOLUTION", "END SOLUTION", stub, where)
        if replaced and not meta.get("solution"):
            raise ValueError(f"{where}: a solution region in a cell not marked as a solution cell (nbgrader metadata)")
        if meta.get("solution") and not replaced:
            source = "\n".join(stub)
        source, removed = _clear_regions(source, "BEGIN HIDDEN TESTS", "END HIDDEN TESTS", None, where)
        if removed and not meta.get("grade"):
            raise ValueError(f"{where}: hidden tests in a cell not marked as an autograded test cell")
        cell["source"] = source.splitlines(keepends=True)
        if code:
            cell["outputs"], cell["execution_count"] = [], None
    return nb


def make_student_version(source: str | Path, release: str | Path) -> list[Path]:
    """Write the student version of each notebook in source (a folder, or one .ipynb) into the folder release."""
    source, release = Path(source), Path(release)
    files = sorted(source.glob("*.ipynb")) if source.is_dir() else [source]
    if not files:
        raise FileNotFoundError(f"no notebooks (*.ipynb) in {source}")
    release.mkdir(parents=True, exist_ok=True)
    written = []
    for path in files:
        nb = student_version(read_notebook(path), path.name)
        out = release / path.name
        out.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        written.append(out)
    return written
