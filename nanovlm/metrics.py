"""Evaluation metrics: BLEU-1..4 and CIDEr-D (same numbers as pycocoevalcap), VQA accuracy, retrieval
recall@K, and scene-grounded scores (hallucination, counting, spatial relations, attribute binding).

Only the standard library and numpy: copy this file into any project.
"""

import math
import re
from collections import Counter
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import TypeVar

import numpy as np

K = TypeVar("K", bound=Hashable)  # an image id
Tokens = Sequence[str]

# ---------------------------------------------------------------------------------------------------------
# Tokenization
# ---------------------------------------------------------------------------------------------------------


def normalize_caption(text: str) -> list[str]:
    """Lower-case, turn every punctuation mark or symbol into a space, split on whitespace.

    COCO's official scores tokenize with the Java PTB tokenizer of Stanford CoreNLP 3.4.1 (pycocoevalcap's
    `PTBTokenizer`, run with -lowerCase), then drop the tokens . , ? ! : ; - -- ... ' '' ` ``. Ours differs
    where PTB keeps or splits a mark:
      "man's" -> PTB ["man", "'s"], ours ["man", "s"]         (clitics: 's n't 're 'll ...)
      "doesn't" -> PTB ["does", "n't"], ours ["doesn", "t"]
      "t-shirt" -> PTB ["t-shirt"], ours ["t", "shirt"]      (PTB keeps hyphens inside words)
      "3.5", "10:30", "u.s." -> PTB one token, ours two      (PTB keeps marks inside numbers, abbreviations)
      "50%", "$5", "&", "#1" -> PTB keeps % $ & # as tokens, ours drops them
      "(" and ")" -> PTB "-lrb-" and "-rrb-", kept as words (pycocoevalcap's drop list has them upper-case)
    Compared with the jar pycocoevalcap ships on hand-written COCO-style captions (capitals, final periods,
    commas, quotes, "...", "--", "?", ";"): our tokens equal PTB's on captions with none of the marks listed
    above, and differ on captions with one. BLEU and CIDEr on our tokens are therefore close to the official
    numbers, not equal to them.
    """
    return re.sub(r"[^\w\s]", " ", text.lower()).split()


def _ngram_counts(tokens: Tokens, max_n: int) -> Counter:
    """How many times each n-gram (a tuple of n tokens, n = 1..max_n) occurs in `tokens`."""
    return Counter(tuple(tokens[i : i + n]) for n in range(1, max_n + 1) for i in range(len(tokens) - n + 1))


def _check_captions(candidates: Mapping, references: Mapping, metric: str) -> list:
    """The image ids to score, after checking both dicts cover the same ids and hold token lists."""
    if set(candidates) != set(references):
        extra = sorted(map(str, set(candidates) ^ set(references)))
        raise ValueError(f"{metric}: candidates and references must have the same image ids; {extra[:5]} differ")
    if not candidates:
        raise ValueError(f"{metric}: no captions to score; pass at least one image id")
    for image_id, refs in references.items():
        if len(refs) == 0:
            raise ValueError(f"{metric}: image {image_id!r} has no reference caption; give it at least one")
        for caption in [candidates[image_id], *refs]:
            if isinstance(caption, str):
                raise TypeError(
                    f"{metric}: image {image_id!r} has a string caption; pass a token list, "
                    "e.g. normalize_caption(text)"
                )
    return list(references)


# ---------------------------------------------------------------------------------------------------------
# BLEU (Papineni et al. 2002), corpus level, as pycocoevalcap's Bleu(4) computes it
# ---------------------------------------------------------------------------------------------------------

# pycocoevalcap adds these to every numerator / denominator, so that a zero count gives a tiny score
# instead of log(0) or a division by zero. We keep them to get the same numbers.
_TINY = 1e-15
_SMALL = 1e-9


