"""Exercise 16, media_mask: which image each text position may read, in a sequence that holds several images.

nanovlm's cross-attention model reads one image per sequence (notebook 12). Flamingo reads interleaved
sequences, "<image> a red circle <image> a blue square", and lets each text position attend only to the
image that came last before it. The package has no such mask, so the reference is here.
"""

import random

import torch

from .results import Part, Parts
from .student import Student, StudentError, returned_tensor, shape_of

FORBIDDEN = ()  # nothing in the package computes it


def reference_media_mask(tokens: list[int], image_token: int, n_latents: int, mistake: str = "") -> torch.Tensor:
    """(T, images * n_latents) bool: position t reads the latents of the last image tag at or before t."""
    tags = [t for t, token in enumerate(tokens) if token == image_token]
    mask = torch.zeros(len(tokens), len(tags) * n_latents, dtype=torch.bool)
    for t in range(len(tokens)):
        seen = [i for i, p in enumerate(tags) if (p < t if mistake == "strictly after the tag" else p <= t)]
        if mistake == "every earlier image":
            for i in seen:
                mask[t, i * n_latents : (i + 1) * n_latents] = True
        elif seen:
            i = seen[-1]
            if mistake == "latents interleaved":
                mask[t, i :: len(tags)] = True
            else:
                mask[t, i * n_latents : (i + 1) * n_latents] = True
    return mask


MISTAKES = {
    "every earlier image": "your positions read every image before them; Flamingo lets a position read only the "
    "last image before it (the caption after an image is about that image)",
    "strictly after the tag": "the image tag's own position must already read its image: a position reads the last "
    "image whose tag is at or before it",
    "latents interleaved": "image i's latents are columns i * n_latents to (i + 1) * n_latents - 1, the images' "
    "latents laid side by side",
}


def check_media_mask(student: Student) -> list[Part]:
    """media_mask(tokens, image_token, n_latents) -> bool (T, images * n_latents), mistakes named."""
    parts = Parts(
        ("shape (T, images * n_latents), bool", 2),
        ("positions before the first image read nothing", 2),
        ("each position reads only the last image at or before it", 6),
    )
    rng = random.Random(16)
    IMG = 0
    cases = [([IMG, 5, 6, 7], 3), ([4, IMG, 5, IMG, 6, 7], 2), ([4, 4, 5], 3), ([IMG, IMG, 5], 2)]
    for _ in range(12):
        cases.append(([rng.choice([IMG, 3, 4, 5, 6]) for _ in range(rng.randint(3, 14))], rng.randint(1, 4)))
    got = []
    for tokens, n_latents in cases:
        what = f"media_mask({tokens}, image_token={IMG}, n_latents={n_latents})"
        out = returned_tensor(student.call(what, (torch.tensor(tokens), IMG, n_latents)), what)
        want = (len(tokens), tokens.count(IMG) * n_latents)
        if shape_of(out) != want:
            parts.judge(
                "shape (T, images * n_latents), bool",
                f"{what} returned shape {shape_of(out)}, expected {want}: "
                "a row per position, the latents of every image side by side",
            )
            return parts.finish("not checked: fix the shape first")
        if out.dtype != torch.bool:
            raise StudentError(f"{what} returned dtype {out.dtype}; return a bool mask (True: may attend)")
        got.append(out)
    parts.judge("shape (T, images * n_latents), bool", None)

    problem = None
    for out, (tokens, _) in zip(got, cases, strict=True):
        first = tokens.index(IMG) if IMG in tokens else len(tokens)
        if out[:first].any():
            problem = (
                f"in {tokens}, position {int(out[:first].any(1).nonzero()[0])} comes before every image but "
                "reads some latents: its row must be all False"
            )
            break
    parts.judge("positions before the first image read nothing", problem)

    expected = [reference_media_mask(t, IMG, n) for t, n in cases]
    problem = None
    wrong = [i for i in range(len(cases)) if not torch.equal(got[i], expected[i])]
    if wrong:
        found = next(
            (
                m
                for m in MISTAKES
                if all(torch.equal(g, reference_media_mask(t, IMG, n, m)) for g, (t, n) in zip(got, cases, strict=True))
            ),
            None,
        )
        i = wrong[0]
        tokens, n_latents = cases[i]
        row = int((got[i] != expected[i]).any(1).nonzero()[0])
        example = (
            f"in {tokens} with {n_latents} latents per image, position {row} reads columns "
            f"{got[i][row].nonzero().flatten().tolist()}, expected {expected[i][row].nonzero().flatten().tolist()}"
        )
        problem = f"{MISTAKES[found]} ({example})" if found else example
    parts.judge("each position reads only the last image at or before it", problem)
    return parts.finish()
