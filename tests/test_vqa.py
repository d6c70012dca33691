"""Tests for nanovlm/vqa.py: the VQA v2 layout, the official answer normalisation and accuracy, the prior."""

import json

import pytest

from nanovlm.vqa import accuracy, answer_prior, normalize, predict_prior, read_vqa, write_vqa


def humans(answer: str, k: int, n: int = 10) -> list[str]:
    """n human answers of which k are `answer` and the rest an answer nobody predicts."""
    return [answer] * k + ["zebra"] * (n - k)


def record(qid, answers: list[str], answer_type: str = "other", question_type: str = "what") -> dict:
    """A record as read_vqa returns it, asked about image qid * 10."""
    return {
        "question_id": qid,
        "image_id": qid * 10,
        "question": f"Question {qid}?",
        "answers": answers,
        "answer": answers[0],
        "answer_type": answer_type,
        "question_type": question_type,
    }


# ---------------------------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, normal",
    [
        ("Yes", "yes"),  # case
        ("  red \t and\nblue ", "red and blue"),  # tabs and newlines are spaces; outer and repeated ones go
        ("red, white", "red white"),  # a mark that touches a space is deleted ...
        ("red,white", "red white"),  # ... one that touches none becomes a space
        ("t-shirt", "t shirt"),
        ("yes!", "yes"),
        ("red, white,blue", "red whiteblue"),  # judged per mark over the whole text: every comma is deleted
        ("1,000", "1000"),  # a comma between digits: every mark is deleted
        ("1,000 (about)", "1000 about"),
        ("2.5", "2.5"),  # a period before a digit stays, any other goes
        ("yes.", "yes"),
        ("a.m.", "am"),
        ("10:30", "10:30"),  # the colon and the apostrophe are not punctuation here
        ("man's", "man's"),
        ("Two", "2"),  # number words zero..ten, and none
        ("none", "0"),
        ("ten", "10"),
        ("eleven", "eleven"),
        ("the red one", "red 1"),  # articles
        ("an apple", "apple"),
        ("a", ""),
        ("theater", "theater"),
        ("dont", "don't"),  # contractions get their apostrophe back
        ("isnt", "isn't"),
        ("couldnt've", "couldn't've"),
        ("couldn'tve", "couldn't've"),
        ("couldntve", "couldntve"),  # two apostrophes missing: left alone, as officially
        ("Im", "im"),  # the official table's "Im" never matches a lower-cased word
        ("somebody'd", "somebodyd"),  # the official table's entry that runs the wrong way
        ("The Two DOGS!", "2 dogs"),
    ],
)
def test_normalize_follows_the_official_rules(raw, normal):
    assert normalize(raw) == normal


def test_normalize_removes_at_most_32_periods_like_the_official_code():
    assert normalize("." * 40 + "x") == "." * 8 + "x"


# ---------------------------------------------------------------------------------------------------------
# Accuracy
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_accuracy_averages_over_leaving_each_human_out(k, expected):
    # by hand: the k subsets that leave out a matching human hold k-1 matches, the other 10-k hold k
    assert (k * min((k - 1) / 3, 1) + (10 - k) * min(k / 3, 1)) / 10 == pytest.approx(expected)
    assert accuracy("yes", humans("yes", k)) == pytest.approx(expected)


def test_accuracy_with_fewer_than_ten_humans():
    assert accuracy("yes", ["yes", "no", "no"]) == pytest.approx((1 * 0 + 2 * 1 / 3) / 3)
    assert accuracy("no", ["yes", "no", "no"]) == pytest.approx((2 * 1 / 3 + 1 * 2 / 3) / 3)
    assert accuracy("yes", ["yes"]) == 0.0  # leaving the only human out leaves nobody to agree with


@pytest.mark.parametrize(
    "prediction, human",
    [
        ("Yes", "yes"),
        (" yes\n", "yes"),
        ("red, white", "red white"),
        ("red,white", "red white"),
        ("1,000", "1000"),
        ("2.5", "2.5"),
        ("Two.", "2"),
        ("none", "0"),
        ("the dog", "dog"),
        ("dont", "don't"),
        ("2", "two"),  # the humans' answers are normalised too
        ("dog", "A dog."),
    ],
)
def test_accuracy_normalises_when_the_humans_disagree(prediction, human):
    assert accuracy(prediction, humans(human, 2)) == pytest.approx(0.6)


