"""Grading notebooks: each exercise's cells and check run in a separate process with a time limit.

An infinite loop or a crash in the student's code then costs that exercise only.

The separate process and the time limit protect the grading from mistakes, not from malice: a student's code
runs with the permissions of whoever runs the grader.
"""

import multiprocessing
import os
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from .exercises import EXERCISES, check_function, exercise_named
from .notebook import cells_to_run, find_exercises, read_notebook
from .results import NotebookGrade, Result
from .student import SOLUTION_FILE, where_in_solution

PRELUDE = "import math\nimport numpy as np\nimport torch\nimport torch.nn as nn\nimport torch.nn.functional as F\n"
PRELUDE += "from collections import Counter\nfrom einops import rearrange\n"  # usable without an import


def _without_magics(source: str) -> str:
    """IPython lines (%magic, !shell) become `pass`, so that the cell is plain Python."""
    return re.sub(r"^(\s*)[%!].*$", r"\1pass", source, flags=re.M)


def run_cells_and_check(
    exercise: str, cells: list[tuple[int, str, bool]], report: Callable[[str], None] | None = None
) -> Result:
    """Run the cells in a fresh namespace, then check the function the answer cell defines.

    `report` is told what runs (the grading process passes it on to its parent).
    """
    ex = exercise_named(exercise)
    namespace: dict[str, Any] = {"__name__": "__main__"}
    exec(PRELUDE, namespace)
    for index, source, is_answer in cells:
        if report:
            report(f"running cell {index + 1}" + (" (your solution)" if is_answer else " (setup)"))
        try:
            exec(
                compile(_without_magics(source), SOLUTION_FILE if is_answer else f"<cell {index + 1}>", "exec"),
                namespace,
            )
        except SyntaxError as e:
            if is_answer:
                return ex.failed(
                    f"syntax error in your solution cell, line {e.lineno}: {e.msg}: {(e.text or '').strip()}"
                )
        except (Exception, SystemExit) as e:
            if is_answer:  # a setup cell may fail (it might draw a figure): only the answer counts
                return ex.failed(f"running your solution cell raised {type(e).__name__}: {e}{where_in_solution(e)}")
    fn = namespace.get(ex.name)
    if not callable(fn):
        return ex.failed(f"no function named {ex.name} after running your solution cell: keep its name")
    return check_function(ex.name, fn, report)


def _grade_in_child(conn, exercise: str, cells: list[tuple[int, str, bool]]) -> None:
    """Entry point of a grading process: run the cells and the check, sending progress and the result."""
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):  # the student's prints go nowhere; what matters travels through conn
        os.dup2(devnull, fd)
    os.environ["MPLBACKEND"] = "Agg"
    torch.set_num_threads(1)
    report = lambda text: conn.send(("phase", text))  # noqa: E731
    conn.send(("result", run_cells_and_check(exercise, cells, report)))


def _context() -> multiprocessing.context.BaseContext:
    """Processes forked from a server that has imported torch once (fast and clean), or spawned where there is none."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])
        return ctx
    return multiprocessing.get_context("spawn")


def grade_isolated(exercise: str, cells: list[tuple[int, str, bool]], timeout: float = 30.0) -> Result:
    """run_cells_and_check in a separate process; a time-out or a crash there is a zero with the reason."""
    ex = exercise_named(exercise)
    ctx = _context()
    receiver, sender = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_grade_in_child, args=(sender, exercise, cells), daemon=True)
    process.start()  # with a fork server, returns once forked: the server's one-time start is not timed
    sender.close()
    phase, deadline = "starting", time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not receiver.poll(left):
                return ex.failed(f"timed out: not done after {timeout:g} s, while {phase} (an infinite loop?)")
            try:
                kind, payload = receiver.recv()
            except (EOFError, OSError):
                process.join(5)
                return ex.failed(
                    f"the grading process stopped (exit code {process.exitcode}) while {phase}: does your code call "
                    "exit() or crash Python?",
                )
            if kind == "result":
                return payload
            phase = payload
    finally:
        if process.is_alive():
            process.kill()
        process.join()
        receiver.close()


def grade_notebook(path: str | Path, timeout: float = 30.0, isolate: bool = True) -> NotebookGrade:
    """Grade every exercise found in one notebook, each in its own process with `timeout` seconds.

    isolate=False runs the cells and checks in this process, with no time limit (for tests and debugging).
    """
    try:
        nb = read_notebook(path)
    except ValueError as e:
        return NotebookGrade(str(path), [], str(e))
    found = find_exercises(nb)
    if not found:
        return NotebookGrade(
            str(path),
            [],
            f"no exercise found: no solution cell with a grade_id among {', '.join(EXERCISES)}, and "
            "no cell defining a function of those names",
        )
    answers = set(found.values())
    results = []
    for name, index in sorted(found.items(), key=lambda item: EXERCISES[item[0]].number):
        cells = cells_to_run(nb, index, answers)
        results.append(grade_isolated(name, cells, timeout) if isolate else run_cells_and_check(name, cells))
    return NotebookGrade(str(path), results)


def find_notebooks(paths: list[str | Path]) -> list[tuple[Path, str]]:
    """(notebook, student) for each path: a file stands for itself, a folder for every .ipynb under it.

    The student is the first folder below the one named (submissions/alice/week1/x.ipynb: alice), or, for
    a notebook directly in it or named on its own, the folder that holds it. Jupyter's checkpoint copies
    (.ipynb_checkpoints) are not submissions and are skipped.
    """
    found: list[tuple[Path, str]] = []
    for path in map(Path, paths):
        if not path.is_dir():
            found.append((path, path.parent.resolve().name))
            continue
        for nb in sorted(path.rglob("*.ipynb")):
            inside = nb.relative_to(path).parts
            if ".ipynb_checkpoints" not in inside:
                found.append((nb, inside[0] if len(inside) > 1 else path.resolve().name))
    return found


def grade_notebooks(
    paths: list[str | Path], timeout: float = 30.0, isolate: bool = True, jobs: int = 1
) -> list[NotebookGrade]:
    """Grade notebooks (folders: every notebook under them), `jobs` notebooks at a time, in the order found.

    Each grade records its student (see find_notebooks). The notebooks run in parallel threads that each
    wait on their own grading process, so `jobs` is how many students' code runs at once.
    """
    found = find_notebooks(paths)

    def grade(item: tuple[Path, str]) -> NotebookGrade:
        result = grade_notebook(item[0], timeout, isolate)
        result.student = item[1]
        return result

    if jobs <= 1:
        return [grade(item) for item in found]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(grade, found))
