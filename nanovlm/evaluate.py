"""Evaluate a trained VLM on a prepared split: generate captions and answers, then score them.

- every split: BLEU-1..4 and CIDEr-D of the generated captions against the references;
- scenes splits: grounded scores from the exact scene records (objects, hallucination, counting,
  relations, attribute binding);
- splits with questions (scenes, or VQA v2 files): VQA accuracy by question type and by answer type, and
  the answer-prior baseline (the most common training answer of each question type);
- COCO-layout splits whose instance annotations are on disk (ROOT/annotations/instances_<split>.json):
  CHAIR with COCO's 80 categories (nanovlm/chair.py), with the mean caption length and object recall;
- the blind baseline: the same model with every image replaced by a blank one, so the numbers show how
  much the image contributes;
- photo splits (no scene records) with several references per image: the humans, each reference scored
  against the others and averaged over which one is left out, the ceiling BLEU, CIDEr-D and CHAIR are read
  against (with one reference fewer than the model is scored against, as is usual).
"""

import math
from collections import defaultdict

import numpy as np
import torch

from . import chair, metrics, scenes, vqa
from .data import PackedSplit, report, to_tensor
from .tokenizer import Tokenizer
from .vlm import VLM


@torch.no_grad()
def generate_captions(
    model: VLM,
    tokenizer: Tokenizer,
    images: np.ndarray,
    batch_size: int = 256,
    max_new_tokens: int | None = None,
    blind: bool = False,
) -> list[str]:
    """Greedy captions for (N, H, W, 3) uint8 images; blind=True shows the model blank grey images instead."""
    model.eval()
    device = next(model.parameters()).device
    max_new_tokens = max_new_tokens or model.cfg.max_text_len - 1
    captions = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        pixels = to_tensor(chunk, device)
        if blind:
            pixels = torch.full_like(pixels, 0.5)
        prompt = torch.full((len(chunk), 1), tokenizer.image, dtype=torch.long, device=device)
        out = model.generate(pixels, prompt, max_new_tokens, eot=tokenizer.eot)
        captions += [tokenizer.decode(ids).strip() for ids in out]
    return captions


@torch.no_grad()
def answer_questions(
    model: VLM, tokenizer: Tokenizer, split: PackedSplit, qa: list[dict], batch_size: int = 256, blind: bool = False
) -> list[str]:
    """Greedy answers to scene questions; prompts of equal length are batched together."""
    model.eval()
    device = next(model.parameters()).device
    prompts = [[tokenizer.image, tokenizer.user, *tokenizer.encode(q["question"]), tokenizer.assistant] for q in qa]
    too_long = [q for q, p in zip(qa, prompts, strict=True) if len(p) > _longest_prompt(model)]
    if too_long:
        q = too_long[0]
        raise ValueError(
            f"question {q.get('question_id', q['question'])!r} is {len(tokenizer.encode(q['question']))} tokens, "
            f"longer than the model's context leaves for a question; {len(too_long)} such question(s)"
        )
    answers = [""] * len(qa)
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    for idx in by_length.values():
        for start in range(0, len(idx), batch_size):
            batch = idx[start : start + batch_size]
            rows = [split.row_of_id[qa[i]["image_id"]] for i in batch]
            pixels = to_tensor(split.images[rows], device)
            if blind:
                pixels = torch.full_like(pixels, 0.5)
            prompt = torch.tensor([prompts[i] for i in batch], device=device)
            for i, ids in zip(batch, model.generate(pixels, prompt, 8, eot=tokenizer.eot), strict=True):
                answers[i] = tokenizer.decode(ids).strip()
    return answers


def _longest_prompt(model: VLM) -> int:
    """Text tokens a question prompt may take: the context less the image tokens and one answer token."""
    return model.cfg.decoder.max_seq_len - model.cfg.n_image_tokens - 1


def answered(model: VLM, tokenizer: Tokenizer, split: PackedSplit, n: int | None = None) -> tuple[list[dict], int]:
    """The questions with answers about the first n images (all when None) that fit the model's context, and
    how many did not fit: those are counted and the first is named on stderr, not scored."""
    n = len(split) if n is None else n
    qa = [q for q in split.qa or [] if q["answer"] is not None and split.row_of_id[q["image_id"]] < n]
    fits = [len(tokenizer.encode(q["question"])) + 3 <= _longest_prompt(model) for q in qa]
    if not all(fits):
        q = qa[fits.index(False)]
        report(
            f"skipped {fits.count(False)} question(s) longer than the model's context, e.g. "
            f"{q.get('question_id', q['question'])!r}: {q['question']!r}"
        )
    return [q for q, ok in zip(qa, fits, strict=True) if ok], fits.count(False)


