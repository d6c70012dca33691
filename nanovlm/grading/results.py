"""Grades and their reports: the parts of one exercise, one exercise's result, one notebook's results."""

import textwrap
from dataclasses import asdict, dataclass, field

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
    score, points = sum(g.score for g in grades), sum(g.points for g in grades)
    n = sum(len(g.results) for g in grades)
    blocks.append(f"total: {score}/{points} over {n} exercise(s) in {len(grades)} notebook(s)")
    return "\n\n".join(blocks)


def grades_json(grades: list[NotebookGrade]) -> dict:
    """The grades as plain data, for --json."""
    return {
        "notebooks": [
            {
                "path": g.path,
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
