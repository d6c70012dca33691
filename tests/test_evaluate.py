"""Behaviour of evaluation: every score with its counts, for the model and the blind baseline, and the eval CLI."""

import json
import math

import pytest
import torch

from nanovlm import vqa
from nanovlm.__main__ import main
from nanovlm.config import DataConfig
from nanovlm.data import PackedSplit, read_questions
from nanovlm.decoder import DecoderConfig
from nanovlm.evaluate import answered, evaluate_split, json_summary, score_answers, score_captions, score_table
from nanovlm.pipeline import load_tokenizer
from nanovlm.projector import ProjectorConfig
from nanovlm.vit import ViTConfig
from nanovlm.vlm import VLM, VLMConfig

GROUNDED = {"object_f1", "chair_s", "chair_i", "count_acc", "relation_acc", "unparsed", "count_n", "relation_n"}


@pytest.fixture(scope="module")
def tokenizer(tiny_scenes):
    train = PackedSplit(tiny_scenes / "prepared" / "train_32")
    return load_tokenizer(DataConfig(root=str(tiny_scenes), vocab_size=300), train)


@pytest.fixture(scope="module")
def model(tokenizer) -> VLM:
    torch.manual_seed(0)
    cfg = VLMConfig(
        vit=ViTConfig(image_size=32, patch_size=8, dim=32, n_layers=1, n_heads=2),
        projector=ProjectorConfig(in_dim=32, out_dim=32, pixel_shuffle=2),
        decoder=DecoderConfig(vocab_size=tokenizer.vocab_size, max_seq_len=24, dim=32, n_layers=1, n_heads=2),
    )
    return VLM(cfg).eval()


@pytest.fixture(scope="module")
def val(tiny_scenes) -> PackedSplit:
    return PackedSplit(tiny_scenes / "prepared" / "val_32")


def test_evaluate_split_scores_model_and_blind_baseline_on_the_same_keys(model, tokenizer, val):
    summary = evaluate_split(model, tokenizer, val, limit=8)
    assert summary["n_images"] == 8 and len(summary["captions"]) == 8
    for scores in (summary["model"], summary["blind"]):
        assert {"bleu1", "bleu4", "cider", "vqa_acc", "vqa_n"} | GROUNDED <= set(scores)
        assert scores["captions"] == 8
    assert set(summary["model"]) == set(summary["blind"])
    questions = [q for q in val.qa if val.row_of_id[q["image_id"]] < 8]
    # the fixture's model has a short context: the questions it cannot hold are counted, not scored
    assert summary["model"]["vqa_n"] + summary["model"]["vqa_skipped_too_long"] == len(questions)


def test_references_scored_as_captions_are_perfect(val):
    scores = score_captions([refs[0] for refs in val.captions], val)
    assert scores["object_f1"] == 1
    assert scores["chair_s"] == 0
    assert scores["unparsed"] == 0
    assert scores["bleu4"] == pytest.approx(1)


def test_score_captions_wants_one_caption_per_image(val):
    with pytest.raises(ValueError, match="pass one caption per image"):
        score_captions(["a red circle"] * (len(val) + 1), val)


def test_json_summary_drops_captions_and_turns_nan_into_null():
    summary = {"n_images": 2, "captions": ["a", "b"], "model": {"count_acc": math.nan, "count_n": 0}, "blind": {}}
    cleaned = json_summary(summary)
    assert cleaned == {"n_images": 2, "model": {"count_acc": None, "count_n": 0}, "blind": {}}
    assert json.loads(json.dumps(cleaned, allow_nan=False)) == cleaned


def test_score_table_lists_every_score_with_counts_as_integers():
    summary = {"model": {"bleu4": 0.25, "count_acc": math.nan, "count_n": 3}, "blind": {"bleu4": 0.125}}
    rows = [line.split() for line in score_table(summary).splitlines()]
    assert rows == [
        ["score", "model", "blind"],
        ["bleu4", "0.250", "0.125"],
        ["count_acc", "nan", "-"],
        ["count_n", "3", "-"],
    ]


