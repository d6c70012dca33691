"""VQA v2: read and write its question and annotation files, and score answers as the official evaluation does.

The layout is one pair of JSON files per split (other top-level keys, such as "info", are ignored):

    questions.json    {"questions": [{"image_id": 42, "question": "What color is the bus?", "question_id": 42000}]}
    annotations.json  {"annotations": [{"question_id": 42000, "image_id": 42,
                                        "question_type": "what color is the", "answer_type": "other",
                                        "multiple_choice_answer": "red",
                                        "answers": [{"answer": "red", "answer_confidence": "yes", "answer_id": 1},
                                                    ... one per human: ten in VQA v2]}]}

A predicted answer p is scored against the n human answers h_1 .. h_n of its question:

    acc(p) = 1/n * sum over i = 1..n of  min(1, #{j != i : h_j = p} / 3)

"Full marks if at least three humans said it", averaged over the n ways of leaving one human out, so that
a machine is scored like a human scored against the other humans. With ten humans of whom k agree with the
prediction, acc = (k * min(1, (k-1)/3) + (10-k) * min(1, k/3)) / 10: 0, 0.3, 0.6, 0.9, then 1 from k = 4.
Which answers count as equal (h_j = p) is settled in `accuracy`, with `normalize`.

The answer-prior baseline answers every question with the most common answer of its question type
("how many" -> "2"); a model has learnt something from the images only where it beats that.
"""

import json
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from . import data  # data.py reads these files through this module: imported whole, not by name, to allow that
from .files import write_file_atomically

# ---------------------------------------------------------------------------------------------------------
# Reading and writing the VQA v2 layout
# ---------------------------------------------------------------------------------------------------------

QUESTION_KEYS = ("image_id", "question", "question_id")
ANNOTATION_KEYS = ("question_id", "image_id", "answers", "multiple_choice_answer", "answer_type", "question_type")
ANSWER_FIELDS = ("answers", "answer", "answer_type", "question_type")  # what a record takes from its annotation


def _top_level_list(path: Path, key: str) -> list:
    """The list under `key` of the JSON object in `path`; errors name the file and what it lacks."""
    doc = data._read_json(path, f"pass the path of a VQA v2 {key} file")
    if not isinstance(doc, dict) or key not in doc:
        raise ValueError(f"{path}: expected an object with a '{key}' list (VQA v2 layout)")
    return doc[key]


def _require_text(path: Path, qid: Any, field: str, value: Any) -> str:
    """`value` if it is a string, else a ValueError naming the file, the question and the field."""
    if not isinstance(value, str):
        raise ValueError(f"{path}: question_id {qid!r} has {field} {value!r}; it must be text")
    return value


def _read_questions(path: Path) -> dict[Any, dict]:
    """Every question of a questions file by question_id, in file order, its text stripped."""
    questions = data._check_records(_top_level_list(path, "questions"), QUESTION_KEYS, path, "questions")
    duplicate = data._first_duplicate([q["question_id"] for q in questions])
    if duplicate is not None:
        raise ValueError(f"{path}: question_id {duplicate!r} occurs more than once; ids must be unique")
    return {
        q["question_id"]: {
            "question_id": q["question_id"],
            "image_id": q["image_id"],
            "question": _require_text(path, q["question_id"], "question", q["question"]).strip(),
        }
        for q in questions
    }


def _answer_texts(path: Path, qid: Any, answers: Any) -> list[str]:
    """The 'answer' strings of an annotation's list of human answers."""
    if not isinstance(answers, list):
        raise ValueError(f"{path}: question_id {qid!r} has answers {answers!r}; it must be a list")
    for i, a in enumerate(answers):
        if not isinstance(a, dict) or not isinstance(a.get("answer"), str):
            raise ValueError(
                f"{path}: question_id {qid!r} has answers[{i}] = {a!r}; each answer is an object with an 'answer' text"
            )
    return [a["answer"] for a in answers]


def _read_annotations(path: Path) -> dict[Any, dict]:
    """Annotations by question_id, every field checked; answer_confidence and answer_id are not kept."""
    annotations = data._check_records(_top_level_list(path, "annotations"), ANNOTATION_KEYS, path, "annotations")
    duplicate = data._first_duplicate([a["question_id"] for a in annotations])
    if duplicate is not None:
        raise ValueError(f"{path}: question_id {duplicate!r} is annotated more than once; ids must be unique")
    by_id = {}
    for a in annotations:
        qid = a["question_id"]
        by_id[qid] = {
            "image_id": a["image_id"],
            "answers": _answer_texts(path, qid, a["answers"]),
            "answer": _require_text(path, qid, "multiple_choice_answer", a["multiple_choice_answer"]),
            "answer_type": _require_text(path, qid, "answer_type", a["answer_type"]),
            "question_type": _require_text(path, qid, "question_type", a["question_type"]),
        }
    return by_id


