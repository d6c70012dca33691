"""Exercise 9, train_step: one captioning training step, against VLM.forward's loss and reference SGD steps."""

import copy
import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..decoder import DecoderConfig
from ..projector import ProjectorConfig
from ..vit import ViTConfig
from ..vlm import IGNORE, VLM, VLMConfig
from .ex05_loss_mask import EOT, reference_join, token_rows
from .results import Part, Parts
from .student import Student, StudentError, close

# the package functions the student's code may not call, as (module or class, name)
FORBIDDEN = ((VLM, "forward"),)


def _train_model() -> VLM:
    """A tiny VLM (4 image tokens, 32 token ids) with weights large enough that mistakes change the loss visibly."""
    cfg = VLMConfig(
        vit=ViTConfig(image_size=16, patch_size=8, dim=16, n_layers=1, n_heads=2),
        projector=ProjectorConfig(in_dim=16, out_dim=16),
        decoder=DecoderConfig(vocab_size=32, max_seq_len=16, dim=16, n_layers=1, n_heads=2),
    )
    model = VLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


def _train_batch(g: torch.Generator, rows: list[tuple[int, int]], T: int = 8) -> dict[str, torch.Tensor]:
    """A batch as nanovlm.loader.Loader makes it: images, input_ids (B, T), targets (B, T) with -100."""
    tokens, lengths, prompts = token_rows(g, rows, T, vocab=32)
    B = len(rows)
    _, targets = reference_join(torch.zeros(B, 0, 1), torch.zeros(B, T, 1), tokens, lengths, prompts)
    return {"images": torch.rand(B, 3, 16, 16, generator=g), "input_ids": tokens[:, :-1], "targets": targets}


def _losses(model: VLM, batch: dict) -> dict[str, torch.Tensor]:
    """The loss of a batch ("right": VLM.forward's) and the same loss computed with typical mistakes."""
    images, ids, targets = batch["images"], batch["input_ids"], batch["targets"]
    dec = model.decoder

    def ce(logits: torch.Tensor, t: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, 1), t.flatten(), ignore_index=IGNORE, reduction=reduction)

    img, text = model.image_tokens(images), dec.embed(ids)
    N, T = img.size(1), ids.size(1)
    h = dec.hidden(torch.cat([img, text], dim=1))
    logits = dec.head(h[:, N:])
    return {
        "right": model(images, ids, targets)[1],
        "sum": ce(logits, targets, "sum"),
        "all positions": ce(logits, targets, "sum") / targets.numel(),
        "every position scored": ce(logits, targets.masked_fill(targets == IGNORE, EOT)),
        "image positions": ce(dec.head(h[:, :T]), targets),
        "text first": ce(dec.head(dec.hidden(torch.cat([text, img], dim=1))[:, :T]), targets),
        "shifted twice": ce(logits[:, :-1], targets[:, 1:]),
        "no image": ce(dec.head(dec.hidden(text)), targets),
    }


_LOSS_MISTAKES = {
    "sum": "you returned the summed loss; use the mean over the positions that have a target (F.cross_entropy's "
    "default reduction, with ignore_index=-100)",
    "all positions": "the loss counts padding tokens: you divided by all B x T positions; average over the ones whose "
    "target is not -100 (ignore_index=-100 does that)",
    "every position scored": "the loss counts padding and prompt positions: you gave them a real target; leave their "
    "-100 in place, which F.cross_entropy skips (ignore_index=-100)",
    "image positions": "your logits come from the first T positions of the decoder, which start with the image "
    "tokens; the text positions are the last T: h[:, n_image:]",
    "text first": "you put the text before the image; the decoder reads [image tokens | text tokens]",
    "shifted twice": "the batch's targets are already shifted (targets[:, t] is the token after input_ids[:, t]); "
    "compare logits[:, t] with targets[:, t], don't shift again",
    "no image": "the decoder never saw the image: put model.image_tokens(images) before the text embeddings",
}


def _reference_step(model: VLM, optimizer, batch: dict, loss_kind: str, zero_grad: bool = True) -> None:
    """One step of a reference copy, on the loss `loss_kind`; without zero_grad the gradients accumulate."""
    _losses(model, batch)[loss_kind].backward()
    optimizer.step()
    if zero_grad:
        optimizer.zero_grad()