def _bleu_stats(candidate: Tokens, refs: Sequence[Tokens], max_n: int) -> tuple[list[int], list[int], int, int]:
    """Clipped n-gram matches, n-gram totals, candidate length and "closest" reference length of one image."""
    cand_counts = _ngram_counts(candidate, max_n)
    # clip: an n-gram counts at most as often as it occurs in any single reference
    max_ref_counts: Counter = Counter()
    for ref in refs:
        max_ref_counts |= _ngram_counts(ref, max_n)  # | keeps the larger count
    correct = [0] * max_n
    for gram, count in cand_counts.items():
        correct[len(gram) - 1] += min(count, max_ref_counts[gram])
    c = len(candidate)
    guess = [max(0, c - n + 1) for n in range(1, max_n + 1)]  # number of n-grams in the candidate
    # "closest": the reference length nearest to the candidate's, the shorter one on a tie
    r = min((abs(len(ref) - c), len(ref)) for ref in refs)[1]
    return correct, guess, c, r


def _bleu_from_stats(correct: Sequence[int], guess: Sequence[int], c: float, r: float) -> list[float]:
    """BLEU-1..N from match counts: BLEU-n = BP * (p_1 * ... * p_n)^(1/n)."""
    scores, product = [], 1.0
    for n in range(len(correct)):
        product *= (correct[n] + _TINY) / (guess[n] + _SMALL)  # p_n, the clipped n-gram precision
        scores.append(product ** (1.0 / (n + 1)))
    ratio = (c + _TINY) / (r + _SMALL)
    if ratio < 1:  # brevity penalty BP = exp(1 - r/c) for candidates shorter than the references
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


def bleu(
    candidates: Mapping[K, Tokens], references: Mapping[K, Sequence[Tokens]], max_n: int = 4
) -> tuple[list[float], dict[K, list[float]]]:
    """Corpus BLEU-1..max_n and per-image BLEU of tokenized captions: (corpus scores, {image id: scores}).

    Corpus level means the counts are summed over all images before the precisions are formed, so it is
    not the mean of the per-image scores. Equals pycocoevalcap's `Bleu(4).compute_score` (option "closest").
    """
    ids = _check_captions(candidates, references, "bleu")
    per_image, total_correct, total_guess, total_c, total_r = {}, [0] * max_n, [0] * max_n, 0, 0
    for image_id in ids:
        correct, guess, c, r = _bleu_stats(candidates[image_id], references[image_id], max_n)
        per_image[image_id] = _bleu_from_stats(correct, guess, c, r)
        total_correct = [a + b for a, b in zip(total_correct, correct, strict=True)]
        total_guess = [a + b for a, b in zip(total_guess, guess, strict=True)]
        total_c, total_r = total_c + c, total_r + r
    return _bleu_from_stats(total_correct, total_guess, total_c, total_r), per_image


# ---------------------------------------------------------------------------------------------------------
# CIDEr-D (Vedantam et al. 2015), as pycocoevalcap's Cider() computes it
# ---------------------------------------------------------------------------------------------------------


def _tfidf(counts: Counter, doc_freq: Counter, log_num_images: float, max_n: int) -> list[dict]:
    """tf-idf weights, one dict per n: g(w) = count(w) * (log(num images) - log(max(1, df(w))))."""
    vectors = [{} for _ in range(max_n)]
    for gram, count in counts.items():
        vectors[len(gram) - 1][gram] = count * (log_num_images - math.log(max(1.0, doc_freq[gram])))
    return vectors


def _norm(vector: dict) -> float:
    """Euclidean length of a sparse vector."""
    return math.sqrt(sum(v * v for v in vector.values()))


def _cider_similarity(cand: list[dict], ref: list[dict], delta: int, sigma: float) -> float:
    """Mean over n of the clipped cosine similarity times the length penalty exp(-delta^2 / (2 sigma^2))."""
    total = 0.0
    for g_c, g_r in zip(cand, ref, strict=True):
        # the "-D" clipping: a candidate n-gram is credited at most its weight in the reference
        dot = sum(min(w, g_r.get(gram, 0.0)) * g_r.get(gram, 0.0) for gram, w in g_c.items())
        norms = _norm(g_c) * _norm(g_r)
        cosine = dot / norms if norms > 0 else 0.0  # an all-zero vector (e.g. an empty caption) scores 0
        total += cosine * math.exp(-(delta**2) / (2 * sigma**2))
    return total / len(cand)