def _join(
    questions: dict[Any, dict], annotations: dict[Any, dict] | None, questions_path: Path, annotations_path: Path | None
) -> tuple[list[dict], list[str]]:
    """Questions with their annotations, and a message for each question or annotation left out."""
    records, skipped = [], []
    for qid, q in questions.items():
        if not q["question"]:
            skipped.append(f"{questions_path.name}: question_id {qid!r} has an empty question; skipped")
            continue
        if annotations is None:
            records.append(q | dict.fromkeys(ANSWER_FIELDS))
            continue
        a = annotations.get(qid)
        if a is None:
            skipped.append(f"{annotations_path.name}: question_id {qid!r} has no annotation; skipped")
        elif a["image_id"] != q["image_id"]:
            raise ValueError(
                f"{annotations_path}: question_id {qid!r} is annotated for image_id {a['image_id']!r}, but "
                f"{questions_path.name} asks it about image_id {q['image_id']!r}; the files do not belong together"
            )
        elif not a["answers"]:
            skipped.append(f"{annotations_path.name}: question_id {qid!r} has no human answers; skipped")
        else:
            records.append(q | {k: a[k] for k in ANSWER_FIELDS})
    for qid in annotations or {}:
        if qid not in questions:
            skipped.append(
                f"{annotations_path.name}: question_id {qid!r} is annotated but not asked in "
                f"{questions_path.name}; skipped"
            )
    return records, skipped


def read_vqa(questions_path: str | Path, annotations_path: str | Path | None = None) -> tuple[list[dict], list[str]]:
    """Records of a VQA v2 split, in question order, and one message per question or annotation skipped.

    A record is {"question_id", "image_id", "question", "answers": [human answers], "answer":
    multiple_choice_answer, "answer_type", "question_type"}; without an annotations file the last four are None.
    Skipped, with a message naming the file and the question_id: an empty question, a question without an
    annotation, an annotation without human answers or without a question. Errors: a missing, non-UTF-8 or
    malformed file, a missing key, a field of the wrong type, a repeated question_id, and an annotation whose
    image_id differs from its question's (the two files are from different splits).
    """
    questions_path = Path(questions_path)
    annotations_path = None if annotations_path is None else Path(annotations_path)
    annotations = None if annotations_path is None else _read_annotations(annotations_path)
    return _join(_read_questions(questions_path), annotations, questions_path, annotations_path)


def _check_writable(records: Sequence[dict], with_answers: bool) -> None:
    """Refuse records that read_vqa would reject or skip, so that what is written reads back whole."""
    texts = ("question",) + (("answer", "answer_type", "question_type") if with_answers else ())
    for i, r in enumerate(records):
        where = f"write_vqa: record {i} (question_id {r.get('question_id')!r})"
        for key in ("question_id", "image_id"):
            if isinstance(r.get(key), bool) or not isinstance(r.get(key), int | str):
                raise ValueError(f"{where} has {key} {r.get(key)!r}; ids must be integers or strings")
        for key in texts:
            if not isinstance(r.get(key), str):
                raise ValueError(f"{where} has {key} {r.get(key)!r}; it must be text")
        if not r["question"].strip():
            raise ValueError(f"{where} has an empty question")
        answers = r.get("answers")
        if with_answers and not (answers and isinstance(answers, list) and all(isinstance(a, str) for a in answers)):
            raise ValueError(f"{where} has answers {answers!r}; it must be a non-empty list of texts")
    duplicate = data._first_duplicate([r["question_id"] for r in records])
    if duplicate is not None:
        raise ValueError(f"write_vqa: question_id {duplicate!r} occurs more than once; ids must be unique")