def _number(value: Any, what: str) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value.detach())
    if isinstance(value, int | float):
        return float(value)
    raise StudentError(f"{what} returned {type(value).__name__}; return the loss as a number (loss.item())")


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    return all(close(p, q, atol=1e-6, rtol=1e-5) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def check_train_step(student: Student) -> list[Part]:
    """train_step(model, optimizer, batch) -> loss, one SGD step, against VLM.forward's loss and reference steps.

    Diagnoses: the loss summed, averaged over all B*T positions or with padding given a target, taken on image
    positions, with the text before the image, shifted twice, without the image; no backward or no step
    (weights unchanged); gradients cleared between backward and step; gradients not cleared between steps.
    A recognised wrong loss costs its part only: the steps are then compared with steps on that same loss.
    """
    parts = Parts(
        ("returns the mean loss over scored text positions", 3),
        ("backward() and optimizer.step() update the weights", 4),
        ("gradients cleared between steps", 3),
    )
    torch.manual_seed(9)
    g = torch.Generator().manual_seed(9)
    student_model = _train_model()
    start = copy.deepcopy(student_model)
    optimizer = torch.optim.SGD(student_model.parameters(), lr=0.5)
    batches = [_train_batch(g, [(6, 1), (9, 4), (9, 1)]), _train_batch(g, [(9, 1), (4, 1), (7, 3)])]
    hints = {
        "out of bounds": "Positions that must not count carry target -100: pass ignore_index=-100 to F.cross_entropy.",
        "Expected target size": "F.cross_entropy wants logits (B*T, V) and targets (B*T,): flatten both.",
    }
    with torch.no_grad():
        losses = {k: v.item() for k, v in _losses(start, batches[0]).items()}
    what = "train_step(model, optimizer, batch)"
    loss = _number(student.call(what, (student_model, optimizer, batches[0]), hints=hints), what)
    kind = next((k for k, v in losses.items() if math.isclose(loss, v, rel_tol=1e-4)), None)
    problem = None
    if kind != "right":
        problem = _LOSS_MISTAKES.get(kind) or (
            f"your loss is {loss:.4f}, expected {losses['right']:.4f}: the mean cross-entropy of the text positions' "
            "logits against the targets, skipping targets of -100"
        )
    parts.judge("returns the mean loss over scored text positions", problem)

    reference, accumulating = copy.deepcopy(start), copy.deepcopy(start)  # with and without zero_grad
    steppers = [
        (m, torch.optim.SGD(m.parameters(), lr=0.5), zero) for m, zero in ((reference, True), (accumulating, False))
    ]
    if kind is not None:
        for model, opt, zero in steppers:
            _reference_step(model, opt, batches[0], kind, zero)
    problem = None
    if _same_weights(student_model, start):
        has_grads = any(p.grad is not None and p.grad.abs().sum() > 0 for p in student_model.parameters())
        problem = (
            "gradients were computed but the weights did not change: call optimizer.step() after loss.backward()"
            if has_grads
            else "the weights did not change: call loss.backward() and then optimizer.step() (and if you call "
            "optimizer.zero_grad(), call it before backward() or after step(), not in between)"
        )
    elif kind is None:
        problem = "the weights moved, but they cannot be checked while the loss is not one the grader recognises"
    elif not _same_weights(student_model, reference):
        problem = "the weights moved differently from loss.backward(); optimizer.step(): one backward and one step each"
    parts.judge("backward() and optimizer.step() update the weights", problem)
    if problem:
        return parts.finish("not checked: fix the first step first")

    _number(student.call(what, (student_model, optimizer, batches[1]), hints=hints), what)
    for model, opt, zero in steppers:
        _reference_step(model, opt, batches[1], kind, zero)
    problem = None
    if not _same_weights(student_model, reference):
        problem = (
            "gradients from the first step were added to the second's: PyTorch adds to .grad until you clear it, so "
            "call optimizer.zero_grad() once per step"
            if _same_weights(student_model, accumulating)
            else "the second step moved the weights differently from the reference step"
        )
    parts.judge("gradients cleared between steps", problem)
    return parts.finish()
