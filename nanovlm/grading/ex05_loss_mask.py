"""Exercise 5, join_image_and_text: the [image | text] sequence and its loss mask.

Checked against the rule of nanovlm.loader.Loader and nanovlm.vlm.VLM. Its toy token rows and reference targets
also make exercise 9's batches.
"""

import torch

from ..vlm import IGNORE
from .results import Part, Parts
from .student import Student, StudentError, close, listing, returned_tensor, shape_of

FORBIDDEN = ()  # no one package function does this exercise's job, so none is refused

EOT, IMAGE, USER, ASSISTANT = 0, 1, 2, 3  # special token ids of the toy vocabulary the checks use (words: 10..)


def token_rows(g: torch.Generator, rows: list[tuple[int, int]], T: int, vocab: int = 50) -> tuple[torch.Tensor, ...]:
    """Padded token rows as the Loader makes them: tokens (B, T+1), lengths (B,), prompt_lengths (B,).

    rows holds (length, prompt length) per row: <|image|> caption <|endoftext|> for a prompt of 1,
    <|image|><|user|> question <|assistant|> answer <|endoftext|> for a longer one; padding is <|endoftext|>. A
    row of length T+1 fills the window and may be cut before its <|endoftext|>.
    """
    tokens = torch.full((len(rows), T + 1), EOT, dtype=torch.long)
    for b, (length, prompt) in enumerate(rows):
        row = torch.randint(10, vocab, (length,), generator=g)
        row[0] = IMAGE
        if prompt > 1:
            row[1], row[prompt - 1] = USER, ASSISTANT
        if length <= T:
            row[-1] = EOT
        tokens[b, :length] = row
    lengths = torch.tensor([length for length, _ in rows])
    prompts = torch.tensor([prompt for _, prompt in rows])
    return tokens, lengths, prompts


def reference_join(image_tokens, text_embeds, tokens, lengths, prompt_lengths) -> tuple[torch.Tensor, torch.Tensor]:
    """The joined inputs (B, N+T, D) and targets (B, N+T), by the rule of nanovlm.loader.Loader and nanovlm.vlm.VLM.

    Text position t predicts tokens[t + 1]; it is scored unless it is padding (t >= length - 1) or part of the
    prompt (t < prompt_length - 1). Image positions are never scored.
    """
    B, N = image_tokens.shape[:2]
    T = text_embeds.size(1)
    t = torch.arange(T)
    text_targets = tokens[:, 1:].clone()  # (B, T): the next token at every text position
    text_targets[(t >= lengths[:, None] - 1) | (t < prompt_lengths[:, None] - 1)] = IGNORE
    targets = torch.cat([torch.full((B, N), IGNORE, dtype=torch.long), text_targets], dim=1)
    return torch.cat([image_tokens, text_embeds], dim=1), targets


def check_join_image_and_text(student: Student) -> list[Part]:
    """join_image_and_text(...) -> ([image | text] inputs, targets with -100 where nothing is scored).

    Diagnoses: text before image, targets for the text positions only, image positions given targets, targets
    not shifted (the input tokens themselves) or not offset by the image, prompt positions scored, the first
    answer token masked, padding scored, the <|endoftext|> target masked.
    """
    parts = Parts(
        ("joined inputs [image | text]", 2),
        ("image positions have target -100", 2),
        ("targets are the next tokens", 2),
        ("the prompt is not scored, the answer is", 2),
        ("padding is not scored, <|endoftext|> is", 2),
    )
    g = torch.Generator().manual_seed(5)
    problems: dict[str, str] = {}
    N, D, T = 4, 6, 9
    for rows in ([(7, 1), (9, 5), (10, 1)], [(5, 1), (10, 4), (6, 3)]):
        B = len(rows)
        tokens, lengths, prompts = token_rows(g, rows, T)
        image, text = torch.randn(B, N, D, generator=g), torch.randn(B, T, D, generator=g)
        what = (
            f"join_image_and_text(image tokens {(B, N, D)}, text embeddings {(B, T, D)}, tokens {(B, T + 1)}, "
            f"lengths {lengths.tolist()}, prompt_lengths {prompts.tolist()})"
        )
        result = student.call(what, (image, text, tokens, lengths, prompts))
        if not (isinstance(result, tuple | list) and len(result) == 2):
            raise StudentError(f"{what} returned a {type(result).__name__}; return the pair (inputs, targets)")
        inputs, targets = returned_tensor(result[0], what), returned_tensor(result[1], what)
        for name, problem in _join_problems(image, text, tokens, lengths, prompts, inputs, targets).items():
            problems.setdefault(name, problem)
    parts.judge("joined inputs [image | text]", problems.get("joined"))
    if "targets shape" in problems:
        parts.judge("image positions have target -100", problems["targets shape"])
        return parts.finish("not checked: fix the shape of the targets first")
    for name, key in [
        ("image positions have target -100", "image"),
        ("targets are the next tokens", "next"),
        ("the prompt is not scored, the answer is", "prompt"),
        ("padding is not scored, <|endoftext|> is", "padding"),
    ]:
        parts.judge(name, problems.get(key))
    return parts.finish()


