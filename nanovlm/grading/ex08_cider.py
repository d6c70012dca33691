"""Exercise 8, tfidf: CIDEr's tf-idf weights of a caption's n-grams.

The reference answer comes from nanovlm.metrics' own `_ngram_counts` and `_tfidf`: the public `cider_d` returns
only the scores, and the weights are what the exercise asks for. No other grading module names them.
"""

import itertools
import math
import random
from collections import Counter

from .. import metrics
from .results import Part, Parts
from .student import Student, StudentError, listing

# the package functions the student's code may not call, as (module or class, name)
FORBIDDEN = ((metrics, "_tfidf"), (metrics, "cider_d"))


def _reference_tfidf(caption: list[str], references: dict, max_n: int) -> dict[tuple[str, ...], float]:
    """CIDEr's tf-idf weights of a caption's n-grams, computed as nanovlm.metrics.cider_d does."""
    doc_freq = Counter(
        gram for refs in references.values() for gram in set().union(*(metrics._ngram_counts(r, max_n) for r in refs))
    )
    vectors = metrics._tfidf(metrics._ngram_counts(caption, max_n), doc_freq, math.log(len(references)), max_n)
    return {gram: weight for vector in vectors for gram, weight in vector.items()}


_TFIDF_RIGHT = {"tf": "count", "idf": "log", "N": "images", "df": "images"}
_TFIDF_CHOICES = {
    "tf": ("count", "frequency"),
    "idf": ("log", "ratio", "log10"),
    "N": ("images", "captions"),
    "df": ("images", "captions", "occurrences"),
}


def _tfidf_variant(caption, references, max_n, tf, idf, N, df) -> dict[tuple[str, ...], float]:
    """tf-idf weights computed with the given choices (the right ones are _TFIDF_RIGHT)."""
    all_refs = [r for refs in references.values() for r in refs]
    if df == "images":
        doc_freq = Counter(
            g for refs in references.values() for g in set().union(*(metrics._ngram_counts(r, max_n) for r in refs))
        )
    elif df == "captions":
        doc_freq = Counter(g for r in all_refs for g in metrics._ngram_counts(r, max_n))
    else:
        doc_freq = sum((metrics._ngram_counts(r, max_n) for r in all_refs), Counter())
    n_docs = len(references) if N == "images" else len(all_refs)
    counts = metrics._ngram_counts(caption, max_n)
    per_n = Counter(len(g) for g in counts.elements())
    log = {"log": math.log, "log10": math.log10, "ratio": lambda x: x}[idf]
    return {
        g: (c / per_n[len(g)] if tf == "frequency" else c) * log(n_docs / max(1, doc_freq[g]))
        for g, c in counts.items()
    }


