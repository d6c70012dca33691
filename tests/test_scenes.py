"""nanovlm/scenes/: the generated dataset is deterministic, complete, and its text matches its pixels."""

import hashlib
import io
import json
import os
import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nanovlm import scenes, vqa

SMALL = scenes.SceneConfig(n_train=60, n_val=20, n_test=20, n_novel=20, seed=3)
TEXT_ONLY = scenes.SceneConfig(n_train=1500, seed=5)  # for build_split: no pixels, so many scenes are cheap


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return scenes.generate(tmp_path_factory.mktemp("scenes"), SMALL, progress=False, workers=2)


@pytest.fixture(scope="module")
def sample():
    return scenes.build_split(TEXT_ONLY, "train")


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _truth(objects: list[dict]) -> Counter:
    return Counter((o["size"], o["color"], o["shape"]) for o in objects)


def _stated(parsed: dict) -> Counter:
    counts = Counter()
    for o in parsed["objects"]:
        counts[(o["size"], o["color"], o["shape"])] += o["count"]
    return counts


def _matching(objects: list[dict], phrase: dict) -> list[dict]:
    """Scene objects that a parsed object phrase could mean."""
    keys = ("size", "color", "shape")
    return [o for o in objects if all(phrase[k] in (None, o[k]) for k in keys)]


def test_generate_is_byte_identical_for_a_seed_whether_serial_or_parallel(dataset, tmp_path):
    again = scenes.generate(tmp_path / "again", SMALL, progress=False, workers=1)
    assert _files(again) == _files(dataset)
    other = scenes.generate(tmp_path / "other", scenes.SceneConfig(n_train=5, n_val=0, n_test=0, n_novel=0, seed=4))
    assert _files(other)["train/000000.png"] != _files(dataset)["train/000000.png"]


def test_generate_skips_a_finished_dataset_and_redoes_an_interrupted_or_changed_one(tmp_path):
    cfg = scenes.SceneConfig(n_train=6, n_val=2, n_test=2, n_novel=2)
    root = scenes.generate(tmp_path, cfg, progress=False, workers=1)
    first = root / "train" / "000000.png"
    stamp = first.stat().st_mtime_ns
    scenes.generate(tmp_path, cfg, progress=False, workers=1)
    assert first.stat().st_mtime_ns == stamp, "a finished dataset with the same config must not be rewritten"
    (root / "done").unlink()  # as if the run had been interrupted
    first.unlink()
    scenes.generate(tmp_path, cfg, progress=False, workers=1)
    assert first.exists() and (root / "done").exists()
    (root / "tokenizer-300.tiktoken").write_text("trained on the old captions")
    scenes.generate(tmp_path, scenes.SceneConfig(n_train=3, n_val=1, n_test=1, n_novel=0), progress=False, workers=1)
    assert not (root / "tokenizer-300.tiktoken").exists(), "a tokenizer of the old captions must not outlive them"
    assert sorted(p.name for p in (root / "train").iterdir()) == ["000000.png", "000001.png", "000002.png"]
    assert not (root / "annotations" / "scenes_novel.json").exists()


def test_canonical_caption_says_where_each_one_of_a_kind_object_is():
    def obj(shape, color, cx, cy):
        bbox = [cx - 4, cy - 4, cx + 4, cy + 4]
        return {"shape": shape, "color": color, "size": "small", "cx": cx, "cy": cy, "bbox": bbox}

    # the 3 x 3 grid's cells on a 64-pixel image: thirds end at 21.3 and 42.7 pixels
    assert scenes.where(obj("circle", "red", 5, 5), 64) == "at the top left"
    assert scenes.where(obj("circle", "red", 32, 32), 64) == "in the middle"
    assert scenes.where(obj("circle", "red", 43, 20), 64) == "at the top right"
    assert scenes.where(obj("circle", "red", 42, 63.9), 64) == "at the bottom"
    assert scenes.where(obj("circle", "red", 10, 16), 32) == "on the left"
    twins = [obj("square", "blue", 8, 50), obj("square", "blue", 56, 50)]  # a group: its count, no place
    caption = scenes.canonical_caption([obj("circle", "red", 56, 8), *twins], 64)
    assert caption == "A small red circle at the top right and two small blue squares."
    caption = scenes.canonical_caption([obj("circle", "red", 56, 8), twins[0], obj("triangle", "green", 30, 50)], 64)
    assert caption == (
        "A small red circle at the top right, a small green triangle at the bottom and a small blue square at "
        "the bottom left. The small red circle is above the small green triangle."
    )
    parsed = scenes.parse_caption(caption)  # the place words are read past, not taken for objects or relations
    assert [(o["color"], o["shape"]) for o in parsed["objects"]] == [("red", "circle"), ("green", "triangle"),
                                                                     ("blue", "square")]  # fmt: skip
    assert [r["relation"] for r in parsed["relations"]] == ["above"]


