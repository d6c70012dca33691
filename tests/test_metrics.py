"""Tests for nanovlm/metrics.py: caption scores against pycocoevalcap, VQA, retrieval, grounded scores."""

import math
import random
import shutil

import numpy as np
import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

from nanovlm.metrics import (
    bleu,
    caption_scores,
    cider_d,
    grounded_scores,
    normalize_caption,
    retrieval_recall_at_k,
)

# ---------------------------------------------------------------------------------------------------------
# BLEU and CIDEr-D: the same numbers as pycocoevalcap
# ---------------------------------------------------------------------------------------------------------

VOCAB = "a the red cat dog on sits mat".split()  # small, so that n-grams repeat across captions


def random_corpus(seed: int, num_images: int = 40) -> tuple[dict, dict]:
    """Token-list candidates and 1-5 references per image, 1-15 words each, from a small vocabulary."""
    rng = random.Random(seed)

    def caption() -> list[str]:
        return [rng.choice(VOCAB) for _ in range(rng.randint(1, 15))]

    candidates = {i: caption() for i in range(num_images)}
    references = {i: [caption() for _ in range(rng.randint(1, 5))] for i in range(num_images)}
    return candidates, references


def pycoco_scores(candidates: dict, references: dict) -> tuple:
    """pycocoevalcap's BLEU and CIDEr-D of the same captions, given as space-joined strings."""
    res = {i: [" ".join(tokens)] for i, tokens in candidates.items()}
    gts = {i: [" ".join(tokens) for tokens in refs] for i, refs in references.items()}
    bleus, bleu_per_image = Bleu(4).compute_score(gts, res, verbose=0)
    cider, cider_per_image = Cider().compute_score(gts, res)
    ids = list(gts)  # pycocoevalcap's per-image lists follow the order of the references' keys
    bleu_per_image = {i: [bleu_per_image[n][k] for n in range(4)] for k, i in enumerate(ids)}
    return bleus, bleu_per_image, cider, dict(zip(ids, cider_per_image, strict=True))


def assert_same_as_pycoco(candidates: dict, references: dict) -> None:
    """Corpus and per-image BLEU-1..4 and CIDEr-D equal pycocoevalcap's to 1e-6."""
    want_bleu, want_bleu_per_image, want_cider, want_cider_per_image = pycoco_scores(candidates, references)
    got_bleu, got_bleu_per_image = bleu(candidates, references)
    got_cider, got_cider_per_image = cider_d(candidates, references)
    assert got_bleu == pytest.approx(want_bleu, abs=1e-6)
    assert got_cider == pytest.approx(want_cider, abs=1e-6)
    for i in references:
        assert got_bleu_per_image[i] == pytest.approx(want_bleu_per_image[i], abs=1e-6)
        assert got_cider_per_image[i] == pytest.approx(want_cider_per_image[i], abs=1e-6)


@pytest.mark.parametrize("seed", range(10))
def test_bleu_and_cider_d_match_pycocoevalcap_on_random_captions(seed):
    assert_same_as_pycoco(*random_corpus(seed))  # 10 x 40 = 400 candidate / reference sets


EDGE_CASES = {
    "empty candidate": ({1: "", 2: "a cat"}, {1: ["a cat sits", "the dog"], 2: ["a cat"]}),
    "all candidates empty": ({1: "", 2: ""}, {1: ["a cat sits"], 2: ["a dog"]}),
    "single reference": ({1: "a red cat", 2: "the dog sits"}, {1: ["a cat"], 2: ["a dog sits on a mat"]}),
    "repeated words": ({1: "the the the the", 2: "dog"}, {1: ["the cat on the mat"], 2: ["a dog runs"]}),
    "identical to a reference": (
        {1: "a cat on the mat", 2: "a dog"},
        {1: ["a cat on the mat", "a red mat"], 2: ["a dog runs", "dog"]},
    ),
    "one empty reference": ({1: "a cat", 2: "a dog"}, {1: [""], 2: ["a dog"]}),
    "one image (CIDEr-D is 0)": ({1: "a cat"}, {1: ["a cat", "a red cat"]}),
}


