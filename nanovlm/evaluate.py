"""Evaluate a trained VLM on a prepared split: generate captions and answers, then score them.

- every split: BLEU-1..4 and CIDEr-D of the generated captions against the references;
- scenes splits: grounded scores from the exact scene records (objects, hallucination, counting,
  relations, attribute binding) and VQA accuracy by question type;
- the blind baseline: the same model with every image replaced by a blank one, so the numbers show how
  much the image contributes.
"""

import math

import numpy as np
import torch

from . import metrics, scenes
from .data import PackedSplit, to_tensor
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


def score_captions(captions: list[str], split: PackedSplit) -> dict:
    """Scores of captions for the first len(captions) images: BLEU/CIDEr, and grounded scores on scenes."""
    n = len(captions)
    if not 0 < n <= len(split):
        raise ValueError(f"got {n} captions for a split of {len(split)} images; pass one caption per image, in order")
    scores = metrics.caption_scores(dict(enumerate(captions)), dict(enumerate(split.captions[:n])))
    if split.scenes is not None:
        parsed = [scenes.parse_caption(c) for c in captions]
        scores.update(metrics.grounded_scores(split.scenes[:n], parsed, scenes.relation_holds))
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
    qa = [q for q in split.qa or [] if split.row_of_id[q["image_id"]] < n] if questions else []
    result = {"n_images": n, "model": {}, "blind": {}}
    for key, blind in (("model", False), ("blind", True)):
        if blind and not blind_baseline:
            continue
        captions = generate_captions(model, tokenizer, split.images[:n], blind=blind)
        scores = score_captions(captions, split)
        if qa:
            answers = answer_questions(model, tokenizer, split, qa, blind=blind)
            scores.update(metrics.vqa_accuracy(answers, [q["answer"] for q in qa], [q["type"] for q in qa]))
        result[key] = scores
        if key == "model":
            result["captions"] = captions
    return result


def score_table(summary: dict) -> str:
    """Every score of an evaluate_split summary, model next to blind baseline; counts print as integers."""
    model, blind = summary["model"], summary.get("blind", {})
    width = max(map(len, model), default=0) + 2
    lines = [f"{'score':<{width}} {'model':>8} {'blind':>8}"]
    for key, value in model.items():
        lines.append(f"{key:<{width}} {_fmt(value):>8} {_fmt(blind.get(key)):>8}")
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
