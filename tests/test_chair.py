"""CHAIR on COCO (nanovlm/chair.py): the categories a caption names, and the hallucination rates, against
values worked out by hand; and the word lists against the real COCO annotations in ../shared/data/coco-sample."""

import json
import math
from pathlib import Path

import pytest

from nanovlm import chair

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-sample" / "annotations"


@pytest.mark.parametrize(
    ("caption", "named"),
    [
        ("A man riding a motorbike down a street.", ["person", "motorcycle"]),  # synonyms
        ("Two dogs and three people on a sofa", ["dog", "person", "couch"]),  # plurals, irregular plurals
        ("Children and women with knives and buses", ["person", "knife", "bus"]),
        ("a hot dog with mustard next to a dog", ["hot dog", "dog"]),  # the longer name first
        ("A teddy bear sitting on a bed", ["teddy bear", "bed"]),
        ("a stop sign near a traffic light and a fire hydrant", ["stop sign", "traffic light", "fire hydrant"]),
        ("a baseball player swings a bat at the ball", ["person", "baseball bat", "sports ball"]),
        ("a man in a baseball uniform on a baseball field", ["person"]),  # phrases that name no object
        ("a woman next to a phone booth", ["person"]),
        ("the toilet seat is up next to a sink", ["toilet", "sink"]),  # a toilet seat is no chair
        ("a couple of zebras on a pizza cutting board", ["zebra", "pizza"]),
        ("an orange cat next to two oranges", ["cat", "orange"]),  # the colour is not the fruit
        ("A Dog. A DOG! dogs", ["dog"]),  # once per caption, any case
        ("an empty room", []),
    ],
)
def test_mentions_read_the_categories_a_caption_names(caption, named):
    assert chair.mentions(caption) == named


def test_chair_rates_equal_a_count_by_hand():
    objects = {1: {"person", "dog"}, 2: {"cat"}, 3: {"car", "person"}}
    captions = {
        1: "a man and his dog with a frisbee",  # frisbee hallucinated: 1 of 3
        2: "a cat on a couch next to a cat",  # couch hallucinated: 1 of 2 (the cat once)
        3: "people near a car",  # none: 0 of 2
    }
    scores = chair.chair(captions, objects)
    assert scores["coco_mentions"] == 7 and scores["coco_hallucinated"] == 2
    assert scores["coco_chair_i"] == pytest.approx(2 / 7)
    assert scores["coco_chair_s"] == pytest.approx(2 / 3)
    assert scores["coco_object_recall"] == pytest.approx(5 / 5)
    assert scores["coco_mean_words"] == pytest.approx((8 + 9 + 4) / 3)


def test_nothing_named_gives_nan_and_a_caption_without_truth_is_refused():
    scores = chair.chair({1: "an empty room"}, {1: set()})
    assert math.isnan(scores["coco_chair_i"]) and scores["coco_chair_s"] == 0
    with pytest.raises(ValueError, match="no truth for 1 captioned images"):
        chair.chair({7: "a dog"}, {1: {"dog"}})


def test_the_truth_is_the_instances_and_what_the_references_name():
    truth = chair.truth({1: {"dog"}}, {1: ["a man walks a dog", "a person with a leash"], 2: ["a red bus"]})
    assert truth == {1: {"dog", "person"}, 2: {"bus"}}


def test_a_damaged_instances_file_is_named(tmp_path):
    bad = tmp_path / "instances_val2017.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="instances_val2017.json: not a COCO instances file"):
        chair.read_instances(bad)
    bad.write_text(json.dumps({"categories": [{"id": 1, "name": "unicorn"}], "annotations": []}))
    with pytest.raises(ValueError, match="categories with no words to find them by: unicorn"):
        chair.read_instances(bad)


@pytest.mark.skipif(not SAMPLE.is_dir(), reason="needs ../shared/data/coco-sample")
def test_every_coco_category_has_words_and_the_humans_rarely_hallucinate():
    instances = chair.read_instances(SAMPLE / "instances_train2017.json")  # refuses a category without words
    data = json.loads((SAMPLE / "captions_train2017.json").read_text())
    categories = {c["name"] for c in json.loads((SAMPLE / "instances_train2017.json").read_text())["categories"]}
    assert categories == set(chair.SYNONYMS)
    references: dict = {}
    for a in data["annotations"]:
        references.setdefault(a["image_id"], []).append(a["caption"])
    humans = chair.human_chair(references, instances)
    # each human caption against the instances and the other four: what one person names that no one else
    # and no box holds is rare, so a word list that misreads common words would show here
    assert humans["coco_chair_i"] < 0.05 and humans["coco_chair_s"] < 0.05
    assert 0.2 < humans["coco_object_recall"] < 0.6


@pytest.mark.skipif(not SAMPLE.is_dir(), reason="needs ../shared/data/coco-sample")
def test_eval_on_a_coco_split_reports_chair_and_the_humans(tmp_path):
    import torch

    from nanovlm.data import PackedSplit, prepare
    from nanovlm.decoder import DecoderConfig
    from nanovlm.evaluate import evaluate_split, score_table
    from nanovlm.projector import ProjectorConfig
    from nanovlm.tokenizer import Tokenizer
    from nanovlm.vit import ViTConfig
    from nanovlm.vlm import VLM, VLMConfig

    (tmp_path / "annotations").symlink_to(SAMPLE)
    (tmp_path / "train2017").symlink_to(SAMPLE.parent / "train2017")
    split = PackedSplit(prepare(tmp_path, "train2017", 32))
    texts = [c for refs in split.captions for c in refs]
    tok = Tokenizer.train(texts, 300)
    torch.manual_seed(0)
    model = VLM(
        VLMConfig(
            vit=ViTConfig(image_size=32, patch_size=8, dim=32, n_layers=1, n_heads=2),
            projector=ProjectorConfig(in_dim=32, out_dim=32, pixel_shuffle=2),
            decoder=DecoderConfig(vocab_size=tok.vocab_size, max_seq_len=24, dim=32, n_layers=1, n_heads=2),
        )
    ).eval()
    summary = evaluate_split(model, tok, split, limit=12, questions=False)
    for who in ("model", "blind", "humans"):
        assert {"coco_chair_i", "coco_chair_s", "coco_object_recall", "coco_mean_words"} <= set(summary[who])
    assert {"bleu4", "cider"} <= set(summary["humans"])
    assert summary["humans"]["cider"] > 0.3  # people agree with each other far more than chance
    assert score_table(summary).splitlines()[0].split() == ["score", "model", "blind", "humans"]
