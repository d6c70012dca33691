"""The grader behind `python -m nanovlm grade` and the exercise notebooks' `check(...)` cells.

Not part of the model: nothing in nanovlm's components imports it. What lives where:

- `ex01_patchify.py` .. `ex09_train_step.py`: one exercise each: its check, the typical mistakes it
  recognises and the feedback it gives, and the package functions the student's code may not call;
- `exercises.py`: the list of exercises (number, function, title) and `check` / `check_function`, which grade
  one function in this process;
- `student.py`: calling the student's function (errors, refusing the package function, reading what it
  returned); `results.py`: parts, results and their reports;
- `notebook.py`: reading a notebook and finding the answer cells; `sandbox.py`: running them and the check
  in a separate process with a time limit, for whole notebooks;
- `student_version.py`: student versions of the source notebooks, as nbgrader makes them;
- `cli.py`: the `grade` command (its help text says how grading works).
"""

from .cli import add_parser, cli, run
from .exercises import EXERCISES, check, check_function
from .notebook import find_exercises, read_notebook
from .results import POINTS, NotebookGrade, Part, Result, format_grades, format_result, grades_json
from .sandbox import grade_notebook, grade_notebooks
from .student_version import STUB, TEXT_STUB, make_student_version, student_version

__all__ = [
    "EXERCISES",
    "POINTS",
    "STUB",
    "TEXT_STUB",
    "NotebookGrade",
    "Part",
    "Result",
    "add_parser",
    "check",
    "check_function",
    "cli",
    "find_exercises",
    "format_grades",
    "format_result",
    "grade_notebook",
    "grade_notebooks",
    "grades_json",
    "make_student_version",
    "read_notebook",
    "run",
    "student_version",
]
