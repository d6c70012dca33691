"""Exercise 12, chair: the CHAIR hallucination scores of parsed captions against exact scenes.

The reference answer is nanovlm.metrics.grounded_scores, whose chair_i and chair_s are these two numbers.
The check draws its own scenes and parsed captions (the dicts `scenes.parse_caption` returns), so the student
writes the counting, not the parser.
"""

import math
import random

from .. import metrics
from .results import Part, Parts
from .student import Student, StudentError

FORBIDDEN = ((metrics, "grounded_scores"), (metrics, "_caption_tallies"), (metrics, "_fits"))
COLORS, SHAPES, SIZES = ["red", "green", "blue", "yellow"], ["circle", "square", "triangle"], ["small", "large"]


def _draw(rng: random.Random) -> tuple[dict, dict]:
    """One scene and one parsed caption of it: mostly true mentions, some wrong colour, shape, size or count."""
    objects = [
        {"color": rng.choice(COLORS), "shape": rng.choice(SHAPES), "size": rng.choice(SIZES)}
        for _ in range(rng.randint(1, 4))
    ]
    mentions = []
    for _ in range(rng.randint(1, 3)):
        m = {**rng.choice(objects), "count": rng.choice([1, 1, 1, 2])}
        m = {"color": m["color"], "shape": m["shape"], "size": m["size"], "count": m["count"]}
        change = rng.random()
        if change < 0.25:
            m["color"] = rng.choice(COLORS)
        elif change < 0.4:
            m["shape"] = rng.choice(SHAPES)
        elif change < 0.55:
            m["size"] = "large" if m["size"] == "small" else "small"
        if rng.random() < 0.2:
            m["color"] = None  # "a circle": a colour left unsaid fits any
        if rng.random() < 0.4:
            m["size"] = None
        mentions.append(m)
    parsed = {"parsed": rng.random() > 0.1, "objects": mentions, "relations": []}
    if not parsed["parsed"]:
        parsed["objects"] = []
    return {"objects": objects}, parsed


def reference_chair(scenes: list[dict], parsed: list[dict], mistake: str = "") -> tuple[float, float]:
    """(CHAIR_i, CHAIR_s) from grounded_scores; `mistake` computes a typical wrong version instead."""
    if not mistake:
        s = metrics.grounded_scores(scenes, parsed, lambda a, relation, b: True)
        return s["chair_i"], s["chair_s"]
    mentions = hallucinated = hallucinating = captions = 0
    for scene, p in zip(scenes, parsed, strict=True):
        if not p["parsed"] and mistake != "unparsed counted":
            continue
        captions += 1
        bad = 0
        for m in p["objects"]:
            n = m["count"] if mistake in ("counts expanded", "counts in the mentions") else 1

            def fits(o, m=m):
                return (
                    o["shape"] == m["shape"]
                    and (m["color"] is None or o["color"] == m["color"] or mistake == "colour ignored")
                    and (mistake != "size checked" or m["size"] is None or o["size"] == m["size"])
                    and (mistake != "unsaid colour fits nothing" or m["color"] is not None)
                )

            mentions += n
            bad += (1 if mistake == "counts in the mentions" else n) * (not any(fits(o) for o in scene["objects"]))
        hallucinated += bad
        hallucinating += bad > 0
    return (hallucinated / mentions if mentions else math.nan, hallucinating / captions if captions else math.nan)


MISTAKES = {
    "size checked": "you count a mention whose object is there in another size as hallucinated; CHAIR asks only "
    "whether the object (its colour and shape) is in the image: a wrong size is not a hallucination",
    "counts expanded": "you count 'two red circles' as two mentions; a mention is one phrase, whatever its count (a "
    "wrong count is a counting error, not a hallucination)",
    "counts in the mentions": "you count 'two red circles' as two mentions; a mention is one phrase, whatever its "
    "count (a wrong count is a counting error, not a hallucination)",
    "colour ignored": "you only compare shapes; a mention of a colour the shape does not have in the image is "
    "hallucinated",
    "unsaid colour fits nothing": "a mention that says no colour ('a circle') fits a circle of any colour",
    "unparsed counted": "you count captions that did not parse in CHAIR_s; it is a share of the parsed captions",
}


def check_chair(student: Student) -> list[Part]:
    """chair(scenes, parsed) -> (CHAIR_i, CHAIR_s), against nanovlm.metrics.grounded_scores."""
    parts = Parts(
        ("returns two floats", 1),
        ("CHAIR_i: hallucinated mentions / mentions", 5),
        ("CHAIR_s: parsed captions with a hallucination / parsed captions", 3),
        ("nothing to measure gives nan", 1),
    )
    rng = random.Random(12)
    batches = [[_draw(rng) for _ in range(rng.randint(3, 12))] for _ in range(30)]
    got, expected = [], []
    for batch in batches:
        scenes, parsed = [b[0] for b in batch], [b[1] for b in batch]
        what = f"chair(scenes, parsed) on {len(batch)} captions"
        out = student.call(what, (scenes, parsed))
        if not (isinstance(out, tuple | list) and len(out) == 2):
            raise StudentError(f"{what} returned {out!r}; return the pair (chair_i, chair_s)")
        try:
            got.append((float(out[0]), float(out[1])))
        except (TypeError, ValueError):
            raise StudentError(f"{what} returned {out!r}; return two numbers (chair_i, chair_s)") from None
        expected.append(reference_chair(scenes, parsed))
    parts.judge("returns two floats", None)

    def same(a: float, b: float) -> bool:
        return (math.isnan(a) and math.isnan(b)) or abs(a - b) < 1e-9

    for which, name in ((0, "CHAIR_i: hallucinated mentions / mentions"),
                        (1, "CHAIR_s: parsed captions with a hallucination / parsed captions")):  # fmt: skip
        wrong = [i for i in range(len(batches)) if not same(got[i][which], expected[i][which])]
        if not wrong:
            parts.judge(name, None)
            continue
        found = next(
            (
                m
                for m in MISTAKES
                if all(
                    same(got[i][which], reference_chair([b[0] for b in batch], [b[1] for b in batch], m)[which])
                    for i, batch in enumerate(batches)
                )
            ),
            None,
        )
        i = wrong[0]
        example = f"on captions batch {i} you return {got[i][which]:.4f}, expected {expected[i][which]:.4f}"
        parts.judge(name, f"{MISTAKES[found]} ({example})" if found else f"{example}")

    problem = None
    what = "chair([], [])"
    out = student.call(what, ([], []), hints={"division by zero": "with no mentions, return nan (math.nan)"})
    if not (isinstance(out, tuple | list) and len(out) == 2 and all(_is_nan(x) for x in out)):
        problem = f"{what} returned {out!r}; with nothing to count, return (nan, nan): a rate of nothing is undefined"
    parts.judge("nothing to measure gives nan", problem)
    return parts.finish()


def _is_nan(x) -> bool:
    try:
        return math.isnan(float(x))
    except (TypeError, ValueError):
        return False