def test_splits_share_no_image(dataset):
    ids, digests = {}, {}
    for split in scenes.SPLITS:
        coco = json.loads((dataset / "annotations" / f"captions_{split}.json").read_text())
        ids[split] = {im["id"] for im in coco["images"]}
        digests[split] = {
            hashlib.sha256((dataset / split / im["file_name"]).read_bytes()).hexdigest() for im in coco["images"]
        }
        assert len(ids[split]) == scenes.split_sizes(SMALL)[split]
    for a in scenes.SPLITS:
        for b in scenes.SPLITS:
            if a < b:
                assert not ids[a] & ids[b] and not digests[a] & digests[b], (a, b)


def test_novel_pairs_appear_only_in_the_novel_split_and_in_each_of_its_images(dataset):
    held = {tuple(p) for p in SMALL.novel}
    for split in scenes.SPLITS:
        records = json.loads((dataset / "annotations" / f"scenes_{split}.json").read_text())["scenes"]
        for record in records:
            pairs = {(o["color"], o["shape"]) for o in record["objects"]}
            assert bool(pairs & held) == (split == "novel"), (split, record)


def test_coco_captions_json_has_the_contract_layout(dataset):
    coco = json.loads((dataset / "annotations" / "captions_val.json").read_text())
    assert set(coco) == {"info", "licenses", "images", "annotations"}
    assert set(coco["images"][0]) == {"id", "file_name", "width", "height"}
    assert set(coco["annotations"][0]) == {"id", "image_id", "caption"}
    assert len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"])
    assert len(coco["annotations"]) == SMALL.captions_per_image * len(coco["images"])
    assert (dataset / "val" / coco["images"][0]["file_name"]).exists()
    data = json.loads((dataset / "annotations" / "scenes_val.json").read_text())
    assert set(data) == {"scenes"}
    assert set(data["scenes"][0]) == {"image_id", "objects"}
    assert set(data["scenes"][0]["objects"][0]) == {"shape", "color", "size", "cx", "cy", "bbox"}


def test_questions_are_written_in_the_vqa_v2_layout(dataset):
    questions = json.loads((dataset / "annotations" / "vqa_val_questions.json").read_text())
    annotations = json.loads((dataset / "annotations" / "vqa_val_annotations.json").read_text())
    assert set(questions["questions"][0]) == {"image_id", "question", "question_id"}
    first = annotations["annotations"][0]
    assert set(first) == {
        "question_id",
        "image_id",
        "question_type",
        "answer_type",
        "multiple_choice_answer",
        "answers",
    }
    assert [a["answer"] for a in first["answers"]] == [first["multiple_choice_answer"]] * 10
    records, skipped = vqa.read_vqa(*vqa.split_files(dataset, "val"))
    assert not skipped and len(records) == len(questions["questions"])
    types = {(r["question_type"], r["answer_type"]) for r in records}
    assert {("count", "number"), ("existence", "yes/no"), ("colour", "other"), ("relation", "yes/no")} <= types
    assert len({r["question_id"] for r in records}) == len(records)


def test_every_caption_parses_back_to_exactly_the_truth_and_its_relations_hold(sample):
    records, texts, _ = sample
    relations = 0
    for record, caps in zip(records, texts, strict=True):
        objects = record["objects"]
        assert len(caps) >= 5 and caps[0] == scenes.canonical_caption(objects, TEXT_ONLY.image_size)
        for caption in caps:
            parsed = scenes.parse_caption(caption)
            assert parsed["parsed"] and _stated(parsed) == _truth(objects), caption
            for rel in parsed["relations"]:
                subject, obj = parsed["objects"][rel["subject"]], parsed["objects"][rel["object"]]
                (a,), (b,) = _matching(objects, subject), _matching(objects, obj)
                assert scenes.relation_holds(a, rel["relation"], b), caption
                relations += 1
    assert relations > len(records)  # relations are stated often


