"""Grades and their reports: the parts of one exercise, one exercise's result, one notebook's results, and
for a class, one CSV row per student and exercise and one feedback file per student."""

import csv
import io
import re
import textwrap
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..files import write_file_atomically

POINTS = 10  # every exercise is worth the same


@dataclass
class Part:
    """One graded part of an exercise: what was checked, the points, and what to fix (or "ok")."""

    name: str
    points: int
    earned: int
    message: str


@dataclass
class Result:
    """The grade of one exercise. `error` says why nothing could be graded (not attempted, crash, time-out)."""

    exercise: str
    number: int
    title: str
    points: int
    score: int
    parts: list[Part] = field(default_factory=list)
    error: str | None = None

    @property
    def full_marks(self) -> bool:
        return self.score == self.points


@dataclass
class NotebookGrade:
    """The grades of the exercises found in one submitted notebook."""

    path: str
    results: list[Result]
    error: str | None = None
    student: str = ""  # who submitted it: the folder it was found in (sandbox.find_notebooks)

    @property
    def score(self) -> int:
        return sum(r.score for r in self.results)

    @property
    def points(self) -> int:
        return sum(r.points for r in self.results)


class Parts:
    """The parts of one exercise's grade, declared up front, judged one by one as the check goes."""

    def __init__(self, *plan: tuple[str, int]) -> None:
        if sum(points for _, points in plan) != POINTS:
            raise ValueError(f"the parts {plan} add up to {sum(p for _, p in plan)} points, not {POINTS}")
        self.plan = dict(plan)
        self.judged: dict[str, Part] = {}

    def judge(self, name: str, problem: str | None, note: str | None = None) -> None:
        """Record part `name`: full points if problem is None (with an optional note), else zero and the problem."""
        points = self.plan[name]
        message = problem if problem else "ok" + (f" ({note})" if note else "")
        self.judged[name] = Part(name, points, 0 if problem else points, message)

    def finish(self, reason: str = "not checked: fix the part above first") -> list[Part]:
        """All parts in plan order; the ones not judged get zero with `reason`."""
        return [self.judged.get(name) or Part(name, points, 0, reason) for name, points in self.plan.items()]


def format_result(result: Result) -> str:
    """A readable report of one exercise: its score, then each part with what to fix."""
    lines = [f"Exercise {result.number} ({result.exercise}: {result.title}): {result.score}/{result.points}"]
    if result.error:
        lines.append(textwrap.fill(result.error, 110, initial_indent="    ", subsequent_indent="    "))
    for part in result.parts:
        mark = "ok  " if part.earned == part.points else "FAIL"
        lines.append(f"  {mark} {part.name}: {part.earned}/{part.points}")
        if part.message != "ok":
            lines.append(textwrap.fill(part.message, 110, initial_indent="       ", subsequent_indent="       "))
    return "\n".join(lines)


def format_grades(grades: list[NotebookGrade]) -> str:
    """The report of a grading run: per notebook and exercise, then the total."""
    blocks = []
    for grade in grades:
        lines = [f"{grade.path}: {grade.score}/{grade.points}" if grade.results else grade.path]
        if grade.error:
            lines.append(f"    {grade.error}")
        lines += [textwrap.indent(format_result(r), "  ") for r in grade.results]
        blocks.append("\n".join(lines))
    by_student = _by_student(grades)
    if len(by_student) > 1:
        width = max(map(len, by_student))
        rows = [f"  {name:<{width}}  {_score(own)}" for name, own in by_student.items()]
        blocks.append("per student:\n" + "\n".join(rows))
    n = sum(len(g.results) for g in grades)
    blocks.append(f"total: {_score(grades)} over {n} exercise(s) in {len(grades)} notebook(s)")
    return "\n\n".join(blocks)


def _score(grades: list[NotebookGrade]) -> str:
    return f"{sum(g.score for g in grades)}/{sum(g.points for g in grades)}"


def _by_student(grades: list[NotebookGrade]) -> dict[str, list[NotebookGrade]]:
    out: dict[str, list[NotebookGrade]] = defaultdict(list)
    for g in grades:
        out[g.student].append(g)
    return dict(sorted(out.items()))


def _problem(result: Result) -> str:
    """What cost points, in one line: why nothing was graded, or the first part that failed."""
    if result.error:
        return result.error
    failed = [p for p in result.parts if p.earned < p.points]
    return f"{failed[0].name}: {failed[0].message}" if failed else ""


def grades_csv(grades: list[NotebookGrade]) -> str:
    """One row per student and exercise (a notebook with no exercise gets one row saying why), sorted."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["student", "notebook", "exercise", "name", "score", "points", "problem"])
    rows = []
    for g in grades:
        if not g.results:
            rows.append([g.student, g.path, "", "", 0, 0, g.error or "no exercise found"])
        for r in g.results:
            rows.append([g.student, g.path, r.number, r.exercise, r.score, r.points, _problem(r)])
    writer.writerows(sorted(rows, key=lambda row: (row[0], str(row[2]), row[1])))
    return out.getvalue()


def write_feedback(grades: list[NotebookGrade], folder: str | Path) -> list[Path]:
    """One text file per student in folder (STUDENT.txt): the report of their notebooks; returns the files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for student, own in _by_student(grades).items():
        name = re.sub(r"[^\w.-]", "_", student) or "_"  # a student's folder name, safe as a file name
        path = folder / f"{name}.txt"
        write_file_atomically(path, f"Feedback for {student}\n\n{format_grades(own)}\n")
        written.append(path)
    return written


def grades_json(grades: list[NotebookGrade]) -> dict:
    """The grades as plain data, for --json."""
    return {
        "notebooks": [
            {
                "path": g.path,
                "student": g.student,
                "score": g.score,
                "points": g.points,
                "error": g.error,
                "exercises": [asdict(r) for r in g.results],
            }
            for g in grades
        ],
        "score": sum(g.score for g in grades),
        "points": sum(g.points for g in grades),
    }