def cider_d(
    candidates: Mapping[K, Tokens],
    references: Mapping[K, Sequence[Tokens]],
    sigma: float = 6.0,
    max_n: int = 4,
) -> tuple[float, dict[K, float]]:
    """CIDEr-D of tokenized captions: (corpus score = mean of the per-image scores, {image id: score}).

    CIDEr-D(c, S) = 10/|S| * sum over references s of mean over n = 1..4 of
                    exp(-(len c - len s)^2 / (2 sigma^2)) * sum_w min(g_c(w), g_s(w)) g_s(w) / (|g_c| |g_s|)
    with g the tf-idf vectors of `_tfidf`. The document frequency df(w) counts the images whose references
    contain w, so the idf depends on the whole evaluated set: a one-image set scores 0 (log 1 - log 1).
    Equals pycocoevalcap's `Cider().compute_score`. (pycocoevalcap measures length as the number of
    bigrams, len - 1, which gives the same difference except for an empty caption, whose score is 0 anyway.)
    """
    ids = _check_captions(candidates, references, "cider_d")
    ref_counts = {i: [_ngram_counts(ref, max_n) for ref in references[i]] for i in ids}
    doc_freq = Counter(gram for i in ids for gram in set().union(*ref_counts[i]))
    log_num_images = math.log(len(ids))
    per_image = {}
    for i in ids:
        cand = _tfidf(_ngram_counts(candidates[i], max_n), doc_freq, log_num_images, max_n)
        sims = [
            _cider_similarity(
                cand, _tfidf(counts, doc_freq, log_num_images, max_n), len(candidates[i]) - len(ref), sigma
            )
            for counts, ref in zip(ref_counts[i], references[i], strict=True)
        ]
        per_image[i] = 10.0 * sum(sims) / len(sims)
    return sum(per_image.values()) / len(per_image), per_image


def caption_scores(candidates: Mapping[K, str], references: Mapping[K, Sequence[str]]) -> dict[str, float]:
    """BLEU-1..4 and CIDEr-D of raw caption strings, tokenized with `normalize_caption`."""
    cands = {i: normalize_caption(text) for i, text in candidates.items()}
    refs = {i: [normalize_caption(text) for text in texts] for i, texts in references.items()}
    bleus, _ = bleu(cands, refs)
    scores = {f"bleu{n}": b for n, b in enumerate(bleus, start=1)}
    scores["cider"] = cider_d(cands, refs)[0]
    return scores


# ---------------------------------------------------------------------------------------------------------
# Image <-> text retrieval
# ---------------------------------------------------------------------------------------------------------


def retrieval_recall_at_k(
    similarity: np.ndarray, ks: Sequence[int] = (1, 5, 10), targets: np.ndarray | None = None
) -> dict[str, float]:
    """Recall@K: the fraction of queries (rows) whose correct item (column) is among their K most similar.

    The correct items are the diagonal (targets=None), one column per row (targets of shape (Q,)), or any
    marked column (a boolean targets of shape (Q, N), e.g. the 5 captions of an image). A query's rank is
    the number of columns scored strictly higher than its best correct one, so ties count in its favour.
    """
    sim = np.asarray(similarity, dtype=np.float64)  # (Q, N)
    if sim.ndim != 2:
        raise ValueError(f"retrieval_recall_at_k: similarity has shape {sim.shape}; pass a (queries, items) matrix")
    if targets is None:
        if sim.shape[0] != sim.shape[1]:
            raise ValueError(f"retrieval_recall_at_k: similarity {sim.shape} is not square; pass targets")
        correct = np.eye(sim.shape[0], dtype=bool)  # (Q, N)
    else:
        targets = np.asarray(targets)
        if targets.ndim == 1:
            correct = targets[:, None] == np.arange(sim.shape[1])  # (Q, N)
        else:
            correct = targets.astype(bool)  # (Q, N)
    if correct.shape != sim.shape or not correct.any(axis=1).all():
        raise ValueError("retrieval_recall_at_k: every query (row) needs a correct item inside similarity")
    best_correct = np.where(correct, sim, -np.inf).max(axis=1)  # (Q,)
    rank = (sim > best_correct[:, None]).sum(axis=1)  # (Q,) 0 = ranked first
    return {f"r@{k}": float((rank < k).mean()) for k in ks}