def score_answers(answers: list[str], qa: list[dict]) -> dict:
    """VQA accuracy of answers to question records, overall, per question type and per answer type, with counts.

    A record with human answers (the VQA v2 layout) is scored as the official evaluation scores it
    (vqa.accuracy); one with a single answer by exact match after vqa.normalize. Keys: vqa_acc,
    vqa_n, vqa_acc/TYPE and vqa_n/TYPE per question type, vqa_acc/answer:TYPE and vqa_n/answer:TYPE per
    answer type.
    """
    if len(answers) != len(qa):
        raise ValueError(f"got {len(answers)} answers for {len(qa)} questions; pass one per question")
    hits = defaultdict(list)
    for answer, q in zip(answers, qa, strict=True):
        if q.get("answers"):
            score = vqa.accuracy(answer, q["answers"])
        else:
            score = float(vqa.normalize(answer) == vqa.normalize(str(q["answer"])))
        keys = ["", f"/{q.get('type')}"] if q.get("type") is not None else [""]
        if q.get("answer_type") is not None:
            keys.append(f"/answer:{q['answer_type']}")
        for key in keys:
            hits[key].append(score)
    scores: dict = {}
    for key in sorted(hits):
        scores[f"vqa_acc{key}"] = sum(hits[key]) / len(hits[key])
        scores[f"vqa_n{key}"] = len(hits[key])
    return scores


def vqa_report(
    model: VLM, tokenizer: Tokenizer, split: PackedSplit, train_qa: list[dict], limit: int | None = None
) -> dict:
    """VQA accuracy of the model, of the same model shown blank images, and of the answer-prior baseline.

    train_qa: the training questions, whose most common answer per question type is the prior's answer.
    """
    qa, too_long = answered(model, tokenizer, split, min(limit or len(split), len(split)))
    if not qa:
        raise ValueError(f"{split.dir} has no answered questions to score that fit the model's context")
    prior = vqa.answer_prior([q for q in train_qa if q["answer"] is not None])
    guesses = vqa.predict_prior(prior, qa)
    return {
        "n_questions": len(qa),
        "skipped_too_long": too_long,
        "model": score_answers(answer_questions(model, tokenizer, split, qa), qa),
        "blind": score_answers(answer_questions(model, tokenizer, split, qa, blind=True), qa),
        "prior": score_answers(guesses, qa),
    }


def format_vqa_report(report: dict) -> str:
    """A vqa_report as a table: overall, per answer type, per question type; model, blind and prior."""
    model = report["model"]
    groups = [""] + sorted(k[len("vqa_acc") :] for k in model if k.startswith("vqa_acc/answer:"))
    groups += sorted(k[len("vqa_acc") :] for k in model if k.startswith("vqa_acc/") and "answer:" not in k)
    width = max(len(g) for g in groups) + 6
    lines = [f"{'VQA accuracy':<{width}} {'model':>7} {'blind':>7} {'prior':>7} {'questions':>10}"]
    for g in groups:
        name = "all" if not g else g[1:].replace("answer:", "answer type ")
        row = [report[k].get(f"vqa_acc{g}", math.nan) for k in ("model", "blind", "prior")]
        lines.append(f"{name:<{width}} " + " ".join(f"{v:7.3f}" for v in row) + f" {model[f'vqa_n{g}']:>10d}")
    return "\n".join(lines)


def coco_instances(split: PackedSplit) -> dict | None:
    """Image id -> the COCO categories its instance annotations hold; None for a split without them.

    The file is looked up beside the captions the split was packed from: a split packed into
    ROOT/prepared/<split>_<size> reads ROOT/annotations/instances_<split>.json.
    """
    if split.scenes is not None:
        return None
    root, name = split.dir.parent.parent, split.dir.name.rsplit("_", 1)[0]
    path = root / "annotations" / f"instances_{name}.json"
    return chair.read_instances(path) if path.is_file() else None


def coco_truth(split: PackedSplit, n: int) -> tuple[dict | None, dict | None]:
    """For CHAIR on the first n images of a COCO split: (row -> the categories its instance annotations hold,
    row -> those plus the categories its references name); (None, None) for a split without instances."""
    instances = coco_instances(split)
    if instances is None:
        return None, None
    rows = {row: instances.get(i, set()) for row, i in enumerate(split.image_ids[:n])}
    return rows, chair.truth(rows, dict(enumerate(split.captions[:n])))