@pytest.mark.parametrize("name", EDGE_CASES)
def test_bleu_and_cider_d_match_pycocoevalcap_on_edge_cases(name):
    candidates, references = EDGE_CASES[name]
    assert_same_as_pycoco(
        {i: text.split() for i, text in candidates.items()},
        {i: [text.split() for text in texts] for i, texts in references.items()},
    )


def test_cider_d_of_only_empty_references_is_zero():
    # pycocoevalcap crashes here (max() of an empty document frequency), so the value is worked out by hand:
    # no reference n-gram means every reference vector is zero, and so is every similarity.
    score, per_image = cider_d({1: ["a", "cat"], 2: ["a", "dog"]}, {1: [[]], 2: [[]]})
    assert score == 0.0 and per_image == {1: 0.0, 2: 0.0}


def test_bleu_by_hand_for_a_short_candidate():
    # "a cat sits" against "a cat sits on": every n-gram matches (p_n = 1) but c = 3 < r = 4, so
    # BLEU-n = exp(1 - 4/3) for n <= 3; the candidate has no 4-gram, so p_4 = 1e-15 / 1e-9 = 1e-6.
    scores, _ = bleu({0: "a cat sits".split()}, {0: ["a cat sits on".split()]})
    penalty = math.exp(1 - 4 / 3)
    assert scores[:3] == pytest.approx([penalty] * 3, rel=1e-6)
    assert scores[3] == pytest.approx(penalty * 1e-6 ** (1 / 4), rel=1e-6)


def test_caption_scores_of_perfect_captions():
    refs = {1: ["A red cat sits on the mat."], 2: ["Two dogs play in the park."]}
    scores = caption_scores({1: "a red cat sits on the mat", 2: "two dogs play in the park"}, refs)
    assert scores["bleu4"] == pytest.approx(1.0, abs=1e-6)
    # the two images share the word "the" (idf 0) and nothing else: cosine 1 per n, times 10
    assert scores["cider"] == pytest.approx(10.0)


def test_caption_metrics_reject_mismatched_ids_and_untokenized_captions():
    with pytest.raises(ValueError, match="same image ids"):
        bleu({1: ["a"]}, {2: [["a"]]})
    with pytest.raises(ValueError, match="no reference"):
        cider_d({1: ["a"]}, {1: []})
    with pytest.raises(TypeError, match="normalize_caption"):
        bleu({1: "a cat"}, {1: [["a", "cat"]]})


# ---------------------------------------------------------------------------------------------------------
# Tokenization
# ---------------------------------------------------------------------------------------------------------


def test_normalize_caption_lowercases_and_splits_off_punctuation():
    assert normalize_caption("A man's T-shirt, (red)...  ") == ["a", "man", "s", "t", "shirt", "red"]
    assert normalize_caption("") == []


PLAIN_CAPTIONS = [
    "A man riding a wave on top of a surfboard.",
    "A kitchen with a stove, a sink, and a refrigerator.",
    'A sign that says "stop" on a pole?',
    "A cat -- very fat -- sitting on a couch; it sleeps!",
]


@pytest.mark.skipif(shutil.which("java") is None, reason="the PTB tokenizer needs java")
def test_normalize_caption_equals_ptb_tokenizer_on_captions_without_clitics_or_hyphens():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    ptb = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(PLAIN_CAPTIONS)})
    assert [normalize_caption(c) for c in PLAIN_CAPTIONS] == [ptb[i][0].split() for i in range(4)]


# ---------------------------------------------------------------------------------------------------------
# Retrieval
# ---------------------------------------------------------------------------------------------------------