def _template(caption: str) -> str:
    """Which kind of caption this is, from its shape."""
    if re.search(r"from (left to right|top to bottom)", caption):
        return "ordered"
    if re.match(r"There (is|are) \w+ (object|shape|thing)s?:", caption):
        return "count first"
    if re.search(r"\. The .* the .*\.$", caption):
        return "list then relation"
    if re.search(r"(shown|visible|in the picture|background)\.$", caption):
        return "shown"
    if caption.count(".") == len(_phrases_in(caption)) > 1:
        return "one sentence each"
    if re.search(r" (above|below|over|under|beneath|left of|right of|higher than|lower than) ", caption):
        return "relation first"
    return "prefix"


def _phrases_in(caption: str) -> list[dict]:
    return scenes.parse_caption(caption)["objects"]


def test_captions_vary_in_template_wording_and_order(sample):
    records, texts, _ = sample
    kinds = Counter(_template(c) for caps in texts[:300] for c in caps[1:])
    assert len(kinds) >= 4, kinds
    words = Counter(w for caps in texts[:300] for c in caps for w in re.findall(r"[a-z]+", c.lower()))
    for synonym in ("big", "little", "tiny", "pair", "box", "beneath"):
        assert words[synonym] > 0, synonym
    assert all(len(set(caps)) == len(caps) for caps, r in zip(texts, records, strict=True) if len(r["objects"]) > 1)


def test_parse_caption_tolerates_case_punctuation_digits_and_synonyms():
    parsed = scenes.parse_caption("2 BIG Red balls!!  And a tiny, violet rhombus -- to the LEFT of a little blue box")
    assert parsed["parsed"]
    assert parsed["objects"] == [
        {"count": 2, "size": "large", "color": "red", "shape": "circle"},
        {"count": 1, "size": "small", "color": "purple", "shape": "diamond"},
        {"count": 1, "size": "small", "color": "blue", "shape": "square"},
    ]
    assert parsed["relations"] == [{"subject": 1, "relation": "left of", "object": 2}]
    again = scenes.parse_caption("There's a pair of large green triangles. The triangles are under the small red disk.")
    assert again["objects"][0]["count"] == 2 and again["relations"][0]["relation"] == "below"
    said = scenes.parse_caption("A circle. The circle is big and orange.")
    assert said["objects"] == [{"count": 1, "size": "large", "color": "orange", "shape": "circle"}]
    assert scenes.parse_caption("a pink star")["objects"][0] == {
        "count": 1,
        "size": None,
        "color": "pink",
        "shape": "star",
    }


@pytest.mark.parametrize(
    "junk",
    ["", "hello world", "A picture of things.", "a red thing", "some red circles", "red circles", "a red blue circle"],
)
def test_parse_caption_reports_unparsed_junk(junk):
    assert scenes.parse_caption(junk)["parsed"] is False


def test_objects_stay_inside_the_image_and_barely_overlap(sample):
    records, _, _ = sample
    for record in records:
        objects = record["objects"]
        for o in objects:
            x0, y0, x1, y1 = o["bbox"]
            assert 0 <= x0 < o["cx"] < x1 <= TEXT_ONLY.image_size and 0 <= y0 < o["cy"] < y1 <= TEXT_ONLY.image_size
        for i, a in enumerate(objects):
            for b in objects[i + 1 :]:
                assert scenes.box_iou(a["bbox"], b["bbox"]) <= TEXT_ONLY.max_iou


def test_counting_is_exercised_by_repeated_objects(sample):
    records, _, _ = sample
    multi = [r for r in records if len(r["objects"]) > 1]
    share = sum(max(_truth(r["objects"]).values()) > 1 for r in multi) / len(multi)
    assert 0.25 <= share <= 0.45, share


def test_existence_answers_are_balanced_and_answers_are_single_words(sample):
    _, _, qa = sample
    existence = [q["answer"] for q in qa if q["type"] == "existence"]
    assert 0.4 <= existence.count("yes") / len(existence) <= 0.6
    assert {q["type"] for q in qa} == {"colour", "shape", "count", "existence", "relation"}
    assert all(re.fullmatch(r"[a-z]+", q["answer"]) for q in qa)


