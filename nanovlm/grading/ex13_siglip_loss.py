"""Exercise 13, siglip_loss: SigLIP's sigmoid loss, the contrastive loss that needs no softmax over the batch.

clip.py trains with CLIP's softmax loss (notebook 08): each image picks its caption out of the batch. SigLIP
(Zhai et al., 2023) asks instead, for every image-caption pair on its own, "do these two belong together?",
a binary question answered by a sigmoid. The package has no sigmoid loss, so the reference is here.
"""

import torch
import torch.nn.functional as F

from .results import Part, Parts
from .student import Student, returned_tensor, shape_of

FORBIDDEN = ()  # nothing in the package computes it


def reference_siglip_loss(
    image: torch.Tensor, text: torch.Tensor, log_t: torch.Tensor, b: torch.Tensor, mistake: str = ""
) -> torch.Tensor:
    """-1/B sum_ij log sigmoid(z_ij (t <x_i, y_j> + b)), x, y unit vectors, t = exp(log_t), z = +1 on the diagonal
    and -1 off it. `mistake` computes a typical wrong version instead, for the feedback."""
    x = image if mistake == "not normalised" else F.normalize(image, dim=-1)
    y = text if mistake == "not normalised" else F.normalize(text, dim=-1)
    t = log_t if mistake == "log_t as t" else log_t.exp()
    logits = t * x @ y.T + (0 if mistake == "no bias" else b)
    B = logits.size(0)
    if mistake == "softmax":
        labels = torch.arange(B)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    z = 2 * torch.eye(B) - 1
    if mistake == "labels 0 and 1":
        z = torch.eye(B)
    if mistake == "diagonal only":
        return -F.logsigmoid(logits.diagonal()).sum() / B
    total = -F.logsigmoid(z * logits).sum()
    return total / (B * B if mistake == "mean over pairs" else B)


MISTAKES = {
    "not normalised": (
        "embeddings scaled to length 1",
        "you use the embeddings as they come; scale each to length "
        "1 first (F.normalize), so their dot product is a cosine similarity",
    ),
    "log_t as t": (
        "temperature exp(log_t), then the bias b",
        "you multiply by log_t itself; the scale is t = "
        "exp(log_t), kept as a log so that it stays positive while it trains",
    ),
    "no bias": ("temperature exp(log_t), then the bias b", "you left out the bias b: logits = t * cosine + b"),
    "softmax": (
        "a binary label per pair: +1 on the diagonal, -1 off it",
        "that is CLIP's softmax loss; SigLIP "
        "scores every pair on its own with a sigmoid, -log sigmoid(z_ij * logit_ij)",
    ),
    "labels 0 and 1": (
        "a binary label per pair: +1 on the diagonal, -1 off it",
        "your labels are 1 and 0; with "
        "log sigmoid(z * logit), a non-matching pair needs z = -1 (log sigmoid(0 * logit) is a "
        "constant and teaches nothing)",
    ),
    "diagonal only": (
        "a binary label per pair: +1 on the diagonal, -1 off it",
        "you score only the matching pairs; the B^2 - B non-matching pairs are the negatives, each with label -1",
    ),
    "mean over pairs": (
        "summed over all pairs, divided by the batch size",
        "you divide by B^2 (a mean over all pairs); SigLIP sums over the pairs and divides by B",
    ),
}


def check_siglip_loss(student: Student) -> list[Part]:
    """siglip_loss(image, text, log_t, b) -> scalar, against reference_siglip_loss, mistakes named."""
    parts = Parts(
        ("a scalar tensor that carries gradients", 2),
        ("embeddings scaled to length 1", 2),
        ("temperature exp(log_t), then the bias b", 2),
        ("a binary label per pair: +1 on the diagonal, -1 off it", 2),
        ("summed over all pairs, divided by the batch size", 2),
    )
    g = torch.Generator().manual_seed(13)
    cases = []
    for B, D in [(4, 8), (6, 16), (3, 5), (8, 32)]:
        image, text = 3 * torch.randn(B, D, generator=g), 0.5 * torch.randn(B, D, generator=g)
        text[0] += image[0]  # one pair that does belong together
        log_t = torch.tensor(float(torch.empty(()).uniform_(1.0, 2.5, generator=g)), requires_grad=True)
        b = torch.tensor(float(torch.empty(()).uniform_(-5.0, -1.0, generator=g)), requires_grad=True)
        cases.append((image, text, log_t, b))

    got = []
    for image, text, log_t, b in cases:
        what = f"siglip_loss(image {tuple(image.shape)}, text {tuple(text.shape)}, log_t, b)"
        raw = student.call(what, (image, text, log_t, b))
        out = returned_tensor(raw, what)
        if shape_of(out) != ():
            parts.judge("a scalar tensor that carries gradients", f"{what} returned shape {shape_of(out)}; return "
                        "one number, the loss of the whole batch")  # fmt: skip
            return parts.finish("not checked: return a scalar first")
        if not (isinstance(raw, torch.Tensor) and raw.requires_grad):
            parts.judge("a scalar tensor that carries gradients", f"{what} returned a loss with no gradient to log_t "
                        "and b; compute it with torch operations on them (no .item(), no float())")  # fmt: skip
            return parts.finish("not checked: keep the gradient first")
        got.append(out)
    parts.judge("a scalar tensor that carries gradients", None)

    def matches(mistake: str) -> bool:
        return all(
            torch.allclose(g_.double(), reference_siglip_loss(*case, mistake).detach().double(), rtol=1e-4, atol=1e-5)
            for g_, case in zip(got, cases, strict=True)
        )

    rest = [name for name in parts.plan if name != "a scalar tensor that carries gradients"]
    if matches(""):
        for name in rest:
            parts.judge(name, None)
        return parts.finish()
    found = next((m for m in MISTAKES if matches(m)), None)
    if found:
        part, message = MISTAKES[found]
        for name in rest:
            parts.judge(name, message if name == part else None)
        return parts.finish()
    image, text, log_t, b = cases[0]
    expected = float(reference_siglip_loss(image, text, log_t, b))
    problem = (
        f"for a batch of {image.size(0)} you return {float(got[0]):.5f}, expected {expected:.5f}: "
        "-1/B * sum over all pairs (i, j) of log sigmoid(z_ij * (exp(log_t) * cos(x_i, y_j) + b))"
    )
    for name in rest:
        parts.judge(name, problem)
    return parts.finish()