# ---------------------------------------------------------------------------------------------------------
# Scene-grounded scores: compare what a caption says (parsed) with the exact scene record
# ---------------------------------------------------------------------------------------------------------


def _fits(mention: dict, obj: dict) -> bool:
    """Whether a truth object has every attribute a mention states (a size or colour left unsaid fits any)."""
    return mention["shape"] == obj["shape"] and all(
        mention[key] is None or mention[key] == obj[key] for key in ("size", "color")
    )


def _max_matching(mentions: list[dict], objects: list[dict]) -> int:
    """Size of the largest one-to-one pairing of mentioned instances with truth objects they fit.

    Kuhn's augmenting paths: each mention takes a free fitting object, or one whose holder can move to
    another; a greedy pairing could waste an object ("a red circle", "a small circle" and two circles).
    """
    holder = [-1] * len(objects)  # holder[j] = index of the mention paired with object j

    def place(m: int, tried: set[int]) -> bool:
        for j, obj in enumerate(objects):
            if j not in tried and _fits(mentions[m], obj):
                tried.add(j)
                if holder[j] == -1 or place(holder[j], tried):
                    holder[j] = m
                    return True
        return False

    return sum(place(m, set()) for m in range(len(mentions)))


def _ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, or nan when there is nothing to measure."""
    return numerator / denominator if denominator else math.nan


def _caption_tallies(scene: dict, parsed: dict, relation_holds: Callable[[dict, str, dict], bool]) -> Counter:
    """The counts behind every grounded score, for one caption of one scene."""
    objects, t = scene["objects"], Counter()
    mentions = parsed["objects"] if parsed["parsed"] else []
    t["unparsed"] = int(not parsed["parsed"])
    t["objects_true"] = len(objects)

    # object precision / recall: the multiset of (size, colour, shape), counts expanded
    instances = [m for m in mentions for _ in range(m["count"])]
    t["objects_mentioned"] = len(instances)
    t["objects_matched"] = _max_matching(instances, objects)

    # hallucination per mention (not expanded: a wrong count is a counting error, not a hallucination)
    colors, shapes = {o["color"] for o in objects}, {o["shape"] for o in objects}
    for m in mentions:
        same_kind = [o for o in objects if _fits({**m, "size": None}, o)]  # same colour (if said) and shape
        t["mentions"] += 1
        t["hallucinated"] += not same_kind
        if m["color"] is not None and m["shape"] in shapes:
            t["color_halluc_n"] += 1
            t["color_halluc"] += not same_kind
            # binding error: the colour and the shape are both in the image, just not on the same object
            t["binding_errors"] += not same_kind and m["color"] in colors
        if m["size"] is not None and same_kind:
            t["size_halluc_n"] += 1
            t["size_halluc"] += not any(o["size"] == m["size"] for o in same_kind)
    t["captions_hallucinating"] = int(t["hallucinated"] > 0)

    # counting: every group of >= 2 identical objects must be named with its exact number, by a mention
    # that fits exactly that group ("two circles" is wrong when there are two red and one blue circle)
    groups = Counter((o["size"], o["color"], o["shape"]) for o in objects)
    for (size, color, shape), n in groups.items():
        if n >= 2:
            group = {"size": size, "color": color, "shape": shape}
            t["count_n"] += 1
            t["count_correct"] += any(
                _fits(m, group) and m["count"] == n == sum(_fits(m, o) for o in objects) for m in mentions
            )

    # spatial relations: resolve both sides to the truth objects they fit; correct if any pair of distinct
    # objects satisfies the relation (a description may fit several objects, and any of them may be meant)
    for rel in parsed["relations"] if parsed["parsed"] else []:
        t["relations_stated"] += 1
        subjects = [o for o in objects if _fits(mentions[rel["subject"]], o)]
        others = [o for o in objects if _fits(mentions[rel["object"]], o)]
        if subjects and others:
            t["relation_n"] += 1
            t["relation_correct"] += any(
                a is not b and relation_holds(a, rel["relation"], b) for a in subjects for b in others
            )
    return t


def grounded_scores(
    scenes: Sequence[dict], parsed: Sequence[dict], relation_holds: Callable[[dict, str, dict], bool]
) -> dict[str, float]:
    """Scores of captions against exact scene records, micro-averaged over all captions.

    scenes[i] is a scene record and parsed[i] the `scenes.parse_caption` output of a caption of that scene;
    relation_holds is `scenes.relation_holds`. A caption that failed to parse (parsed=False) mentions
    nothing: it lowers recall and counting, and is reported in `unparsed`, never dropped. Rates with nothing
    to measure are nan. Keys:
      object_precision, object_recall, object_f1   one-to-one matching of the mentioned instances ("two
          red circles" are 2) with truth objects; a size or colour left unsaid fits any.
          F1 = 2 matched / (mentioned + true)
      chair_i   mentions whose (colour, shape) is in no object / mentions                      (CHAIR_i)
      chair_s   parsed captions with at least one such mention / parsed captions              (CHAIR_s)
      color_halluc   mentions whose shape is present but not in the stated colour / such mentions
      size_halluc    mentions whose (colour, shape) is present but not in the stated size / such mentions
      binding_errors   mentions of an absent (colour, shape) whose colour and shape are both present on
          other objects, i.e. attributes swapped between objects (a subset of the chair_i mentions)
      count_acc      groups of >= 2 identical objects whose exact number the caption states / groups
      relation_acc   stated relations that hold / stated relations whose both sides fit a truth object
      counts: captions, unparsed, objects_true, objects_mentioned, objects_matched, mentions, count_n,
          relation_n, relations_stated, color_halluc_n, size_halluc_n
    """
    if len(scenes) != len(parsed):
        raise ValueError(
            f"grounded_scores: got {len(scenes)} scenes and {len(parsed)} parsed captions; "
            "pass one scene record per caption (repeat a scene for each of its captions)"
        )
    t = Counter()
    for scene, caption in zip(scenes, parsed, strict=True):
        t.update(_caption_tallies(scene, caption, relation_holds))
    captions_parsed = len(parsed) - t["unparsed"]
    scores = {
        "captions": len(parsed),
        "unparsed": t["unparsed"],
        "object_precision": _ratio(t["objects_matched"], t["objects_mentioned"]),
        "object_recall": _ratio(t["objects_matched"], t["objects_true"]),
        "object_f1": _ratio(2 * t["objects_matched"], t["objects_mentioned"] + t["objects_true"]),
        "chair_i": _ratio(t["hallucinated"], t["mentions"]),
        "chair_s": _ratio(t["captions_hallucinating"], captions_parsed),
        "color_halluc": _ratio(t["color_halluc"], t["color_halluc_n"]),
        "size_halluc": _ratio(t["size_halluc"], t["size_halluc_n"]),
        "binding_errors": t["binding_errors"],
        "count_acc": _ratio(t["count_correct"], t["count_n"]),
        "relation_acc": _ratio(t["relation_correct"], t["relation_n"]),
    }
    counts = "objects_true objects_mentioned objects_matched mentions count_n relation_n relations_stated"
    return scores | {key: t[key] for key in (counts + " color_halluc_n size_halluc_n").split()}