def test_retrieval_recall_at_k_on_the_diagonal():
    similarity = np.array([[0.9, 0.1, 0.0], [0.8, 0.5, 0.1], [0.7, 0.6, 0.2]])  # correct ranks: 1, 2, 3
    assert retrieval_recall_at_k(similarity, ks=(1, 2, 3)) == {"r@1": 1 / 3, "r@2": 2 / 3, "r@3": 1.0}


def test_retrieval_recall_at_k_with_target_indices_masks_and_ties():
    similarity = np.array([[0.1, 0.9, 0.3], [0.5, 0.5, 0.0]])  # (2 queries, 3 items)
    # row 0's target (item 2) is second; row 1's target (item 0) ties with item 1 and counts as first
    assert retrieval_recall_at_k(similarity, ks=(1, 2), targets=np.array([2, 0])) == {"r@1": 0.5, "r@2": 1.0}
    several_correct = np.array([[True, False, True], [False, False, True]])  # best correct: 0.3 and 0.0
    assert retrieval_recall_at_k(similarity, ks=(1, 3), targets=several_correct) == {"r@1": 0.0, "r@3": 1.0}
    with pytest.raises(ValueError, match="not square"):
        retrieval_recall_at_k(similarity)
    with pytest.raises(ValueError, match="every query"):
        retrieval_recall_at_k(similarity, targets=np.array([0]))  # one target for two queries


# ---------------------------------------------------------------------------------------------------------
# Scene-grounded scores, on hand-made scenes and parsed captions
# ---------------------------------------------------------------------------------------------------------


def relation_holds(a: dict, relation: str, b: dict) -> bool:
    """A stand-in for scenes.relation_holds: compare centres (y grows downwards)."""
    return {
        "left of": a["cx"] < b["cx"],
        "right of": a["cx"] > b["cx"],
        "above": a["cy"] < b["cy"],
        "below": a["cy"] > b["cy"],
    }[relation]


def obj(size: str, color: str, shape: str, cx: float, cy: float = 32.0) -> dict:
    return {"shape": shape, "color": color, "size": size, "cx": cx, "cy": cy, "bbox": [cx - 4, cy - 4, cx + 4, cy + 4]}


def scene(*objects: dict) -> dict:
    return {"image_id": 0, "objects": list(objects)}


def said(shape: str, color: str | None = None, size: str | None = None, count: int = 1) -> dict:
    return {"count": count, "size": size, "color": color, "shape": shape}


def caption(*mentions: dict, relations: tuple = ()) -> dict:
    rels = [{"subject": s, "relation": r, "object": o} for s, r, o in relations]
    return {"parsed": True, "objects": list(mentions), "relations": rels}


UNPARSED = {"parsed": False, "objects": [], "relations": []}
RED_CIRCLE_LEFT_OF_BLUE_SQUARE = scene(obj("small", "red", "circle", 10), obj("large", "blue", "square", 40))
PERFECT = caption(said("circle", "red", "small"), said("square", "blue", "large"), relations=[(0, "left of", 1)])


def score(scenes: list[dict], parsed: list[dict]) -> dict:
    return grounded_scores(scenes, parsed, relation_holds=relation_holds)


def test_a_perfect_caption_has_f1_one_and_no_hallucination():
    s = score([RED_CIRCLE_LEFT_OF_BLUE_SQUARE], [PERFECT])
    assert (s["object_precision"], s["object_recall"], s["object_f1"]) == (1.0, 1.0, 1.0)
    assert (s["chair_i"], s["chair_s"], s["binding_errors"], s["unparsed"]) == (0.0, 0.0, 0, 0)
    assert (s["relation_acc"], s["relation_n"], s["relations_stated"]) == (1.0, 1, 1)
    assert s["count_n"] == 0 and math.isnan(s["count_acc"])  # no repeated objects: nothing to count


