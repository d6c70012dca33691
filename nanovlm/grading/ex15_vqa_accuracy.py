"""Exercise 15, vqa_accuracy: the VQA accuracy of one answer against the ten human answers to its question.

The reference is nanovlm.vqa.accuracy, which agrees with the official evaluation code (tests/test_vqa.py).
The student may use vqa.normalize, the official normal form of an answer, and writes the rest.
"""

import random

from .. import vqa
from .results import Part, Parts
from .student import Student, StudentError

FORBIDDEN = ((vqa, "accuracy"),)
POOL = ["2", "two", "Two.", "red", "Red", "the red one", "blue", "circle", "a circle", "yes", "yes!", "no", "3"]


def reference_vqa_accuracy(prediction: str, answers: list[str], mistake: str = "") -> float:
    """vqa.accuracy; `mistake` computes a typical wrong version instead."""
    if mistake == "no leave-one-out":
        humans = [vqa.normalize(a) for a in answers]
        return min(1.0, humans.count(vqa.normalize(prediction)) / 3)
    if mistake == "always normalised":
        p, humans = vqa.normalize(prediction), [vqa.normalize(a) for a in answers]
    elif mistake == "never normalised":
        p, humans = prediction.strip(), [a.strip() for a in answers]
    else:
        return vqa.accuracy(prediction, answers)
    agree = [h == p for h in humans]
    return sum(min(1.0, (sum(agree) - a) / 3) for a in agree) / len(humans)


MISTAKES = {
    "no leave-one-out": "you score min(matches / 3, 1) over all ten humans; the official score averages it over the "
    "ten sets of nine humans left when each one in turn is left out (3 matches of 10 give 0.9, not 1)",
    "never normalised": "you compare the strings as they are; when the humans disagree, pass the prediction and "
    "every human answer through vqa.normalize first ('Two.' and '2' are the same answer)",
    "always normalised": "you normalise even when all humans gave the same string; the official code then compares "
    "the prediction with that string exactly ('Red' scores 0 against ten 'red')",
}


def check_vqa_accuracy(student: Student) -> list[Part]:
    """vqa_accuracy(prediction, answers) -> float, against nanovlm.vqa.accuracy."""
    parts = Parts(
        ("min(matches / 3, 1), averaged over the ten leave-one-out sets", 5),
        ("answers normalised when the humans disagree, not when they agree", 3),
        ("no human answers raises ValueError", 2),
    )
    rng = random.Random(15)
    cases = []
    for k in range(10):  # k of the ten humans give the prediction's answer, as it is: the counting alone
        cases.append(("red", ["red"] * k + ["blue"] * (10 - k)))
    counting = list(cases)
    for _ in range(40):  # spellings that normalisation joins, and unanimous humans
        answers = [rng.choice(POOL[:4]) for _ in range(10)] if rng.random() < 0.5 else [rng.choice(POOL)] * 10
        if rng.random() < 0.5:
            answers = [rng.choice(POOL) for _ in range(10)]
        cases.append((rng.choice(POOL), answers))

    def score(prediction: str, answers: list[str]) -> float:
        what = f"vqa_accuracy({prediction!r}, {answers})"
        out = student.call(what, (prediction, answers))
        if not isinstance(out, float | int) or isinstance(out, bool):
            raise StudentError(f"{what} returned {out!r}; return the accuracy, a number between 0 and 1")
        return float(out)

    got = [score(p, a) for p, a in cases]
    expected = [reference_vqa_accuracy(p, a) for p, a in cases]

    def diagnose(indices: list[int]) -> str | None:
        wrong = [i for i in indices if abs(got[i] - expected[i]) > 1e-9]
        if not wrong:
            return None
        found = next(
            (m for m in MISTAKES if all(abs(got[i] - reference_vqa_accuracy(*cases[i], m)) < 1e-9 for i in indices)),
            None,
        )
        i = wrong[0]
        example = f"vqa_accuracy({cases[i][0]!r}, {cases[i][1]}) is {expected[i]:.4f}, you return {got[i]:.4f}"
        return f"{MISTAKES[found]} ({example})" if found else example

    parts.judge("min(matches / 3, 1), averaged over the ten leave-one-out sets", diagnose(range(len(counting))))
    problem = diagnose(range(len(counting), len(cases)))
    parts.judge("answers normalised when the humans disagree, not when they agree", problem)

    problem = None
    try:
        out = student.call("vqa_accuracy('red', [])", ("red", []))
        problem = f"vqa_accuracy('red', []) returned {out!r}; with no human answers, raise ValueError"
    except StudentError as e:
        if "raised ValueError" not in str(e):
            problem = f"{e}; raise ValueError when there are no human answers"
    parts.judge("no human answers raises ValueError", problem)
    return parts.finish()
