"""Exercise 1, patchify: cutting images into patches, checked against nanovlm.vit.patchify."""

import math

import numpy as np
import torch

from .. import vit
from .results import Part, Parts
from .student import Student, listing, returned_tensor, shape_of

# the package functions the student's code may not call, as (module or class, name)
FORBIDDEN = ((vit, "patchify"),)


def check_patchify(student: Student) -> list[Part]:
    """patchify(images (B, C, H, W), patch_size) -> (B, N, P*P*C), against nanovlm.vit.patchify.

    Every input pixel has a different value, so each output number tells where it came from: the check can
    say which square a patch was cut from and which pixel and channel sits at each place inside it.
    Diagnoses: wrong shape, patches that are not one square (a plain reshape), column-by-column patch order,
    channel-first or column-first order inside a patch, values changed.
    """
    parts = Parts(
        ("output shape (B, N, P*P*C)", 2),
        ("each patch is one P x P square", 3),
        ("patches in row-by-row order", 3),
        ("pixel order inside a patch (p1 p2 c)", 2),
    )
    g = torch.Generator().manual_seed(1)
    cases = [((2, 3, 16, 16), 4), ((1, 3, 8, 12), 4), ((2, 2, 6, 6), 3)]  # a wide image: rows != columns
    results = []
    for shape, p in cases:
        perm = torch.randperm(math.prod(shape), generator=g)
        what = f"patchify(images of shape {shape}, patch_size={p})"
        out = returned_tensor(student.call(what, (perm.float().view(shape), p)), what)
        B, C, H, W = shape
        expected = (B, (H // p) * (W // p), p * p * C)
        if shape_of(out) != expected:
            hint = ""
            if shape_of(out) == (B, p * p * C, expected[1]):
                hint = " Patches and their contents are swapped: patches go along dim 1."
            elif out.dim() != 3:
                hint = " Flatten each patch into one vector."
            parts.judge(
                "output shape (B, N, P*P*C)",
                f"{what} returned shape {shape_of(out)}, expected {expected}: N = (H/P)(W/P) = {expected[1]} patches "
                f"of P*P*C = {expected[2]} numbers each.{hint}",
            )
            return parts.finish("not checked: fix the output shape first")
        results.append((shape, p, out, perm))
    parts.judge("output shape (B, N, P*P*C)", None)

    problems: dict[str, str] = {}
    for shape, p, out, perm in results:
        for name, problem in _patch_problems(shape, p, out, perm).items():
            problems.setdefault(name, problem)
    if "values" in problems:
        parts.judge("each patch is one P x P square", problems["values"])
        return parts.finish("not checked: patchify must only move pixels, not change them")
    parts.judge("each patch is one P x P square", problems.get("square"))
    if "square" in problems:
        return parts.finish("not checked: fix how the patches are cut first")
    parts.judge("patches in row-by-row order", problems.get("order"))
    parts.judge("pixel order inside a patch (p1 p2 c)", problems.get("inside"))
    return parts.finish()


def _patch_problems(shape: tuple[int, ...], p: int, out: torch.Tensor, perm: torch.Tensor) -> dict[str, str]:
    """What is wrong with one patchify output, keyed by part: values, square, order, inside."""
    B, C, H, W = shape
    nh, nw = H // p, W // p
    values = out.double().numpy()
    if (
        not np.isfinite(values).all()
        or (values != np.round(values)).any()
        or values.min() < 0
        or values.max() >= perm.numel()
    ):
        return {"values": "your output holds numbers that are not pixels of the input: patchify only rearranges pixels"}
    flat_index = np.argsort(perm.numpy())[values.astype(np.int64)]  # where in the input each output number was
    b, c, y, x = np.unravel_index(flat_index, shape)  # each (B, N, P*P*C)
    problems = {}
    wrong_image = np.argwhere(b != np.arange(B)[:, None, None])
    if len(wrong_image):
        i, n, j = wrong_image[0]
        problems["square"] = (
            f"patch {n} of image {i} holds pixels of image {b[i, n, j]}: every image keeps its own patches, so "
            "the batch dimension stays first ('b c (h p1) (w p2) -> b ...')"
        )
        return problems
    square = (y // p) * nw + x // p  # (B, N, L) index of the grid square, row by row
    for i, n in np.ndindex(B, nh * nw):
        if (square[i, n] != square[i, n, 0]).any() or len(set(flat_index[i, n])) != flat_index.shape[-1]:
            found = sorted({(int(r), int(col)) for r, col in zip(y[i, n] // p, x[i, n] // p, strict=True)})
            problems["square"] = (
                f"patch {n} of image {i} mixes pixels of the grid squares (row, column) {listing(found)}: a patch "
                f"must be one {p}x{p} square with all {C} channels of its pixels. A plain reshape/view of "
                "(B, C, H, W) cannot do this, because a patch's rows are not next to each other in memory; split H "
                "as (h p1) and W as (w p2) first, e.g. rearrange(images, 'b c (h p1) (w p2) -> b (h w) (p1 p2 c)')"
            )
            return problems
    got = square[:, :, 0]  # (B, N)
    expected = np.arange(nh * nw)
    if (got != expected).any():
        n = int(np.argmax((got != expected).any(axis=0)))
        column_major = (np.arange(nh * nw) % nh) * nw + np.arange(nh * nw) // nh
        how = (
            "You numbered the patches column by column (down the first column first); put h before w, '(h w)'."
            if (got == column_major).all()
            else "Number them row by row from the top left: '(h w)'."
        )
        problems["order"] = (
            f"patch {n} is the square at grid row {got[0, n] // nw}, column {got[0, n] % nw}; expected row {n // nw}, "
            f"column {n % nw}. {how}"
        )
    dy, dx = y % p, x % p
    position = np.arange(p * p * C)
    if ((dy * p + dx) * C + c != position).any():
        if (c * p * p + dy * p + dx == position).all():
            how = "each patch lists one channel after the other (c p1 p2); keep a pixel's channels together: (p1 p2 c)"
        elif ((dx * p + dy) * C + c == position).all():
            how = "the pixels inside a patch go column by column (p2 p1 c); go row by row: (p1 p2 c)"
        else:
            j = int(np.argmax(((dy * p + dx) * C + c != position).reshape(-1, p * p * C).any(axis=0)))
            e_dy, e_dx, e_c = np.unravel_index(j, (p, p, C))
            how = (
                f"number {j} of a patch is channel {c[0, 0, j]} of pixel (row {dy[0, 0, j]}, column {dx[0, 0, j]}) "
                f"of its square; expected channel {e_c} of pixel (row {e_dy}, column {e_dx}): flatten as (p1 p2 c)"
            )
        problems["inside"] = how
    return problems