def _join_problems(image, text, tokens, lengths, prompts, inputs, targets) -> dict[str, str]:
    """What is wrong with one join: keys joined, targets shape, image, next, prompt, padding."""
    B, N, D = image.shape
    T = text.size(1)
    expected_inputs, expected = reference_join(image, text, tokens, lengths, prompts)
    problems = {}
    if shape_of(inputs) != (B, N + T, D):
        problems["joined"] = (
            f"the joined inputs have shape {shape_of(inputs)}, expected {(B, N + T, D)}: the N = {N} image tokens, "
            f"then the T = {T} text embeddings, along dim 1"
        )
    elif close(inputs, torch.cat([text, image], dim=1)):
        problems["joined"] = (
            "your sequence starts with the text; the image tokens come first, so that every word can attend to the "
            "picture: torch.cat([image_tokens, text_embeds], dim=1)"
        )
    elif not close(inputs, expected_inputs):
        problems["joined"] = "the joined inputs differ from torch.cat([image_tokens, text_embeds], dim=1)"
    if shape_of(targets) != (B, N + T):
        hint = " You returned targets for the text positions only." if shape_of(targets) == (B, T) else ""
        problems["targets shape"] = (
            f"the targets have shape {shape_of(targets)}, expected {(B, N + T)}: one per position of the joined "
            f"sequence, -100 on the {N} image positions.{hint}"
        )
        return problems
    targets = targets.long()
    scored_images = sorted({int(p) for p in torch.where(targets[:, :N] != IGNORE)[1]})
    if scored_images:
        problems["image"] = (
            f"image positions {listing(scored_images)} have targets: the image tokens are given, not predicted, so "
            "their targets are -100"
        )
    if torch.equal(targets[:, :T], expected[:, N:]):
        problems["next"] = (
            f"your text targets start at position 0 of the joined sequence; the image takes positions 0..{N - 1}, so "
            f"text position t is position {N} + t"
        )
        problems["prompt"] = problems["padding"] = "not judged: the text targets are misplaced (see above)"
        return problems
    text_targets = targets[:, N:]
    for b in range(B):
        length, prompt = int(lengths[b]), int(prompts[b])
        row = text_targets[b]
        inner = list(range(prompt, length - 2))  # answer positions other than the first and the last
        if inner and "next" not in problems and not torch.equal(row[inner], tokens[b, 1:][inner]):
            if torch.equal(row[inner], tokens[b, inner]):
                problems["next"] = (
                    "your targets are the input tokens themselves: text position t must predict the *next* token, "
                    "tokens[:, t + 1]"
                )
            elif (row[inner] == IGNORE).all():
                problems["next"] = f"row {b}'s caption/answer positions have target -100: those are what it must learn"
            else:
                t = next(t for t in inner if row[t] != tokens[b, t + 1])
                problems["next"] = (
                    f"row {b}, text position {t}: target {int(row[t])}, expected tokens[{b}, {t + 1}] = "
                    f"{int(tokens[b, t + 1])}, the next token"
                )
        scored_prompt = [t for t in range(prompt - 1) if row[t] != IGNORE]
        if scored_prompt and "prompt" not in problems:
            problems["prompt"] = (
                f"the loss counts the prompt: row {b} has targets at text positions {listing(scored_prompt)} "
                "(<|image|>, <|user|>, the question): the model learns to answer, not to ask, so mask text positions "
                "t < prompt_length - 1"
            )
        elif row[prompt - 1] == IGNORE and "prompt" not in problems:
            marker = "the <|assistant|> token" if prompt > 1 else "the <|image|> token"
            problems["prompt"] = (
                f"you masked the first answer token: text position {prompt - 1} of row {b} ({marker}) must predict "
                f"the first {'answer token' if prompt > 1 else 'word of the caption'}; mask t < prompt_length - 1 only"
            )
        scored_padding = [t for t in range(length - 1, T) if row[t] != IGNORE]
        if scored_padding and "padding" not in problems:
            problems["padding"] = (
                f"the loss counts padding tokens: row {b} has targets at text positions {listing(scored_padding)}, "
                "after its <|endoftext|>; mask t >= length - 1"
            )
        elif row[length - 2] == IGNORE and "padding" not in problems:
            last = (
                "<|endoftext|>" if tokens[b, length - 1] == EOT else f"tokens[{b}, {length - 1}] (the row is cut there)"
            )
            problems["padding"] = (
                f"you masked the last target of row {b}: text position {length - 2} must predict {last}, or the model "
                "never learns to stop; mask from t = length - 1 on"
            )
    return problems
