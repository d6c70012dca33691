"""Grade the exercise notebooks: nanovlm's own checks, run on a student's function in a separate process.

    python -m nanovlm grade submitted/01_patchify_exercise.ipynb [more.ipynb | a folder ...] [--json]
    python -m nanovlm grade submissions/ --csv grades.csv --feedback feedback/   # a class: a folder per student
    python -m nanovlm grade --make-student exercises/source exercises/release

Each exercise notebook (exercises/source/NN_name_exercise.ipynb) asks for one function, written between
`### BEGIN SOLUTION` and `### END SOLUTION` in a cell marked as an nbgrader solution cell whose grade_id is
the function's name. To grade a submitted notebook, the grader

- finds that cell (by its nbgrader grade_id, or else by the function it defines),
- runs the notebook's setup cells and that cell in a fresh process with a time limit, so that an infinite
  loop or a crash costs that exercise only (the notebook's test cells are never run: a student can edit them),
- calls the function on seeded random inputs of several shapes and compares it with the package's own
  implementation, through the check function of that exercise below,
- prints a score per part, with feedback that names the mistake and the fix ("your mask lets position 0
  see position 1 ..."), a total per student, and a total.

A folder stands for every notebook under it, at any depth; the first folder below it names the student
(submissions/alice/...). --csv writes one row per student and exercise, --feedback one report per student,
and --jobs grades that many notebooks at once.

The same checks run inside the notebooks (`check("patchify", patchify)`) so that students see the feedback
while they work. `make_student_version` does to a notebook what `nbgrader generate_assignment` does:
solution regions become `raise NotImplementedError()`, hidden tests disappear, outputs are cleared.

The separate process and the time limit protect the grading from mistakes, not from malice: a student's
code runs with the permissions of whoever runs the grader.
"""

import argparse
import json
import math
import os
from pathlib import Path

from ..files import write_file_atomically
from .results import format_grades, grades_csv, grades_json, write_feedback
from .sandbox import grade_notebooks
from .student_version import make_student_version


def seconds(text: str) -> float:
    """A time limit from the command line: a finite number of seconds above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"{text!r}: give a finite number of seconds above 0")
    return value


def jobs(text: str) -> int:
    """How many notebooks to grade at once: a whole number from 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of notebooks, 1 or more")
    return int(text)


def add_parser(sub) -> None:
    """Register `grade`: grade submitted notebooks, or write the student versions of the source notebooks."""
    p = sub.add_parser(
        "grade",
        help="grade exercise notebooks (or write their student versions)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("notebooks", nargs="*", help="submitted notebooks (.ipynb), or folders of them")
    p.add_argument("--json", action="store_true", help="print JSON instead of a report")
    p.add_argument("--timeout", type=seconds, default=30.0, help="seconds each exercise may take (default 30)")
    p.add_argument("--csv", metavar="FILE", help="also write one row per student and exercise to FILE")
    p.add_argument("--feedback", metavar="DIR", help="also write one report per student, DIR/STUDENT.txt")
    p.add_argument(
        "--jobs", type=jobs, default=min(4, os.cpu_count() or 1), help="notebooks graded at once (default: up to 4)"
    )
    p.add_argument(
        "--make-student",
        nargs=2,
        metavar=("SOURCE", "RELEASE"),
        help="write the student versions of the notebooks in SOURCE into RELEASE (no grading)",
    )


def run(args) -> None:
    """Write student versions (--make-student) or grade the notebooks named, and print the report."""
    if args.make_student:
        for path in make_student_version(*args.make_student):
            print(f"wrote {path}")
        return
    if not args.notebooks:
        raise ValueError("name the notebooks to grade (python -m nanovlm grade submitted/), or use --make-student")
    missing = [p for p in args.notebooks if not Path(p).exists()]
    if missing:
        raise FileNotFoundError(f"{missing[0]} not found: name notebooks or folders of them")
    grades = grade_notebooks(args.notebooks, timeout=args.timeout, jobs=args.jobs)
    print(json.dumps(grades_json(grades), indent=2) if args.json else format_grades(grades), flush=True)
    if args.csv:
        write_file_atomically(Path(args.csv), grades_csv(grades))
        print(f"wrote {args.csv}", flush=True)
    if args.feedback:
        written = write_feedback(grades, args.feedback)
        print(f"wrote {len(written)} feedback file(s) to {args.feedback}", flush=True)


def cli(argv: list[str] | None = None) -> None:
    """Run the grade command alone: cli(["submitted/"]) (a leading "grade" is allowed)."""
    parser = argparse.ArgumentParser(prog="python -m nanovlm")
    add_parser(parser.add_subparsers(dest="command", required=True))
    argv = list(argv or [])
    run(parser.parse_args(argv if argv[:1] == ["grade"] else ["grade", *argv]))
