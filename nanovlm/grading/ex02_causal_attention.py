"""Exercise 2, causal_attention: attention with a causal mask, checked against nanovlm.attention."""

import math

import torch
import torch.nn.functional as F

from .. import attention
from ..attention import attention_math, causal_mask
from .results import Part, Parts
from .student import Student, close, largest_difference, listing, returned_tensor, shape_of

# the package functions the student's code may not call, as (module or class, name)
FORBIDDEN = (
    (attention, "attention_math"),
    (attention, "attention_sdpa"),
    (attention, "causal_mask"),
    (F, "scaled_dot_product_attention"),
)


def check_causal_attention(student: Student) -> list[Part]:
    """causal_attention(q, k, v) -> softmax(q k^T / sqrt(d) + causal mask) v, against nanovlm.attention.

    Which positions a query sees is measured, not guessed: change key/value j and watch which outputs move.
    Diagnoses: leaks to later positions (named, off-by-one called out), a position blind to itself or its
    past (NaN rows), missing or wrong 1/sqrt(d) scale, softmax over the wrong dimension, weights zeroed after
    the softmax instead of -inf before it.
    """
    parts = Parts(
        ("output shape (B, nh, T, hs)", 2),
        ("no position sees a later one", 2),
        ("each position sees itself and all earlier ones", 2),
        ("values: softmax(q k^T / sqrt(d) + mask) v", 4),
    )
    g = torch.Generator().manual_seed(2)
    cases = []
    for shape in [(2, 2, 6, 4), (1, 3, 5, 9)]:
        q, k, v = (torch.randn(shape, generator=g) for _ in range(3))
        what = f"causal_attention(q, k, v of shape {shape})"
        out = returned_tensor(student.call(what, (q, k, v)), what)
        if shape_of(out) != shape:
            parts.judge("output shape (B, nh, T, hs)", f"{what} returned shape {shape_of(out)}, expected {shape}")
            return parts.finish("not checked: fix the output shape first")
        cases.append((q, k, v, out))
    parts.judge("output shape (B, nh, T, hs)", None)

    q, k, v, out = cases[0]
    T = q.size(2)
    sees = _attention_visibility(student, q, k, v, out)
    later = torch.ones(T, T, dtype=torch.bool).triu(1)
    leaks = [(int(i), int(j)) for i, j in zip(*torch.where(sees & later), strict=True)]
    blind = [(int(i), int(j)) for i, j in zip(*torch.where(~sees & ~later), strict=True)]
    nan_rows = sorted({int(t) for t in torch.where(out.isnan())[2]})
    parts.judge("no position sees a later one", _leak_problem(q, k, v, out, leaks) if leaks else None)
    problem = None
    if blind or nan_rows:
        pairs = [f"position {i} cannot see position {j}{' (itself)' if i == j else ''}" for i, j in blind]
        problem = f"{listing(pairs)}: every position must see itself and all earlier ones."
        if blind and all(i == j for i, j in blind):
            problem += " Off by one: the diagonal must stay visible (j <= i, not j < i)."
        if nan_rows:
            problem += (
                f" Your output is NaN at position(s) {listing(nan_rows)}: a row of scores all -inf has no softmax."
            )
    parts.judge("each position sees itself and all earlier ones", problem)

    problem = None
    for i, (q, k, v, out) in enumerate(cases):
        T, d = q.size(2), q.size(-1)
        expected = attention_math(q, k, v, causal_mask(T, T))[0]
        if close(out, expected):
            continue
        if leaks or blind or nan_rows:  # the mask is judged above; judge the scores and softmax on their own
            if close(out[..., -1:, :], expected[..., -1:, :]):  # the last position sees every key, masked or not
                continue
            mask = sees if i == 0 else _attention_visibility(student, q, k, v, out)
            if close(out.nan_to_num(), attention_math(q, k, v, mask)[0].nan_to_num()):  # the student's own mask
                continue
        messages = {
            "unscaled": f"you did not divide the scores by sqrt(d) (d = head size = {d}); without it large dot "
            "products push the softmax towards one-hot. Use q @ k.transpose(-2, -1) / math.sqrt(d).",
            "divided by d": f"you divided the scores by d = {d} instead of sqrt(d) = {math.sqrt(d):.3g}.",
            "times sqrt(d)": "you multiplied the scores by sqrt(d) instead of dividing by it.",
            "softmax over queries": "your softmax runs over the queries (dim=-2); each query's weights over the keys "
            "must sum to 1: softmax(dim=-1).",
        }
        found = next((m for name, m in messages.items() if close(out, _attention_variant(q, k, v, name))), None)
        problem = found or "the values differ from softmax(q k^T / sqrt(d) + mask) v: " + largest_difference(
            out, expected, "batch head position channel"
        )
        break
    parts.judge("values: softmax(q k^T / sqrt(d) + mask) v", problem)
    return parts.finish()