def test_a_hallucinated_object():
    s = score([RED_CIRCLE_LEFT_OF_BLUE_SQUARE], [caption(said("circle", "red"), said("triangle", "green"))])
    assert (s["object_precision"], s["object_recall"], s["object_f1"]) == (0.5, 0.5, 0.5)
    assert (s["chair_i"], s["chair_s"], s["mentions"]) == (0.5, 1.0, 2)
    assert (s["color_halluc"], s["color_halluc_n"], s["binding_errors"]) == (0.0, 1, 0)  # no triangle at all


def test_a_wrong_size_is_an_attribute_hallucination_not_an_object_one():
    s = score([RED_CIRCLE_LEFT_OF_BLUE_SQUARE], [caption(said("circle", "red", "large"))])
    assert (s["chair_i"], s["size_halluc"], s["size_halluc_n"]) == (0.0, 1.0, 1)
    assert (s["object_precision"], s["object_recall"]) == (0.0, 0.0)


def test_counts_must_name_exactly_the_repeated_group():
    three_circles = scene(*[obj("small", "red", "circle", x) for x in (10, 20, 30)], obj("large", "red", "circle", 50))
    s = score(
        [three_circles] * 3,
        [
            caption(said("circle", "red", "small", count=3)),  # right
            caption(said("circle", "red", "small", count=2)),  # wrong number
            caption(said("circle", "red", count=3)),  # there are 4 red circles: this is not the group
        ],
    )
    assert (s["count_acc"], s["count_n"]) == (1 / 3, 3)
    # the "two" caption: 2 of 4 objects found, both right
    assert s["objects_mentioned"] == 3 + 2 + 3 and s["objects_matched"] == 3 + 2 + 3


def test_a_wrong_relation_and_one_that_cannot_be_resolved():
    wrong = caption(
        said("square", "blue"), said("circle", "red"), said("triangle", "green"),
        relations=[(0, "left of", 1), (1, "above", 2)],
    )  # fmt: skip
    s = score([RED_CIRCLE_LEFT_OF_BLUE_SQUARE], [wrong])
    assert (s["relation_acc"], s["relation_n"], s["relations_stated"]) == (0.0, 1, 2)


def test_a_relation_holds_if_any_fitting_pair_satisfies_it():
    two_circles = scene(
        obj("small", "red", "circle", 10), obj("small", "blue", "square", 30), obj("small", "red", "circle", 50)
    )
    left = caption(said("circle", "red"), said("square"), relations=[(0, "left of", 1)])
    right = caption(said("circle", "red"), said("square"), relations=[(0, "right of", 1)])
    assert score([two_circles] * 2, [left, right])["relation_acc"] == 1.0


def test_swapped_colours_are_binding_errors():
    s = score([RED_CIRCLE_LEFT_OF_BLUE_SQUARE], [caption(said("square", "red"), said("circle", "blue"))])
    assert (s["binding_errors"], s["chair_i"], s["color_halluc"], s["object_f1"]) == (2, 1.0, 1.0, 0.0)


def test_unsaid_attributes_fit_any_object_one_to_one():
    # "a red circle" could take the small red circle and leave "a small circle" nothing: matching avoids it
    two_red_circles = scene(obj("small", "red", "circle", 10), obj("large", "red", "circle", 40))
    s = score([two_red_circles], [caption(said("circle", "red"), said("circle", size="small"))])
    assert (s["object_precision"], s["object_recall"]) == (1.0, 1.0)


def test_unparsed_captions_are_counted_and_lower_recall():
    s = score([RED_CIRCLE_LEFT_OF_BLUE_SQUARE] * 2, [PERFECT, UNPARSED])
    assert (s["captions"], s["unparsed"], s["objects_true"], s["objects_mentioned"]) == (2, 1, 4, 2)
    assert (s["object_precision"], s["object_recall"], s["object_f1"]) == (1.0, 0.5, pytest.approx(2 / 3))
    assert s["chair_s"] == 0.0  # over the one parsed caption
    with pytest.raises(ValueError, match="one scene record per caption"):
        score([RED_CIRCLE_LEFT_OF_BLUE_SQUARE], [PERFECT, PERFECT])