@pytest.mark.parametrize("prediction, human", [("2.5", "25"), ("t-shirt", "tshirt"), ("couldntve", "couldn't've")])
def test_accuracy_keeps_apart_what_normalisation_keeps_apart(prediction, human):
    assert accuracy(prediction, humans(human, 3)) == 0.0


def test_accuracy_only_cleans_whitespace_when_all_humans_agree():
    assert accuracy(" black\n", ["black"] * 10) == 1.0
    assert accuracy("Black.", ["black"] * 10) == 0.0
    assert accuracy("black", ["Black"] * 10) == 0.0


def test_accuracy_needs_human_answers():
    with pytest.raises(ValueError, match="no human answers"):
        accuracy("yes", [])


def test_answer_prior_takes_the_most_common_answer_per_question_type():
    pairs = [("how many", "2"), ("how many", "3"), ("how many", "2"), ("what color is the", "red")]
    pairs += [("what color is the", "blue"), ("what color is the", "red")] + [("is the", "yes")] * 3
    pairs += [("is the", "no")]
    train = [record(i, [a], question_type=t) for i, (t, a) in enumerate(pairs)]
    prior = answer_prior(train)
    assert prior == {"how many": "2", "what color is the": "red", "is the": "yes", None: "yes"}

    val = [record(100, ["3"], question_type="how many"), record(101, ["tennis"], question_type="what sport")]
    assert predict_prior(prior, val) == ["2", "yes"]  # an unseen type gets the overall answer


def test_answer_prior_breaks_ties_by_first_seen():
    train = [record(1, ["b"]), record(2, ["a"])]
    assert answer_prior(train) == {"what": "b", None: "b"}


def test_answer_prior_needs_annotated_records():
    with pytest.raises(ValueError, match="question_id 1"):
        answer_prior([record(1, ["yes"]) | {"answer": None}])


# ---------------------------------------------------------------------------------------------------------
# Reading and writing the layout
# ---------------------------------------------------------------------------------------------------------


def question(qid, image_id: int = 7, text: str = "What is it?") -> dict:
    return {"image_id": image_id, "question": text, "question_id": qid}


def annotation(qid, image_id: int = 7, answers: tuple = ("cat",) * 10) -> dict:
    return {
        "question_id": qid,
        "image_id": image_id,
        "question_type": "what is",
        "answer_type": "other",
        "multiple_choice_answer": answers[0] if answers else "",
        "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i} for i, a in enumerate(answers, 1)],
    }


def write_files(tmp_path, questions: list, annotations: list | None = None):
    """The two files of a split in tmp_path (with the extra keys VQA v2 has), as (questions, annotations) paths."""
    q_path, a_path = tmp_path / "questions.json", tmp_path / "annotations.json"
    q_path.write_text(json.dumps({"info": {}, "questions": questions}))
    a_path.write_text(json.dumps({"info": {}, "annotations": annotations or []}))
    return q_path, a_path


def test_write_then_read_gives_the_records_back(tmp_path):
    records = [
        record(1, humans("yes", 4), "yes/no", "is the"),
        record(2, ["2", "2", "3"], "number", "how many") | {"question": "¿Cuántos gatos hay?"},
    ]
    q_path, a_path = tmp_path / "split" / "questions.json", tmp_path / "split" / "annotations.json"
    write_vqa(records, q_path, a_path)
    assert read_vqa(q_path, a_path) == (records, [])
    written = json.loads(a_path.read_text(encoding="utf-8"))["annotations"]
    assert [a["answer_id"] for a in written[1]["answers"]] == [1, 2, 3]  # humans told apart as in VQA v2
    assert sorted(p.name for p in q_path.parent.iterdir()) == ["annotations.json", "questions.json"]  # no temp files

    write_vqa(records, q_path)  # questions only, as for a test split
    unanswered = dict.fromkeys(("answers", "answer", "answer_type", "question_type"))
    assert read_vqa(q_path) == ([r | unanswered for r in records], [])


@pytest.mark.parametrize(
    "change, message",
    [
        ({"question": "  "}, "empty question"),
        ({"answers": []}, "answers"),
        ({"answer_type": None}, "answer_type"),
        ({"question_id": True}, "question_id"),
    ],
)
def test_write_refuses_what_would_not_read_back(tmp_path, change, message):
    records = [record(1, ["yes"]) | change]
    with pytest.raises(ValueError, match=message):
        write_vqa(records, tmp_path / "q.json", tmp_path / "a.json")
    assert not (tmp_path / "q.json").exists()