@pytest.fixture(scope="module")
def saved_model(model, tokenizer, tmp_path_factory):
    directory = tmp_path_factory.mktemp("ckpt")
    model.save(directory, tokenizer)
    return directory


def test_eval_cli_prints_json_and_writes_the_caption_sheet(saved_model, tiny_scenes, tmp_path, capsys):
    sheet = tmp_path / "sheet.png"
    args = ["eval", "--ckpt", str(saved_model), "--data", str(tiny_scenes), "--split", "val", "--limit", "6"]
    main([*args, "--json", "--sheet", str(sheet)])  # returns normally: exit code 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_images"] == 6
    assert GROUNDED <= set(summary["model"]) and GROUNDED <= set(summary["blind"])
    assert sheet.read_bytes()[:4] == b"\x89PNG"


def test_eval_cli_table_shows_every_score_of_the_model(saved_model, tiny_scenes, capsys):
    main(["eval", "--ckpt", str(saved_model), "--data", str(tiny_scenes), "--limit", "4", "--no-blind"])
    out = capsys.readouterr().out
    assert "Scores on 4 'val' images" in out
    shown = {line.split()[0] for line in out.splitlines()[2:]}
    assert GROUNDED | {"bleu4", "cider", "vqa_acc", "captions"} <= shown


def test_score_answers_uses_the_official_accuracy_with_human_answers_and_exact_match_without():
    humans = ["two"] * 2 + ["three"] * 8  # 2 of 10 people said two: 0.6 under the official accuracy
    qa = [
        {"question": "how many?", "answer": "three", "answers": humans, "type": "count", "answer_type": "number"},
        {"question": "is it red?", "answer": "yes", "answers": ["yes"] * 10, "type": "colour", "answer_type": "yes/no"},
        {"question": "what shape?", "answer": "circle", "type": "shape"},  # one exact answer, no people
    ]
    scores = score_answers(["2", "yes", "The circle."], qa)
    assert scores["vqa_acc/count"] == pytest.approx(0.6)  # "2" is "two" after normalisation
    assert scores["vqa_acc/colour"] == 1.0 and scores["vqa_acc/shape"] == 1.0
    assert scores["vqa_acc"] == pytest.approx(2.6 / 3) and scores["vqa_n"] == 3
    assert scores["vqa_acc/answer:number"] == pytest.approx(0.6) and scores["vqa_n/answer:yes/no"] == 1
    with pytest.raises(ValueError, match="got 2 answers for 3 questions"):
        score_answers(["a", "b"], qa)


def test_eval_cli_vqa_reports_model_blind_and_the_answer_prior(saved_model, tiny_scenes, capsys):
    args = ["eval", "--task", "vqa", "--ckpt", str(saved_model), "--data", str(tiny_scenes), "--split", "val"]
    main([*args, "--json"])
    report = json.loads(capsys.readouterr().out)
    val = PackedSplit(tiny_scenes / "prepared" / "val_32")
    assert report["n_questions"] + report["skipped_too_long"] == len(val.qa)
    model, tok = VLM.load(saved_model)
    scored, _ = answered(model, tok, val)
    prior = vqa.answer_prior(read_questions(tiny_scenes, "train")[0])
    hits = [prior.get(q["question_type"], prior[None]) == q["answer"] for q in scored]
    assert report["prior"]["vqa_acc"] == pytest.approx(sum(hits) / len(hits))
    for who in ("model", "blind", "prior"):
        assert 0 <= report[who]["vqa_acc"] <= 1 and report[who]["vqa_n"] == len(scored)
    main(args)
    table = capsys.readouterr().out
    assert f"VQA on {len(scored)} questions of 'val'" in table
    assert {"all", "count", "relation"} <= {line.split()[0] for line in table.splitlines()[2:]}