def _write_json(path: Path, data: dict) -> None:
    """Write `data` as UTF-8 JSON, whole or not at all (a temporary file renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomically(path, json.dumps(data, ensure_ascii=False).encode("utf-8"))


def write_vqa(records: Sequence[dict], questions_path: str | Path, annotations_path: str | Path | None = None) -> None:
    """Write records (as `read_vqa` returns them) as a VQA v2 questions file and, if given, an annotations file."""
    _check_writable(records, with_answers=annotations_path is not None)
    questions = [{k: r[k] for k in QUESTION_KEYS} for r in records]
    _write_json(Path(questions_path), {"questions": questions})
    if annotations_path is None:
        return
    annotations = [
        {
            "question_id": r["question_id"],
            "image_id": r["image_id"],
            "question_type": r["question_type"],
            "answer_type": r["answer_type"],
            "multiple_choice_answer": r["answer"],
            # numbered like VQA v2's: the official scorer tells humans apart by their whole answer object, so
            # two identical objects would both leave a leave-one-out subset at once
            "answers": [{"answer": a, "answer_id": i} for i, a in enumerate(r["answers"], start=1)],
        }
        for r in records
    ]
    _write_json(Path(annotations_path), {"annotations": annotations})


# ---------------------------------------------------------------------------------------------------------
# Answer normalisation, rule for rule the official one
# ---------------------------------------------------------------------------------------------------------

# The marks the official scorer treats as punctuation. The apostrophe and the colon are not among them
# ("don't" and "10:30" keep theirs), nor is the period, which has a rule of its own.
PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# The official pattern means to keep a period between digits, but its "after a digit" half is mistyped
# (a lookahead, not a lookbehind) and does nothing: a period survives exactly when a digit follows it.
_PERIOD = re.compile(r"\.(?!\d)")
# The official call passes the flag re.UNICODE where re.sub takes its count, so it removes at most this many.
_PERIODS_REMOVED_AT_MOST = re.UNICODE.value

NUMBER_WORDS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
NUMBER_WORDS["none"] = "0"
ARTICLES = {"a", "an", "the"}

# Contractions written without their apostrophe are given it back. For a word with several apostrophes only
# a spelling that lacks exactly one of them is repaired ("couldnt've" and "couldn'tve", not "couldntve").
_CONTRACTED = """
    ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd
    he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've mustn't must've
    needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't shouldn't've somebody'd've
    somebody'll somebody's someone'd someone'd've someone'll someone's something'd something'd've something'll
    that's there'd there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've
    weren't what'll what're what's what've when's where'd where's where've who'd who'd've who'll who's who've
    why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll
    you're you've
""".split()
CONTRACTIONS = {word[:i] + word[i + 1 :]: word for word in _CONTRACTED for i, char in enumerate(word) if char == "'"}
# The official table has this one entry the wrong way round; kept, so that scores agree with it.
CONTRACTIONS["somebody'd"] = "somebodyd"


def _clean(answer: str) -> str:
    """Newlines and tabs to spaces, outer whitespace stripped: all that is ever done to every answer."""
    return answer.replace("\n", " ").replace("\t", " ").strip()


def _strip_punctuation(text: str) -> str:
    """Punctuation, the official way: a mark is deleted if it touches a space somewhere, else becomes a space.

    Every mark is deleted, none becomes a space, if the text has a comma between digits ("1,000"). Then each
    period goes that no digit follows. So "red,white" -> "red white", but "red, white,blue" -> "red whiteblue".
    """
    # each mark is judged on the text as given, like the official code, not on what earlier marks left
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        touches_space = f"{mark} " in text or f" {mark}" in text
        out = out.replace(mark, "" if delete_all or touches_space else " ")
    return _PERIOD.sub("", out, count=_PERIODS_REMOVED_AT_MOST)


def normalize(answer: str) -> str:
    """The official normal form of an answer: "The Two dogs!" -> "2 dogs", "red,white" -> "red white".

    In order: newlines and tabs to spaces, outer whitespace stripped; punctuation by `_strip_punctuation`;
    lower-case, split into words; number words zero..ten as digits ("none" is 0 too, "eleven" stays a word);
    the articles a, an, the dropped; contractions missing an apostrophe repaired ("dont" -> "don't"); the words
    joined by single spaces.
    """
    words = [NUMBER_WORDS.get(w, w) for w in _strip_punctuation(_clean(answer)).lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


# ---------------------------------------------------------------------------------------------------------
# Accuracy
# ---------------------------------------------------------------------------------------------------------


def accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy of one predicted answer against its question's human answers (see the module docstring).

    As in the official code, every answer has its newlines and tabs turned into spaces and its outer whitespace
    stripped, and only if the humans then disagree are the prediction and the human answers also passed through
    `normalize`. When all humans gave the same string the prediction must equal it exactly: "Black." scores 0
    against ten "black" (its authors meant to leave answers read off text in the image alone). The human left
    out is told apart by position; the official code compares whole answer objects, which is the same when
    they carry distinct answer_ids, as VQA v2's and `write_vqa`'s do.
    """
    if not answers:
        raise ValueError("accuracy: no human answers to compare the prediction with")
    prediction, humans = _clean(prediction), [_clean(a) for a in answers]
    if len(set(humans)) > 1:
        prediction, humans = normalize(prediction), [normalize(h) for h in humans]
    agree = [h == prediction for h in humans]
    matches = sum(agree)
    # leaving out human i leaves the other matches: one fewer if human i was one of them
    return sum(min(1.0, (matches - left_out) / 3) for left_out in agree) / len(humans)