def _leak_problem(q, k, v, out: torch.Tensor, leaks: list[tuple[int, int]]) -> str:
    """Name the later positions a query sees, and the mistake if it is a known one."""
    known = {
        "zero-filled": "You set the scores of later positions to 0, not -inf: exp(0) = 1 still gives them weight. "
        "Use scores.masked_fill(~mask, float('-inf')) before the softmax.",
        "zeroed after softmax": "You zeroed the weights of later positions after the softmax: they are already in the "
        "softmax's denominator, so they still shape every row (and the rows no longer sum to 1). Set the scores to "
        "-inf before the softmax instead.",
        "unmasked": "Nothing is masked: every position sees the whole sequence. Set the scores of later positions to "
        "-inf before the softmax (torch.ones(T, T, dtype=torch.bool).tril() marks what each may see).",
    }
    found = next((m for name, m in known.items() if close(out, _attention_variant(q, k, v, name))), "")
    pairs = [f"position {i} see position {j}" for i, j in leaks]
    problem = f"your mask lets {listing(pairs)}: a position may attend only to itself and the ones before it. "
    if not found and all(j == i + 1 for i, j in leaks):
        found = "Off by one: keep key j for query i when j <= i (torch.tril(..., diagonal=0)), not j <= i + 1."
    return problem + found


def _attention_visibility(student: Student, q, k, v, out: torch.Tensor) -> torch.Tensor:
    """(T, T) bool: [i, j] is True when output position i changes as key and value j change."""
    T = q.size(2)
    sees = torch.zeros(T, T, dtype=torch.bool)
    for j in range(T):
        k2, v2 = k.clone(), v.clone()
        k2[..., j, :] += 1.0
        v2[..., j, :] += 1.0
        moved = returned_tensor(
            student.call(f"causal_attention(q, k, v) with key {j} changed", (q, k2, v2)), "causal_attention"
        )
        sees[:, j] = (moved - out).abs().amax(dim=(0, 1, 3)) > 1e-6  # NaN compares False: a NaN row sees nothing
    return sees


def _attention_variant(q, k, v, mistake: str) -> torch.Tensor:
    """Causal attention computed with one typical mistake, to recognise it in a student's output."""
    T, d = q.size(2), q.size(-1)
    mask = causal_mask(T, T)
    scale = {"unscaled": 1.0, "divided by d": 1 / d, "times sqrt(d)": math.sqrt(d)}.get(mistake, 1 / math.sqrt(d))
    scores = q @ k.transpose(-2, -1) * scale
    if mistake == "zero-filled":
        return scores.masked_fill(~mask, 0.0).softmax(-1) @ v
    if mistake == "zeroed after softmax":
        return (scores.softmax(-1) * mask) @ v
    if mistake == "unmasked":
        return scores.softmax(-1) @ v
    dim = -2 if mistake == "softmax over queries" else -1
    return scores.masked_fill(~mask, float("-inf")).softmax(dim).nan_to_num() @ v