def test_questions_are_unambiguous_and_answered_right(sample):
    records, _, qa = sample
    by_id = {r["image_id"]: r["objects"] for r in records}
    for q in qa:
        objects, text = by_id[q["image_id"]], q["question"]
        if q["type"] == "colour":
            (phrase,) = scenes.parse_caption(text)["objects"]
            assert [o["color"] for o in _matching(objects, phrase)] == [q["answer"]], q
        elif q["type"] == "relation" and q["answer"] in ("yes", "no"):
            parsed = scenes.parse_caption(text)
            a, b = (_matching(objects, p) for p in parsed["objects"])
            assert len(a) == len(b) == 1, q
            holds = scenes.relation_holds(a[0], parsed["relations"][0]["relation"], b[0])
            assert holds == (q["answer"] == "yes"), q
        elif q["type"] == "existence":
            (phrase,) = scenes.parse_caption(text)["objects"]
            assert bool(_matching(objects, phrase)) == (q["answer"] == "yes"), q


def test_relation_rule_needs_a_clear_margin_on_the_dominant_axis():
    def obj(cx, cy, size=10.0):
        return {"cx": cx, "cy": cy, "bbox": [cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2]}

    a, b = obj(10, 30), obj(40, 35)
    assert scenes.relation_holds(a, "left of", b) and scenes.relation_holds(b, "right of", a)
    assert not scenes.relation_holds(a, "above", b) and not scenes.relation_holds(a, "right of", b)
    assert scenes.relation_holds(obj(30, 10), "above", obj(33, 40))
    assert not scenes.relation_holds(obj(30, 30), "left of", obj(34, 30))  # 4 px apart: too close to say
    assert not scenes.relation_holds(obj(10, 10), "above", obj(40, 20))  # mostly beside, only a little above
    with pytest.raises(ValueError, match="relation"):
        scenes.relation_holds(a, "near", b)


def test_rendered_pixels_show_each_object_colour_at_its_centre(dataset):
    records = json.loads((dataset / "annotations" / "scenes_train.json").read_text())["scenes"]
    palette = np.array(list(scenes.COLORS.values()), dtype=float)  # (6, 3)
    for record in records:
        image = np.asarray(Image.open(dataset / "train" / f"{record['image_id']:06d}.png"))
        assert image.shape == (64, 64, 3) and (image == scenes.render(record, SMALL)).all()
        for o in record["objects"]:
            pixel = image[int(o["cy"]), int(o["cx"])].astype(float)
            nearest = list(scenes.COLORS)[np.abs(palette - pixel).sum(1).argmin()]
            assert nearest == o["color"], (record["image_id"], o)
        corner = image[:2, :2].reshape(-1, 3)
        if not any(o["bbox"][0] < 3 and o["bbox"][1] < 3 for o in record["objects"]):
            assert corner.min() >= 160  # backgrounds are light, never an object colour


def test_to_image_enlarges_a_scene_for_notebooks():
    scene = scenes.sample_scene(random.Random(0), scenes.SceneConfig(), image_id=7)
    image = scenes.to_image(scene, scale=3)
    assert image.size == (192, 192) and image.mode == "RGB"
    assert (np.asarray(image)[::3, ::3] == scenes.render(scene)).all()
    assert (np.asarray(Image.open(io.BytesIO(scenes.png_bytes(scenes.render(scene))))) == scenes.render(scene)).all()


def test_bad_config_names_the_field():
    with pytest.raises(ValueError, match="SceneConfig.colors"):
        scenes.check_config(scenes.SceneConfig(colors=("red", "teal")))
    with pytest.raises(ValueError, match="SceneConfig.novel"):
        scenes.check_config(scenes.SceneConfig(novel=(("pink", "circle"),)))


def test_questions_do_not_depend_on_string_hashing():
    # Python salts str hashes per process, so anything drawn from a set of strings changes between runs
    code = (
        "import hashlib; from nanovlm import scenes; "
        "_, caps, qa = scenes.build_split(scenes.SceneConfig(n_train=300, seed=5), 'train'); "
        "print(hashlib.md5(repr((caps, qa)).encode()).hexdigest())"
    )
    digests = {
        subprocess.run(
            [sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": seed}, capture_output=True, text=True
        ).stdout
        for seed in ("1", "2", "3")
    }
    assert len(digests) == 1 and "" not in digests