# ---------------------------------------------------------------------------------------------------------
# The answer-prior baseline
# ---------------------------------------------------------------------------------------------------------


def answer_prior(train_records: Sequence[dict]) -> dict[str | None, str]:
    """The most common multiple_choice_answer of each question_type, and the most common overall under None.

    The overall answer stands in for question types the training split never asked. Ties go to the answer
    seen first, so the prior depends only on the records and their order.
    """
    if not train_records:
        raise ValueError("answer_prior: no training records; pass records read with their annotations")
    by_type: dict[str, Counter] = {}
    overall = Counter()
    for r in train_records:
        if r.get("answer") is None or r.get("question_type") is None:
            raise ValueError(
                f"answer_prior: question_id {r.get('question_id')!r} has no answer or question_type; "
                "read the training split with its annotations"
            )
        by_type.setdefault(r["question_type"], Counter())[r["answer"]] += 1
        overall[r["answer"]] += 1
    prior: dict[str | None, str] = {qtype: counts.most_common(1)[0][0] for qtype, counts in by_type.items()}
    prior[None] = overall.most_common(1)[0][0]
    return prior


def predict_prior(prior: Mapping[str | None, str], records: Sequence[dict]) -> list[str]:
    """The answer-prior baseline's answer to each record: its question type's, or the overall one if unseen."""
    return [prior.get(r.get("question_type"), prior[None]) for r in records]


# ---------------------------------------------------------------------------------------------------------
# A dataset folder: where a split's files are
# ---------------------------------------------------------------------------------------------------------


def split_files(root: str | Path, split: str) -> tuple[Path, Path | None] | None:
    """The questions file of a split and its annotations file (None: questions only), or None if it has none.

    Under ROOT/annotations, a name ending in {split}_questions.json, and {split}_annotations.json: the
    official "v2_OpenEnded_mscoco_val2014_questions.json" and "v2_mscoco_val2014_annotations.json" match
    for split val2014, and so do the scenes' "vqa_test_questions.json" and "vqa_test_annotations.json".
    """
    folder = Path(root) / "annotations"
    found = {}
    for kind in ("questions", "annotations"):
        # the letter before the split name must not be part of a longer split name ("minival" is not "val")
        names = sorted(
            p for p in folder.glob(f"*{split}_{kind}.json") if not p.name[: -len(f"{split}_{kind}.json")][-1:].isalnum()
        )
        if len(names) > 1:
            raise ValueError(
                f"{folder} has {len(names)} {kind} files for split {split!r} ({names[0].name}, "
                f"{names[1].name}); keep one"
            )
        found[kind] = names[0] if names else None
    if found["questions"] is None:
        if found["annotations"] is not None:
            raise FileNotFoundError(f"{found['annotations']} has no questions file beside it ({split}_questions.json)")
        return None
    return found["questions"], found["annotations"]


_TRAILING_NUMBER = re.compile(r"(\d+)\.[A-Za-z]+$")


def image_files(folder: str | Path, image_ids: Sequence[Any]) -> dict[Any, str]:
    """File names in folder for the integer image ids, found by the number that ends each name.

    COCO names images by id ("COCO_val2014_000000000042.jpg", "000000000042.jpg"), and VQA v2 refers to
    them by id alone. Ids with no file are left out; the caller reports them.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} not found; put the split's images there")
    wanted = {i for i in image_ids if isinstance(i, int)}
    found: dict[Any, str] = {}
    for name in sorted(os.listdir(folder)):
        m = _TRAILING_NUMBER.search(name)
        if m and int(m.group(1)) in wanted:
            image_id = int(m.group(1))
            if image_id in found:
                raise ValueError(f"{folder} has two files for image id {image_id}: {found[image_id]} and {name}")
            found[image_id] = name
    return found