def score_captions(captions: list[str], split: PackedSplit, objects: dict | None = None) -> dict:
    """Scores of captions for the first len(captions) images: BLEU/CIDEr, grounded scores on scenes, and COCO's
    CHAIR when `objects` gives each image's categories (row -> set, as evaluate_split builds it)."""
    n = len(captions)
    if not 0 < n <= len(split):
        raise ValueError(f"got {n} captions for a split of {len(split)} images; pass one caption per image, in order")
    scores = metrics.caption_scores(dict(enumerate(captions)), dict(enumerate(split.captions[:n])))
    if split.scenes is not None:
        parsed = [scenes.parse_caption(c) for c in captions]
        scores.update(metrics.grounded_scores(split.scenes[:n], parsed, scenes.relation_holds))
    if objects is not None:
        scores.update(chair.chair(dict(enumerate(captions)), objects))
    return scores


def human_scores(split: PackedSplit, n: int, instances: dict | None = None) -> dict:
    """The first n images' reference captions scored like a model's: each against the others, averaged over which
    reference is left out; with `instances` (row -> the categories its instance annotations hold), CHAIR against
    them and the other references too. {} unless every image has at least 2 references."""
    references = split.captions[:n]
    k = min((len(refs) for refs in references), default=0)
    if k < 2:
        return {}
    runs = []
    for left_out in range(k):
        held = {i: refs[left_out] for i, refs in enumerate(references)}
        rest = {i: [r for j, r in enumerate(refs) if j != left_out] for i, refs in enumerate(references)}
        runs.append(metrics.caption_scores(held, rest))
    scores = {key: sum(r[key] for r in runs) / k for key in runs[0]}
    if instances is not None:
        scores.update(chair.human_chair(dict(enumerate(references)), instances))
    return scores


def evaluate_split(
    model: VLM,
    tokenizer: Tokenizer,
    split: PackedSplit,
    limit: int | None = None,
    blind_baseline: bool = True,
    questions: bool = True,
) -> dict:
    """All scores that apply to the first `limit` images of a split, for the model and its blind baseline.

    questions=False skips VQA (for a model never taught the question format).
    Returns {"n_images", "model": scores, "blind": scores, "captions": the model's captions}.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit {limit}: score at least 1 image, or pass None for the whole split")
    n = min(limit or len(split), len(split))
    qa, too_long = answered(model, tokenizer, split, n) if questions else ([], 0)
    rows, objects = coco_truth(split, n)  # row -> categories, for CHAIR
    result = {"n_images": n, "model": {}, "blind": {}}
    for key, blind in (("model", False), ("blind", True)):
        if blind and not blind_baseline:
            continue
        captions = generate_captions(model, tokenizer, split.images[:n], blind=blind)
        scores = score_captions(captions, split, objects)
        if qa:
            scores.update(score_answers(answer_questions(model, tokenizer, split, qa, blind=blind), qa))
            scores["vqa_skipped_too_long"] = too_long
        result[key] = scores
        if key == "model":
            result["captions"] = captions
    if split.scenes is None and (humans := human_scores(split, n, rows)):
        result["humans"] = humans
    return result


def score_table(summary: dict) -> str:
    """Every score of an evaluate_split summary, model next to blind baseline; counts print as integers."""
    model, blind, humans = summary["model"], summary.get("blind", {}), summary.get("humans")
    width = max(map(len, model), default=0) + 2
    lines = [f"{'score':<{width}} {'model':>8} {'blind':>8}" + (f" {'humans':>8}" if humans else "")]
    for key, value in model.items():
        line = f"{key:<{width}} {_fmt(value):>8} {_fmt(blind.get(key)):>8}"
        lines.append(line + (f" {_fmt(humans.get(key)):>8}" if humans else ""))
    return "\n".join(lines)


def json_summary(summary: dict) -> dict:
    """The summary without its captions, ready for json.dumps: nan (nothing to measure) becomes None (null)."""

    def clean(value):
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        return None if isinstance(value, float) and math.isnan(value) else value

    return clean({k: v for k, v in summary.items() if k != "captions"})


def _fmt(value) -> str:
    """A count as an integer, a rate with 3 decimals (nan stays nan), a missing score as -."""
    if value is None:
        return "-"
    return f"{value:d}" if isinstance(value, int) else f"{value:.3f}"