def test_write_refuses_a_repeated_question_id(tmp_path):
    with pytest.raises(ValueError, match="question_id 1 occurs more than once"):
        write_vqa([record(1, ["yes"]), record(1, ["no"])], tmp_path / "q.json")


def test_read_reports_every_skipped_item(tmp_path):
    questions = [question(1), question(2, text="  "), question(3), question(4)]
    annotations = [annotation(1), annotation(2), annotation(4, answers=()), annotation(5)]
    q_path, a_path = write_files(tmp_path, questions, annotations)
    records, skipped = read_vqa(q_path, a_path)
    assert [r["question_id"] for r in records] == [1]
    assert records[0]["answers"] == ["cat"] * 10 and records[0]["answer"] == "cat"
    expected = [
        ("questions.json", "question_id 2", "empty question"),
        ("annotations.json", "question_id 3", "no annotation"),
        ("annotations.json", "question_id 4", "no human answers"),
        ("annotations.json", "question_id 5", "not asked"),
    ]
    assert len(skipped) == len(expected)
    for message, words in zip(skipped, expected, strict=True):
        assert all(w in message for w in words), message

    records, skipped = read_vqa(q_path)  # without annotations only the empty question is skipped
    assert [r["question_id"] for r in records] == [1, 3, 4] and records[0]["answers"] is None
    assert len(skipped) == 1 and "question_id 2" in skipped[0]


def test_read_names_a_missing_file(tmp_path):
    q_path, _ = write_files(tmp_path, [question(1)])
    with pytest.raises(FileNotFoundError, match="missing.json"):
        read_vqa(tmp_path / "missing.json")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        read_vqa(q_path, tmp_path / "missing.json")


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"questions": ["caf\xe9"]}', "not UTF-8"),
        (b'{"questions": [', "not valid JSON"),
        (b"", "empty"),
        (b'{"qs": []}', "'questions'"),
    ],
)
def test_read_names_a_damaged_questions_file(tmp_path, content, message):
    q_path = tmp_path / "questions.json"
    q_path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as error:
        read_vqa(q_path)
    assert "questions.json" in str(error.value)


def test_read_names_an_annotations_file_without_its_list(tmp_path):
    q_path, a_path = write_files(tmp_path, [question(1)])
    a_path.write_text(json.dumps({"annos": []}))
    with pytest.raises(ValueError, match="annotations.json.*'annotations'"):
        read_vqa(q_path, a_path)


@pytest.mark.parametrize(
    "field, value",
    [("question_id", [1]), ("image_id", None), ("question", 5)],
)
def test_read_refuses_a_question_field_of_the_wrong_type(tmp_path, field, value):
    q_path, _ = write_files(tmp_path, [question(1) | {field: value}])
    with pytest.raises(ValueError, match=f"questions.json.*{field}"):
        read_vqa(q_path)


@pytest.mark.parametrize(
    "field, value",
    [
        ("answers", "cat"),
        ("answers", [{"ans": "cat"}]),
        ("answers", ["cat"]),
        ("multiple_choice_answer", 3),
        ("answer_type", None),
        ("question_type", 7),
    ],
)
def test_read_refuses_an_annotation_field_of_the_wrong_type(tmp_path, field, value):
    q_path, a_path = write_files(tmp_path, [question(1)], [annotation(1) | {field: value}])
    with pytest.raises(ValueError, match=f"annotations.json: question_id 1 has {field}"):
        read_vqa(q_path, a_path)


def test_read_refuses_a_repeated_question_id(tmp_path):
    q_path, a_path = write_files(tmp_path, [question(1), question(1)])
    with pytest.raises(ValueError, match="questions.json: question_id 1 occurs more than once"):
        read_vqa(q_path)
    q_path, a_path = write_files(tmp_path, [question(1)], [annotation(1), annotation(1)])
    with pytest.raises(ValueError, match="annotations.json: question_id 1 is annotated more than once"):
        read_vqa(q_path, a_path)


def test_read_refuses_an_annotation_about_another_image(tmp_path):
    q_path, a_path = write_files(tmp_path, [question(1, image_id=7)], [annotation(1, image_id=8)])
    with pytest.raises(ValueError, match="annotations.json: question_id 1 is annotated for image_id 8"):
        read_vqa(q_path, a_path)