def check_tfidf(student: Student) -> list[Part]:
    """tfidf(caption, references, max_n) -> {n-gram: weight}, against nanovlm.metrics (cider_d's _tfidf).

    Diagnoses, by computing each variant: missing n, keys that are not tuples, tf divided by the caption's
    n-gram count, idf without the log or in log10, N counted in captions instead of images, df counted per
    caption or per occurrence instead of per image, n-grams in no reference crashing or weighed 0.
    """
    parts = Parts(
        ("a weight for every n-gram, n = 1..max_n", 2),
        ("tf: the n-gram's count in the caption", 2),
        ("idf: log(number of images / df)", 2),
        ("df counts images, not captions", 2),
        ("n-grams in no reference: df = max(1, 0)", 2),
    )
    split = lambda texts: [t.split() for t in texts]  # noqa: E731
    shapes = {
        "img0": split(["a red circle", "a red circle above a square", "the red circle is above the square"]),
        "img1": split(["a blue square", "a blue square below a red circle"]),
        "img2": split(["two green triangles", "green triangles on the left"]),
    }
    rng = random.Random(8)
    words = "a red blue circle square above".split()
    random_refs = {i: [rng.choices(words, k=rng.randint(3, 7)) for _ in range(rng.randint(2, 3))] for i in range(4)}
    cases = [("a red circle above a square".split(), shapes, 4), (random_refs[2][0], random_refs, 2)]

    def answer(caption, references, max_n) -> dict:
        what = f"tfidf({' '.join(caption)!r}, references of {len(references)} images, max_n={max_n})"
        out = student.call(what, (caption, references, max_n))
        if not isinstance(out, dict):
            raise StudentError(f"{what} returned a {type(out).__name__}; return a dict {{n-gram tuple: weight}}")
        return out

    got = [answer(*case) for case in cases]
    expected = [_reference_tfidf(*case) for case in cases]
    problem = None
    for caption, weights, right in zip((c[0] for c in cases), got, expected, strict=True):
        if any(not isinstance(k, tuple) for k in weights):
            key = next(k for k in weights if not isinstance(k, tuple))
            problem = (
                f"keys must be tuples of words, e.g. ('red', 'circle') for the bigram 'red circle'; you have {key!r}"
            )
        elif set(weights) != set(right):
            missing = sorted(set(right) - set(weights), key=len)
            extra = sorted(set(weights) - set(right), key=len)
            sizes = sorted({len(k) for k in missing})
            problem = (
                f"for caption {' '.join(caption)!r}: "
                + (f"missing {listing(missing)} (n = {listing(sizes)}); " if missing else "")
                + (f"unexpected keys {listing(extra)}; " if extra else "")
                + "give a weight to every n-gram of the caption, n = 1..max_n, each once"
            )
        if problem:
            break
    parts.judge("a weight for every n-gram, n = 1..max_n", problem)
    if problem:
        return parts.finish("not checked: fix which n-grams get a weight first")

    def matches(choice: dict) -> bool:
        return all(
            all(
                math.isclose(float(w[g]), v, rel_tol=1e-6, abs_tol=1e-9)
                for g, v in _tfidf_variant(*case, **choice).items()
            )
            for case, w in zip(cases, got, strict=True)
        )

    choices = [dict(zip(_TFIDF_CHOICES, c, strict=True)) for c in itertools.product(*_TFIDF_CHOICES.values())]
    found = next((c for c in choices if matches(c)), None)
    if found is None:
        caption, refs, _ = cases[0]
        gram = next(
            g for g, v in expected[0].items() if not math.isclose(float(got[0][g]), v, rel_tol=1e-6, abs_tol=1e-9)
        )
        df = sum(any(gram in metrics._ngram_counts(r, len(gram)) for r in rs) for rs in refs.values())
        count = metrics._ngram_counts(caption, len(gram))[gram]
        generic = (
            f"the weight of {gram} is {float(got[0][gram]):.4g}; expected {expected[0][gram]:.4g} = count {count} x "
            f"log({len(refs)} images / df {df}), df being the number of images whose references contain it"
        )
        for name in ("tf: the n-gram's count in the caption", "df counts images, not captions"):
            parts.judge(name, "not judged separately: see the idf part")
        parts.judge("idf: log(number of images / df)", generic)
    else:
        parts.judge(
            "tf: the n-gram's count in the caption",
            None
            if found["tf"] == "count"
            else "you divided each count by the number of n-grams in the caption: the CIDEr paper writes tf that way, "
            "but it cancels in the cosine similarity, and nanovlm (like pycocoevalcap) uses the raw count",
        )
        idf_problem = {
            "ratio": "no log: idf = log(N / df); without it a rare n-gram's weight explodes (N / df = 3, log 3 = 1.1)",
            "log10": "use the natural logarithm (math.log), as CIDEr does, not log10",
        }.get(found["idf"])
        if found["N"] == "captions":
            idf_problem = (idf_problem + "; and " if idf_problem else "") + (
                "N is the number of images (len(references)), not the number of reference captions"
            )
        parts.judge("idf: log(number of images / df)", idf_problem)
        parts.judge(
            "df counts images, not captions",
            {
                "images": None,
                "captions": "df counts the images whose references contain the n-gram; you counted captions: 'red "
                "circle' is in 3 captions of img0 and 1 of img1, so its df is 2, not 4",
                "occurrences": "df counts the images whose references contain the n-gram; you counted every "
                "occurrence: an n-gram repeated in the captions of one image still adds 1",
            }[found["df"]],
        )
    choice = found or _TFIDF_RIGHT
    caption, references, max_n = "a purple circle".split(), shapes, 2
    try:
        weights = answer(caption, references, max_n)
        right = _tfidf_variant(caption, references, max_n, **choice)
        unseen = [g for g in right if "purple" in g]
        if any(g not in weights for g in unseen):
            problem = (
                "n-grams that no reference contains are missing: they too get a weight, count x log(N / max(1, 0)) = "
                "count x log N"
            )
        elif not all(math.isclose(float(weights[g]), right[g], rel_tol=1e-6) for g in unseen):
            g = unseen[0]
            problem = (
                f"{g} is in no reference, so df = 0; CIDEr uses max(1, df), which weighs it count x log N = "
                f"{right[g]:.4g}; you gave {float(weights[g]):.4g}"
            )
        else:
            problem = None
    except StudentError as e:
        problem = f"{e}. The caption has 'purple', which no reference contains: df = 0, and CIDEr uses max(1, df)"
    parts.judge("n-grams in no reference: df = max(1, 0)", problem)
    return parts.finish()
