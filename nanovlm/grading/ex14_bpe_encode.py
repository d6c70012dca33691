"""Exercise 14, bpe_encode: split one word into BPE tokens the way tiktoken does, from the merge ranks alone.

Notebook 02 trains the merges and lets tiktoken encode; the rule tiktoken applies is nanovlm.tokenizer's
`bpe_segment`, the reference here. The ranks the check uses are trained on the spot by `train_bpe` on a few
hundred captions, so they are real merges of the kind notebook 02 learns.
"""

import random

from .. import tokenizer
from .results import Part, Parts
from .student import Student, StudentError

FORBIDDEN = ((tokenizer, "bpe_segment"),)
WORDS = "a the small large red green blue yellow circle square triangle left right above below of and two three".split()


def _captions(rng: random.Random, n: int) -> list[str]:
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) for _ in range(n)]


def reference_bpe_encode(word: bytes, ranks: dict[bytes, int], mistake: str = "") -> list[int]:
    """The ids of the parts `bpe_segment` leaves; `mistake` computes a typical wrong version instead."""
    parts = [bytes([b]) for b in word]
    if mistake == "longest match first":  # WordPiece's greedy rule, not BPE's
        out, i = [], 0
        while i < len(word):
            j = max(j for j in range(i + 1, len(word) + 1) if word[i:j] in ranks)
            out.append(ranks[word[i:j]])
            i = j
        return out
    if mistake == "left to right":  # join any known pair, scanning from the left
        merged = True
        while merged:
            merged = False
            for i in range(len(parts) - 1):
                if parts[i] + parts[i + 1] in ranks:
                    parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2 :]
                    merged = True
                    break
        return [ranks[p] for p in parts]
    if mistake == "rightmost on ties":
        while True:
            found = [
                (ranks[parts[i] + parts[i + 1]], -i) for i in range(len(parts) - 1) if parts[i] + parts[i + 1] in ranks
            ]
            if not found:
                return [ranks[p] for p in parts]
            i = -min(found)[1]
            parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2 :]
    return [ranks[p] for p in tokenizer.bpe_segment(parts, ranks)]


MISTAKES = {
    "longest match first": "you take the longest known piece from the left (WordPiece's rule); BPE joins pairs, "
    "always the pair whose joined bytes have the lowest rank, wherever it is in the word",
    "left to right": "you join the first known pair from the left; BPE joins the pair with the lowest rank first, "
    "which is the order the merges were learned in",
    "rightmost on ties": "when the same pair occurs twice (b'aaaa'), join the leftmost one first, as tiktoken does",
}


def check_bpe_encode(student: Student) -> list[Part]:
    """bpe_encode(word, ranks) -> list of ids, against tokenizer.bpe_segment."""
    parts = Parts(
        ("returns a list of ids that spell the word back", 3),
        ("the lowest-ranked pair is joined first", 5),
        ("the same pair twice: the leftmost first", 2),
    )
    rng = random.Random(14)
    trained = tokenizer.train_bpe(_captions(rng, 300), 256 + 60)
    made = {bytes([i]): i for i in range(256)} | {
        b"bc": 256,
        b"ab": 257,
        b"cd": 258,
        b"abcd": 259,
        b"xa": 260,
        b"xyz": 261,
    }
    cases = [((" " + w).encode(), trained) for w in WORDS] + [(w.encode(), trained) for w in WORDS[:6]]
    cases += [(b" redgreen", trained), (b" xyz", trained), (b"", trained)]
    cases += [(w, made) for w in (b"abc", b"abcd", b"xabc", b"abab", b"cdab", b"xyz")]  # where other rules part ways
    got = []
    for word, ranks in cases:
        what = f"bpe_encode({word!r}, ranks)"
        out = student.call(what, (word, ranks))
        if not (isinstance(out, list) and all(isinstance(i, int) for i in out)):
            raise StudentError(f"{what} returned {out!r}; return the token ids as a list of ints")
        back = {rank: token for token, rank in ranks.items()}
        if any(i not in back for i in out) or b"".join(back[i] for i in out) != word:
            spelled = b"".join(back.get(i, b"?") for i in out)
            parts.judge(
                "returns a list of ids that spell the word back",
                f"{what} returned {out}, which spells {spelled!r}: the ids must be ranks of tokens whose bytes, "
                "joined, are the word",
            )
            return parts.finish("not checked: the ids must spell the word first")
        got.append(out)
    parts.judge("returns a list of ids that spell the word back", None)

    expected = [reference_bpe_encode(w, r) for w, r in cases]
    wrong = [i for i in range(len(cases)) if got[i] != expected[i]]
    problem = None
    if wrong:
        found = next(
            (
                m
                for m in MISTAKES
                if all(g == reference_bpe_encode(w, r, m) for g, (w, r) in zip(got, cases, strict=True))
            ),
            None,
        )
        i = wrong[0]
        word, ranks = cases[i]
        back = {rank: token for token, rank in ranks.items()}
        example = f"for {word!r} you return {[back[t] for t in got[i]]}, expected {[back[t] for t in expected[i]]}"
        if ranks is made:
            example += " (ranks: bc 256, ab 257, cd 258, abcd 259, xa 260, xyz 261)"
        problem = f"{MISTAKES[found]} ({example})" if found else example + ": join the lowest-ranked pair first"
    parts.judge("the lowest-ranked pair is joined first", problem)

    ties = {b"a": 97, b"b": 98, b"aa": 256, b"ab": 257, b"aab": 258}
    ties.update({bytes([i]): i for i in range(256)})
    problem = None
    for word, expected_parts in [(b"aaa", [b"aa", b"a"]), (b"aaaa", [b"aa", b"aa"]), (b"aaab", [b"aa", b"ab"])]:
        out = student.call(f"bpe_encode({word!r}, ranks)", (word, ties))
        want = [ties[p] for p in expected_parts]
        if out != want:
            back = {rank: token for token, rank in ties.items()}
            problem = (
                f"with ranks a, b, then aa (256), ab (257), aab (258), bpe_encode({word!r}) returned "
                f"{[back.get(t, t) for t in out]}, expected {expected_parts}: of two equal pairs, join the "
                "leftmost first"
            )
            break
    parts.judge("the same pair twice: the leftmost first", problem)
    return parts.finish()
