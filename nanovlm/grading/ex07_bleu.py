"""Exercise 7, clipped_precision: BLEU's clipped n-gram precision of one caption.

The reference answer is nanovlm.metrics' own per-caption count, `_bleu_stats`: the public `bleu` returns only
the scores, and the counts are what the exercise asks for. No other grading module names it.
"""

import random
from collections import Counter

from .. import metrics
from .results import Part, Parts
from .student import Student, StudentError

# the package functions the student's code may not call, as (module or class, name)
FORBIDDEN = ((metrics, "_bleu_stats"), (metrics, "bleu"))


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _bleu_variant(candidate: list[str], references: list[list[str]], n: int, mistake: str) -> tuple[int, int]:
    """(matches, total) for one caption computed with a typical mistake."""
    cand, refs = _ngrams(candidate, n), [_ngrams(r, n) for r in references]
    total = max(0, len(candidate) - n + 1)
    if mistake == "no clipping":
        return sum(c for gram, c in cand.items() if any(gram in r for r in refs)), total
    if mistake == "clipped by the sum over references":
        return sum(min(c, sum(r[gram] for r in refs)) for gram, c in cand.items()), total
    if mistake == "distinct n-grams":
        return sum(1 for gram in cand if any(gram in r for r in refs)), len(cand)
    raise ValueError(mistake)


def check_clipped_precision(student: Student) -> list[Part]:
    """clipped_precision(candidate, references, n) -> (matches, total), against nanovlm.metrics._bleu_stats.

    Diagnoses: no clipping, clipping by the sum over the references instead of the largest count in one,
    distinct n-grams counted once, a total of len - n or len, a negative total for captions shorter than n.
    """
    parts = Parts(
        ("total: a caption of L words has L - n + 1 n-grams", 3),
        ("matches clipped by the most in one reference", 5),
        ("a caption shorter than n: (0, 0)", 2),
    )
    rng = random.Random(7)
    words = "a red blue circle square the".split()
    cases = [
        (
            "the the the the the the the".split(),
            ["the cat is on the mat".split(), "there is a cat on the mat".split()],
            1,
        ),
        ("a red circle a red square".split(), ["a red circle and a blue square".split(), "a square".split()], 2),
    ]
    for _ in range(24):
        candidate = rng.choices(words, k=rng.randint(3, 9))
        references = [rng.choices(words, k=rng.randint(3, 9)) for _ in range(rng.randint(1, 3))]
        cases.append((candidate, references, rng.randint(1, 4)))
    short = [("a red".split(), ["a red circle".split()], 3), (["circle"], ["a circle".split()], 4)]

    def answer(candidate, references, n) -> tuple[float, float]:
        what = f"clipped_precision({' '.join(candidate)!r}, {[' '.join(r) for r in references]}, n={n})"
        out = student.call(what, (candidate, references, n))
        if isinstance(out, float | int):
            raise StudentError(
                f"{what} returned {out}; return the two counts (matches, total): BLEU adds them up over the whole "
                "corpus before dividing"
            )
        if not (isinstance(out, tuple | list) and len(out) == 2 and all(isinstance(x, int | float) for x in out)):
            raise StudentError(f"{what} returned {out!r}; return the pair of counts (matches, total)")
        return out[0], out[1]

    def example(candidate, references, n, got, expected, which: int) -> str:
        return (
            f"for candidate {' '.join(candidate)!r} and references {[' '.join(r) for r in references]} with n = {n} "
            f"you return {got[which]}, expected {expected[which]}"
        )

    got = [answer(*case) for case in cases]
    expected = [_reference_bleu_counts(*case) for case in cases]
    wrong = [i for i, (a, b) in enumerate(zip(got, expected, strict=True)) if a[1] != b[1]]
    problem = None
    if wrong:
        c, refs, n = cases[wrong[0]]
        totals = {
            "len - n": lambda c, n: max(0, len(c) - n),
            "len": lambda c, n: len(c),
            "distinct": lambda c, n: len(_ngrams(c, n)),
        }
        how = {
            "len - n": "you count L - n n-grams; a caption of L words has L - n + 1 (7 words: 7 unigrams, 6 bigrams)",
            "len": "you return the caption's length; a caption of L words has L - n + 1 n-grams",
            "distinct": "you count distinct n-grams; the total counts every position, repeats included",
        }
        found = next(
            (
                how[k]
                for k, f in totals.items()
                if all(g[1] == f(c_, n_) for g, (c_, _, n_) in zip(got, cases, strict=True))
            ),
            None,
        )
        problem = (
            (found or "the total is the number of n-grams in the candidate, L - n + 1")
            + ": "
            + example(c, refs, n, got[wrong[0]], expected[wrong[0]], 1)
        )
    parts.judge("total: a caption of L words has L - n + 1 n-grams", problem)

    wrong = [i for i, (a, b) in enumerate(zip(got, expected, strict=True)) if a[0] != b[0]]
    problem = None
    if wrong:
        how = {
            "no clipping": "you did not clip: an n-gram earns at most as many matches as it appears in one reference",
            "clipped by the sum over references": "you clipped by the count summed over all references; clip by the "
            "largest count in any single reference",
            "distinct n-grams": "you counted each distinct n-gram once; count every occurrence, then clip",
        }
        found = next(
            (k for k in how if all(g[0] == _bleu_variant(*case, k)[0] for g, case in zip(got, cases, strict=True))),
            None,
        )
        if found:  # show a case where the mistake makes a difference
            i = next(i for i, case in enumerate(cases) if _bleu_variant(*case, found)[0] != expected[i][0])
            problem = how[found] + ": " + example(*cases[i], got[i], expected[i], 0)
        else:
            i = wrong[0]
            problem = (
                "matches are the candidate's n-grams, each counted at most as often as it appears in one reference: "
            )
            problem += example(*cases[i], got[i], expected[i], 0)
    parts.judge("matches clipped by the most in one reference", problem)

    problem = None
    for candidate, references, n in short:
        out = answer(candidate, references, n)
        if tuple(out) != (0, 0):
            problem = (
                f"a caption with fewer than n words has no n-grams: for {' '.join(candidate)!r} and n = {n} you "
                f"return {tuple(out)}, expected (0, 0) (a total of max(0, L - n + 1))"
            )
            break
    parts.judge("a caption shorter than n: (0, 0)", problem)
    return parts.finish()


def _reference_bleu_counts(candidate: list[str], references: list[list[str]], n: int) -> tuple[int, int]:
    """(clipped matches, total n-grams) of one caption for one n, from nanovlm.metrics."""
    correct, guess, _, _ = metrics._bleu_stats(candidate, references, n)
    return correct[n - 1], guess[n - 1]
