"""Grade the exercise notebooks: nanovlm's own checks, run on a student's function in a separate process.

    python -m nanovlm grade submitted/01_patchify_exercise.ipynb [more.ipynb | a folder ...] [--json]
    python -m nanovlm grade --make-student exercises/source exercises/release

Each exercise notebook (exercises/source/NN_name_exercise.ipynb) asks for one function, written between
`### BEGIN SOLUTION` and `### END SOLUTION` in a cell marked as an nbgrader solution cell whose grade_id is
the function's name. To grade a submitted notebook, the grader

- finds that cell (by its nbgrader grade_id, or else by the function it defines),
- runs the notebook's setup cells and that cell in a fresh process with a time limit, so that an infinite
  loop or a crash costs that exercise only (the notebook's test cells are never run: a student can edit them),
- calls the function on seeded random inputs of several shapes and compares it with the package's own
  implementation, through the check function of that exercise below,
- prints a score per part, with feedback that names the mistake and the fix ("your mask lets position 0
  see position 1 ..."), and a total.

The same checks run inside the notebooks (`check("patchify", patchify)`) so that students see the feedback
while they work. `make_student_version` does to a notebook what `nbgrader generate_assignment` does:
solution regions become `raise NotImplementedError()`, hidden tests disappear, outputs are cleared.

The separate process and the time limit protect the grading from mistakes, not from malice: a student's
code runs with the permissions of whoever runs the grader.
"""

import argparse
import contextlib
import copy
import itertools
import json
import math
import multiprocessing
import os
import random
import re
import textwrap
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from . import attention, metrics, projector, vit, vlm
from .attention import KVCache, MultiHeadAttention, attention_math, causal_mask
from .decoder import DecoderConfig
from .projector import Projector, ProjectorConfig, pixel_shuffle
from .vit import ViTConfig
from .vlm import IGNORE, VLM, VLMConfig

POINTS = 10  # every exercise is worth the same
SOLUTION_FILE = "<your solution cell>"  # the file name tracebacks show for the student's cell
STUB = "# YOUR CODE HERE\nraise NotImplementedError()"  # what nbgrader puts in place of a solution
TEXT_STUB = "YOUR ANSWER HERE"
PRELUDE = "import math\nimport numpy as np\nimport torch\nimport torch.nn as nn\nimport torch.nn.functional as F\n"
PRELUDE += "from collections import Counter\nfrom einops import rearrange\n"  # usable without an import


# ----------------------------------------------------------------------------- results


@dataclass
class Part:
    """One graded part of an exercise: what was checked, the points, and what to fix (or "ok")."""

    name: str
    points: int
    earned: int
    message: str


@dataclass
class Result:
    """The grade of one exercise. `error` says why nothing could be graded (not attempted, crash, time-out)."""

    exercise: str
    number: int
    title: str
    points: int
    score: int
    parts: list[Part] = field(default_factory=list)
    error: str | None = None

    @property
    def full_marks(self) -> bool:
        return self.score == self.points


@dataclass
class NotebookGrade:
    """The grades of the exercises found in one submitted notebook."""

    path: str
    results: list[Result]
    error: str | None = None

    @property
    def score(self) -> int:
        return sum(r.score for r in self.results)

    @property
    def points(self) -> int:
        return sum(r.points for r in self.results)


class Parts:
    """The parts of one exercise's grade, declared up front, judged one by one as the check goes."""

    def __init__(self, *plan: tuple[str, int]) -> None:
        if sum(points for _, points in plan) != POINTS:
            raise ValueError(f"the parts {plan} add up to {sum(p for _, p in plan)} points, not {POINTS}")
        self.plan = dict(plan)
        self.judged: dict[str, Part] = {}

    def judge(self, name: str, problem: str | None, note: str | None = None) -> None:
        """Record part `name`: full points if problem is None (with an optional note), else zero and the problem."""
        points = self.plan[name]
        message = problem if problem else "ok" + (f" ({note})" if note else "")
        self.judged[name] = Part(name, points, 0 if problem else points, message)

    def finish(self, reason: str = "not checked: fix the part above first") -> list[Part]:
        """All parts in plan order; the ones not judged get zero with `reason`."""
        return [self.judged.get(name) or Part(name, points, 0, reason) for name, points in self.plan.items()]


# ----------------------------------------------------------------------------- calling the student's code


class StudentError(Exception):
    """The student's function crashed or returned something unusable: the exercise cannot be graded further."""


class NotAttempted(Exception):
    """The function still raises NotImplementedError."""


class UsedReference(Exception):
    """The student's function called the package function it is asked to write."""


_student_running = False  # True while the student's function runs: the guards below refuse package calls then
_phase_sink: Callable[[str], None] | None = None  # in the grading process: tells the parent what is running


def _phase(text: str) -> None:
    if _phase_sink is not None:
        _phase_sink(text)


def _call(fn: Callable, what: str, args: tuple, kwargs: dict | None = None, hints: dict[str, str] | None = None):
    """Call the student's function; any exception becomes a StudentError naming the call, the line and a hint."""
    global _student_running
    _phase(f"calling {what}")
    _student_running = True
    try:
        return fn(*args, **(kwargs or {}))
    except NotImplementedError:
        name = getattr(fn, "__name__", "the function")
        raise NotAttempted(
            f"not attempted: {name} raises NotImplementedError; write your solution in its cell"
        ) from None
    except UsedReference as e:
        raise StudentError(
            f"{what} calls {e}, the very function this exercise asks you to write: write it yourself"
        ) from None
    except Exception as e:
        hint = next((f". {h}" for key, h in (hints or {}).items() if key in str(e)), "")
        raise StudentError(f"{what} raised {type(e).__name__}: {e}{_where(e)}{hint}") from None
    finally:
        _student_running = False


def _where(error: BaseException) -> str:
    """' (line N of your solution cell)' for the deepest traceback frame in the student's code, else ''."""
    line = None
    tb = error.__traceback__
    while tb is not None:
        name = tb.tb_frame.f_code.co_filename
        if name == SOLUTION_FILE or "ipykernel_" in name:
            line = tb.tb_lineno
        tb = tb.tb_next
    return f" (line {line} of your solution cell)" if line else ""


@contextlib.contextmanager
def _forbid(targets: tuple[tuple[Any, str], ...]) -> Iterator[None]:
    """While active, the student's code calling one of targets ((module or class, name)) raises UsedReference.

    The check's own calls of the same functions (the reference answers) go through untouched.
    """
    saved = []
    for owner, name in targets:
        original = getattr(owner, name)

        def guard(*args, _original=original, _name=f"{owner.__name__}.{name}", **kwargs):
            if _student_running:
                raise UsedReference(_name)
            return _original(*args, **kwargs)

        saved.append((owner, name, owner.__dict__[name]))
        setattr(owner, name, guard)
    try:
        yield
    finally:
        for owner, name, original in reversed(saved):
            setattr(owner, name, original)


def _tensor(value: Any, what: str) -> torch.Tensor:
    """The student's return value as a detached tensor, or a StudentError saying what came back instead."""
    if isinstance(value, torch.Tensor):
        return value.detach()
    if value is None:
        raise StudentError(f"{what} returned None: did you forget the `return`?")
    if isinstance(value, tuple):
        raise StudentError(f"{what} returned a tuple of {len(value)} things; return one tensor")
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        raise StudentError(f"{what} returned a {type(value).__name__}; return a torch.Tensor") from None


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-5, rtol: float = 1e-4) -> bool:
    return a.shape == b.shape and torch.allclose(a.double(), b.double(), atol=atol, rtol=rtol)


def _largest_difference(got: torch.Tensor, expected: torch.Tensor, dims: str) -> str:
    """'largest difference 0.31 at (batch 0, head 1, position 2)' for two tensors of one shape."""
    diff = (got.double() - expected.double()).abs().nan_to_num(nan=math.inf)
    index = np.unravel_index(int(diff.argmax()), tuple(diff.shape))
    place = ", ".join(f"{name} {i}" for name, i in zip(dims.split(), index, strict=False))
    return f"largest difference {float(diff.max()):.3g} at ({place})"


def _listing(items: list, limit: int = 4) -> str:
    shown = ", ".join(str(i) for i in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


# ============================================================================= the checks, one per exercise
# Each takes the student's function and returns the graded parts. Inputs are seeded, so a student's grade does
# not change between runs; they are drawn afresh here, so fitting the visible tests of a notebook does not help.


# ----------------------------------------------------------------------------- 1. patchify


def check_patchify(patchify: Callable) -> list[Part]:
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
        out = _tensor(_call(patchify, what, (perm.float().view(shape), p)), what)
        B, C, H, W = shape
        expected = (B, (H // p) * (W // p), p * p * C)
        if _shape(out) != expected:
            hint = ""
            if _shape(out) == (B, p * p * C, expected[1]):
                hint = " Patches and their contents are swapped: patches go along dim 1."
            elif out.dim() != 3:
                hint = " Flatten each patch into one vector."
            parts.judge(
                "output shape (B, N, P*P*C)",
                f"{what} returned shape {_shape(out)}, expected {expected}: N = (H/P)(W/P) = {expected[1]} patches "
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
                f"patch {n} of image {i} mixes pixels of the grid squares (row, column) {_listing(found)}: a patch "
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


# ----------------------------------------------------------------------------- 2. attention with a causal mask


def check_causal_attention(causal_attention: Callable) -> list[Part]:
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
        out = _tensor(_call(causal_attention, what, (q, k, v)), what)
        if _shape(out) != shape:
            parts.judge("output shape (B, nh, T, hs)", f"{what} returned shape {_shape(out)}, expected {shape}")
            return parts.finish("not checked: fix the output shape first")
        cases.append((q, k, v, out))
    parts.judge("output shape (B, nh, T, hs)", None)

    q, k, v, out = cases[0]
    T = q.size(2)
    sees = _attention_visibility(causal_attention, q, k, v, out)
    later = torch.ones(T, T, dtype=torch.bool).triu(1)
    leaks = [(int(i), int(j)) for i, j in zip(*torch.where(sees & later), strict=True)]
    blind = [(int(i), int(j)) for i, j in zip(*torch.where(~sees & ~later), strict=True)]
    nan_rows = sorted({int(t) for t in torch.where(out.isnan())[2]})
    parts.judge("no position sees a later one", _leak_problem(q, k, v, out, leaks) if leaks else None)
    problem = None
    if blind or nan_rows:
        pairs = [f"position {i} cannot see position {j}{' (itself)' if i == j else ''}" for i, j in blind]
        problem = f"{_listing(pairs)}: every position must see itself and all earlier ones."
        if blind and all(i == j for i, j in blind):
            problem += " Off by one: the diagonal must stay visible (j <= i, not j < i)."
        if nan_rows:
            problem += (
                f" Your output is NaN at position(s) {_listing(nan_rows)}: a row of scores all -inf has no softmax."
            )
    parts.judge("each position sees itself and all earlier ones", problem)

    problem = None
    for i, (q, k, v, out) in enumerate(cases):
        T, d = q.size(2), q.size(-1)
        expected = attention_math(q, k, v, causal_mask(T, T))[0]
        if _close(out, expected):
            continue
        if leaks or blind or nan_rows:  # the mask is judged above; judge the scores and softmax on their own
            if _close(out[..., -1:, :], expected[..., -1:, :]):  # the last position sees every key, masked or not
                continue
            mask = sees if i == 0 else _attention_visibility(causal_attention, q, k, v, out)
            if _close(out.nan_to_num(), attention_math(q, k, v, mask)[0].nan_to_num()):  # the student's own mask
                continue
        messages = {
            "unscaled": f"you did not divide the scores by sqrt(d) (d = head size = {d}); without it large dot "
            "products push the softmax towards one-hot. Use q @ k.transpose(-2, -1) / math.sqrt(d).",
            "divided by d": f"you divided the scores by d = {d} instead of sqrt(d) = {math.sqrt(d):.3g}.",
            "times sqrt(d)": "you multiplied the scores by sqrt(d) instead of dividing by it.",
            "softmax over queries": "your softmax runs over the queries (dim=-2); each query's weights over the keys "
            "must sum to 1: softmax(dim=-1).",
        }
        found = next((m for name, m in messages.items() if _close(out, _attention_variant(q, k, v, name))), None)
        problem = found or "the values differ from softmax(q k^T / sqrt(d) + mask) v: " + _largest_difference(
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
    found = next((m for name, m in known.items() if _close(out, _attention_variant(q, k, v, name))), "")
    pairs = [f"position {i} see position {j}" for i, j in leaks]
    problem = f"your mask lets {_listing(pairs)}: a position may attend only to itself and the ones before it. "
    if not found and all(j == i + 1 for i, j in leaks):
        found = "Off by one: keep key j for query i when j <= i (torch.tril(..., diagonal=0)), not j <= i + 1."
    return problem + found


def _attention_visibility(fn: Callable, q, k, v, out: torch.Tensor) -> torch.Tensor:
    """(T, T) bool: [i, j] is True when output position i changes as key and value j change."""
    T = q.size(2)
    sees = torch.zeros(T, T, dtype=torch.bool)
    for j in range(T):
        k2, v2 = k.clone(), v.clone()
        k2[..., j, :] += 1.0
        v2[..., j, :] += 1.0
        moved = _tensor(_call(fn, f"causal_attention(q, k, v) with key {j} changed", (q, k2, v2)), "causal_attention")
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


# ----------------------------------------------------------------------------- 3. one KV-cache decode step


def check_decode_step(decode_step: Callable) -> list[Part]:
    """decode_step(attn, x, cache) -> what attn(x, causal=True, cache=cache) returns, for any number of new tokens.

    Decodes a sequence one token at a time and as a prompt chunk followed by tokens, and compares with the
    full causal forward pass. Diagnoses: nothing appended, keys stored under the wrong layer, new tokens
    attending only to themselves, a chunk attending to its own future or not to the cache (positions named).
    """
    parts = Parts(
        ("output shape (B, T_new, C)", 2),
        ("one token at a time matches the full pass", 3),
        ("a chunk of new tokens: causal, after the cache", 3),
        ("the cache holds every key and value once", 2),
    )
    torch.manual_seed(3)
    B, T, C = 2, 7, 16
    attn = MultiHeadAttention(C, n_heads=2, layer=1).eval()
    x = torch.randn(B, T, C)
    hints = {"must match the size": "Is your mask (T_new, T_new)? With a cache it is (T_new, T_past + T_new)."}

    def run(chunks: list[tuple[int, int]], xs: torch.Tensor = x) -> tuple[torch.Tensor, KVCache]:
        cache = KVCache()
        outs = []
        for a, b in chunks:
            what = f"decode_step(attn, x[:, {a}:{b}], cache) with {a} position(s) cached"
            out = _tensor(_call(decode_step, what, (attn, xs[:, a:b], cache), hints=hints), what)
            if _shape(out) != (B, b - a, C):
                raise _ShapeProblem(f"{what} returned shape {_shape(out)}, expected {(B, b - a, C)}")
            outs.append(out)
        return torch.cat(outs, dim=1), cache

    with torch.no_grad():
        full = attn(x, causal=True)
        steps = [(t, t + 1) for t in range(T)]
        try:
            stepwise, step_cache = run(steps)
        except _ShapeProblem as e:
            parts.judge("output shape (B, T_new, C)", str(e))
            return parts.finish("not checked: fix the output shape first")
        parts.judge("output shape (B, T_new, C)", None)
        problem = None
        if not _close(stepwise, full):
            problem = _visibility_problem(run, steps, x, stepwise) or (
                "decoding token by token differs from the full causal pass: "
                + _largest_difference(stepwise, full, "batch position channel")
            )
        parts.judge("one token at a time matches the full pass", problem)

        chunks = [(0, 4), (4, 7)]
        try:
            chunked, cache = run(chunks)
            problem = None
            if not _close(chunked, full):
                problem = _visibility_problem(run, chunks, x, chunked) or (
                    "a prompt chunk followed by tokens differs from the full causal pass: "
                    + _largest_difference(chunked, full, "batch position channel")
                )
        except (StudentError, _ShapeProblem) as e:
            problem, cache = f"with a prompt chunk of 4 tokens: {e}", step_cache
        parts.judge("a chunk of new tokens: causal, after the cache", problem)

        reference = KVCache()
        for a, b in chunks:
            attn(x[:, a:b], causal=True, cache=reference)
        parts.judge("the cache holds every key and value once", _cache_problem(cache, reference, attn.layer))
    return parts.finish()


class _ShapeProblem(Exception):
    """A decode step returned the wrong shape."""


def _visibility_problem(run: Callable, chunks: list[tuple[int, int]], x: torch.Tensor, out: torch.Tensor) -> str | None:
    """Name the positions that see a later one or miss an earlier one, found by changing one input at a time."""
    T = x.size(1)
    sees = torch.zeros(T, T, dtype=torch.bool)  # [i, j]: output i moves when input j does
    for j in range(T):
        x2 = x.clone()
        x2[:, j] += 1.0
        moved, cache = run(chunks, x2)
        sees[:, j] = (moved - out).abs().amax(dim=(0, 2)) > 1e-6
    chunk_start = {i: a for a, b in chunks for i in range(a, b)}
    leaks = [f"position {i} saw position {j}" for i in range(T) for j in range(i + 1, T) if sees[i, j]]
    blind = [(i, j) for i in range(T) for j in range(i) if not sees[i, j]]
    cached = [(i, j) for i in range(T) for j in range(chunk_start[i])]  # (new token, a position cached before it)
    where = "one token at a time" if len(chunks) == T else f"in chunks {', '.join(f'{a}..{b - 1}' for a, b in chunks)}"
    if leaks:
        return (
            f"decoding {where}, {_listing(leaks)}, which come(s) after it: new tokens need the causal mask too, "
            "shifted by the cached length (query i sits at position T_past + i and sees keys 0 .. T_past + i)"
        )
    if blind and set(cached) <= set(blind):
        empty = " (nothing was appended to it)" if len(cache) == 0 else ""
        return (
            f"decoding {where}, the new tokens never saw the cached positions{empty}: append this step's keys and "
            "values with cache.append(attn.layer, k, v) and attend over everything it returns"
        )
    if blind:
        pairs = [f"position {i} could not see position {j}" for i, j in blind]
        return (
            f"decoding {where}, {_listing(pairs)}: a plain tril() of the (T_new, T_past + T_new) mask forgets the "
            "cached positions; query i sits at position T_past + i, so use tril(diagonal=T_past)"
        )
    return None


def _cache_problem(cache: KVCache, reference: KVCache, layer: int) -> str | None:
    """What is wrong with the keys and values a student's steps left in the cache, or None."""
    if not cache.keys:
        return "the cache is empty: call cache.append(attn.layer, k, v) in every step"
    if list(cache.keys) != [layer]:
        return (
            f"the keys are stored under layer {_listing(list(cache.keys))}; this module's slot is attn.layer = {layer} "
            "(a model shares one cache between its layers)"
        )
    got, want = cache.keys[layer], reference.keys[layer]
    if got.shape != want.shape:
        return (
            f"after 7 positions the cache holds keys of shape {_shape(got)}, expected {_shape(want)} "
            "(B, n_heads, T, head size): append each step's keys once, split into heads"
        )
    if not _close(got, want) or not _close(cache.values[layer], reference.values[layer]):
        return "the cached keys/values differ from attn.qkv(x) split into heads (B, n_heads, T, head size)"
    return None


# ----------------------------------------------------------------------------- 4. the projector


_SHUFFLES = {  # pixel-shuffle orders, the right one first: name -> einops pattern
    "right": "b (h s1 w s2) c -> b (h w) (s1 s2 c)",
    "strip": "b (n s1 s2) c -> b n (s1 s2 c)",  # s*s consecutive tokens of the sequence
    "channels first": "b (h s1 w s2) c -> b (h w) (c s1 s2)",
    "columns first": "b (h s1 w s2) c -> b (h w) (s2 s1 c)",
    "grid transposed": "b (h s1 w s2) c -> b (w h) (s1 s2 c)",
}
_ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu (tanh)": lambda t: F.gelu(t, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "none": lambda t: t,
}


def _projector_variant(proj: Projector, x: torch.Tensor, s: int, shuffle: str, activation: str) -> torch.Tensor:
    """The projector's output with the given shuffle order and activation (the right ones: "right", "gelu")."""
    sizes = {"s1": s, "s2": s} if shuffle == "strip" else {"s1": s, "s2": s, "h": math.isqrt(x.size(1)) // s}
    return proj.proj(_ACTIVATIONS[activation](proj.fc(rearrange(x, _SHUFFLES[shuffle], **sizes))))


def check_project(project: Callable) -> list[Part]:
    """project(projector, x) -> what Projector.forward returns: pixel shuffle by s, then fc -> GELU -> proj.

    Recognises the typical shuffles (s*s consecutive tokens instead of an s x s square, channels first,
    columns first, the grid transposed) and activations (ReLU, none), by computing each and comparing.
    """
    parts = Parts(
        ("output shape (B, N / s^2, out_dim)", 3),
        ("pixel shuffle merges s x s squares as (s1 s2 c)", 4),
        ("MLP: fc -> GELU -> proj", 3),
    )
    torch.manual_seed(4)
    hints = {"cannot be multiplied": "projector.fc expects vectors of width in_dim * s^2: pixel-shuffle x first."}
    cases = []
    for B, N, C, s in [(2, 16, 8, 2), (1, 36, 4, 3), (2, 9, 8, 1)]:
        proj = Projector(ProjectorConfig(in_dim=C, out_dim=12, pixel_shuffle=s))
        x = torch.randn(B, N, C)
        seen: list[torch.Tensor] = []  # what the student fed to projector.fc (if it called the module)
        hook = proj.fc.register_forward_pre_hook(lambda module, inputs, seen=seen: seen.append(inputs[0].detach()))
        what = f"project(projector with pixel_shuffle={s}, x of shape {(B, N, C)})"
        try:
            with torch.no_grad():
                out = _tensor(_call(project, what, (proj, x), hints=hints), what)
        finally:
            hook.remove()
        expected = (B, N // s**2, 12)
        if _shape(out) != expected:
            hint = ""
            if _shape(out)[:2] == (B, N) and s > 1:
                hint = f" The tokens were not merged: with pixel_shuffle={s} every {s}x{s} square becomes one token."
            elif _shape(out)[-1] == C * s * s:
                hint = f" {C * s * s} is the merged width C*s^2: the MLP (fc -> GELU -> proj) maps it to out_dim = 12."
            parts.judge(
                "output shape (B, N / s^2, out_dim)", f"{what} returned shape {_shape(out)}, expected {expected}.{hint}"
            )
            return parts.finish("not checked: fix the output shape first")
        cases.append((proj, x, s, out, seen[0] if seen else None))
    parts.judge("output shape (B, N / s^2, out_dim)", None)

    with torch.no_grad():
        for shuffle, activation in itertools.product(_SHUFFLES, _ACTIVATIONS):
            if all(_close(out, _projector_variant(p, x, s, shuffle, activation)) for p, x, s, out, _ in cases):
                return _judge_projector(parts, shuffle, activation)
        fed_right = all(seen is not None and _close(seen, pixel_shuffle(x, s)) for _, x, s, _, seen in cases)
        proj, x, s, out, _ = cases[0]
        expected = proj(x)
    if fed_right:
        parts.judge("pixel shuffle merges s x s squares as (s1 s2 c)", None)
        parts.judge(
            "MLP: fc -> GELU -> proj",
            "the MLP's output differs from projector.proj(F.gelu(projector.fc(merged))): "
            + _largest_difference(out, expected, "batch token channel"),
        )
        return parts.finish()
    parts.judge(
        "pixel shuffle merges s x s squares as (s1 s2 c)",
        "the output matches no pixel shuffle followed by the MLP: merge each s x s square of neighbouring tokens "
        "into one, rearrange(x, 'b (h s1 w s2) c -> b (h w) (s1 s2 c)', s1=s, s2=s, h=side // s)",
    )
    return parts.finish("not checked: fix the pixel shuffle first")


def _judge_projector(parts: Parts, shuffle: str, activation: str) -> list[Part]:
    """Judge the shuffle and MLP parts once the student's output matched a (shuffle, activation) pair."""
    shuffles = {
        "right": None,
        "strip": "you merged s*s consecutive tokens of the sequence; the grid is flattened row by row, so those lie "
        "along one row. Merge s x s squares instead (for s = 2 on a 4x4 grid, tokens 0, 1, 4, 5 become the first): "
        "rearrange(x, 'b (h s1 w s2) c -> b (h w) (s1 s2 c)', s1=s, s2=s, h=side // s)",
        "channels first": "each merged token lists the channels first (c s1 s2); keep each patch's channels "
        "together: (s1 s2 c)",
        "columns first": "inside a merged token the patches go column by column (s2 s1 c); go row by row: (s1 s2 c)",
        "grid transposed": "the merged tokens come out column by column (w h); keep the row-by-row order (h w)",
    }
    activations = {
        "gelu": None,
        "gelu (tanh)": None,
        "relu": "the MLP uses ReLU; the projector's MLP is fc -> GELU -> proj (F.gelu)",
        "silu": "the MLP uses SiLU; the projector's MLP is fc -> GELU -> proj (F.gelu)",
        "none": "there is no activation between fc and proj: two linear maps in a row are just one linear map; "
        "put F.gelu between them",
    }
    parts.judge("pixel shuffle merges s x s squares as (s1 s2 c)", shuffles[shuffle])
    note = (
        "GELU's tanh approximation; nanovlm uses the exact GELU, about 1e-3 apart"
        if activation == "gelu (tanh)"
        else None
    )
    parts.judge("MLP: fc -> GELU -> proj", activations[activation], note)
    return parts.finish()


# ----------------------------------------------------------------------------- 5. joining image and text, the loss mask

EOT, IMAGE, USER, ASSISTANT = 0, 1, 2, 3  # special token ids of the toy vocabulary the checks use (words: 10..)


def _token_rows(g: torch.Generator, rows: list[tuple[int, int]], T: int, vocab: int = 50) -> tuple[torch.Tensor, ...]:
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


def _reference_join(image_tokens, text_embeds, tokens, lengths, prompt_lengths) -> tuple[torch.Tensor, torch.Tensor]:
    """The joined inputs (B, N+T, D) and targets (B, N+T), by the rule of nanovlm.data.Loader and nanovlm.vlm.VLM.

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


def check_join_image_and_text(join_image_and_text: Callable) -> list[Part]:
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
        tokens, lengths, prompts = _token_rows(g, rows, T)
        image, text = torch.randn(B, N, D, generator=g), torch.randn(B, T, D, generator=g)
        what = (
            f"join_image_and_text(image tokens {(B, N, D)}, text embeddings {(B, T, D)}, tokens {(B, T + 1)}, "
            f"lengths {lengths.tolist()}, prompt_lengths {prompts.tolist()})"
        )
        result = _call(join_image_and_text, what, (image, text, tokens, lengths, prompts))
        if not (isinstance(result, tuple | list) and len(result) == 2):
            raise StudentError(f"{what} returned a {type(result).__name__}; return the pair (inputs, targets)")
        inputs, targets = _tensor(result[0], what), _tensor(result[1], what)
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
    expected_inputs, expected = _reference_join(image, text, tokens, lengths, prompts)
    problems = {}
    if _shape(inputs) != (B, N + T, D):
        problems["joined"] = (
            f"the joined inputs have shape {_shape(inputs)}, expected {(B, N + T, D)}: the N = {N} image tokens, "
            f"then the T = {T} text embeddings, along dim 1"
        )
    elif _close(inputs, torch.cat([text, image], dim=1)):
        problems["joined"] = (
            "your sequence starts with the text; the image tokens come first, so that every word can attend to the "
            "picture: torch.cat([image_tokens, text_embeds], dim=1)"
        )
    elif not _close(inputs, expected_inputs):
        problems["joined"] = "the joined inputs differ from torch.cat([image_tokens, text_embeds], dim=1)"
    if _shape(targets) != (B, N + T):
        hint = " You returned targets for the text positions only." if _shape(targets) == (B, T) else ""
        problems["targets shape"] = (
            f"the targets have shape {_shape(targets)}, expected {(B, N + T)}: one per position of the joined "
            f"sequence, -100 on the {N} image positions.{hint}"
        )
        return problems
    targets = targets.long()
    scored_images = sorted({int(p) for p in torch.where(targets[:, :N] != IGNORE)[1]})
    if scored_images:
        problems["image"] = (
            f"image positions {_listing(scored_images)} have targets: the image tokens are given, not predicted, so "
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
                f"the loss counts the prompt: row {b} has targets at text positions {_listing(scored_prompt)} "
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
                f"the loss counts padding tokens: row {b} has targets at text positions {_listing(scored_padding)}, "
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


# ----------------------------------------------------------------------------- 6. greedy, temperature and top-p


def _tempered(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(log(probs) / temperature): the distribution sampling with that temperature follows."""
    return (probs.log() / temperature).softmax(-1)


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """(V,) bool, the tokens top-p keeps: most likely first, while the mass ranked above a token is below top_p."""
    order = probs.argsort(descending=True)
    mass_before = probs[order].cumsum(0) - probs[order]
    keep = torch.zeros(probs.shape, dtype=torch.bool)
    keep[order[mass_before < top_p]] = True
    return keep


def _fmt(probs: torch.Tensor) -> str:
    return "[" + ", ".join(f"{p:.3g}" for p in probs.tolist()) + "]"


def _frequencies(sample_next: Callable, probs: torch.Tensor, temperature: float, top_p: float | None, seed: int):
    """How often sample_next draws each token, over 3000 rows of the same logits: (V,) fractions."""
    n = 3000
    logits = probs.log().expand(n, -1).contiguous()
    what = f"sample_next(logits of {n} rows with probabilities {_fmt(probs)}, temperature={temperature}, top_p={top_p})"
    kwargs = {"temperature": temperature, "top_p": top_p, "generator": torch.Generator().manual_seed(seed)}
    out = _tensor(_call(sample_next, what, (logits,), kwargs), what)
    if _shape(out) != (n,) or out.is_floating_point() or out.min() < 0 or out.max() >= probs.numel():
        raise StudentError(
            f"{what} returned {_shape(out)} {out.dtype}; expected ({n},) token ids in 0..{probs.numel() - 1}"
        )
    return torch.bincount(out.long(), minlength=probs.numel()).double() / n


def _tv(a: torch.Tensor, b: torch.Tensor) -> float:
    """Total variation distance between two distributions."""
    return 0.5 * float((a.double() - b.double()).abs().sum())


def check_sample_next(sample_next: Callable) -> list[Part]:
    """sample_next(logits, temperature, top_p, generator) -> (B,) token ids, against nanovlm.vlm.sample_next's rule.

    Sampling is checked by drawing 3000 times and comparing how often each token comes out with the
    distribution the rule gives, so any correct way of sampling passes. Diagnoses: greedy not the argmax,
    temperature with no effect (applied after the softmax), multiplied instead of divided, top-p dropping the
    token that crosses the threshold or keeping one too many, top-p before the temperature, the nucleus mapped
    back to the wrong token ids, draws inside the nucleus not in proportion.
    """
    parts = Parts(
        ("greedy: temperature 0 picks the argmax", 2),
        ("temperature divides the logits", 3),
        ("top-p keeps the smallest set reaching top_p", 3),
        ("draws inside the nucleus follow the probabilities", 2),
    )
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(5, 11, generator=g) * 3
    for kwargs in ({"temperature": 0.0}, {"temperature": 0.0, "top_p": 0.5}):
        what = f"sample_next(logits of shape (5, 11), {', '.join(f'{k}={v}' for k, v in kwargs.items())})"
        out = _tensor(
            _call(sample_next, what, (logits,), {**kwargs, "generator": torch.Generator().manual_seed(0)}), what
        )
        problem = None
        if _shape(out) != (5,):
            squeeze = " (one token id per row: squeeze the last dimension)" if _shape(out) == (5, 1) else ""
            problem = f"{what} returned shape {_shape(out)}, expected (5,){squeeze}"
        elif out.is_floating_point():
            problem = f"{what} returned {out.dtype}; token ids are integers (argmax and multinomial give torch.long)"
        elif not torch.equal(out.long(), logits.argmax(-1)):
            r = int(torch.where(out.long() != logits.argmax(-1))[0][0])
            problem = (
                f"greedy decoding must pick the highest-scoring token: {what} gave {int(out[r])} in row {r}, expected "
                f"{int(logits[r].argmax())}"
                + (" (with temperature 0, top_p does not matter)" if "top_p" in kwargs else "")
            )
        if problem:
            parts.judge("greedy: temperature 0 picks the argmax", problem)
            return parts.finish("not checked: fix greedy decoding first")
    parts.judge("greedy: temperature 0 picks the argmax", None)

    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    rules = {
        "right": lambda t: _tempered(probs, t),
        "no effect": lambda t: probs,
        "multiplied": lambda t: _tempered(probs, 1 / t),
        "probabilities divided": lambda t: (probs / t).softmax(-1),
    }
    drawn = {t: _frequencies(sample_next, probs, t, None, seed=60 + i) for i, t in enumerate((0.5, 2.0))}
    matched = [name for name, rule in rules.items() if all(_tv(f, rule(t)) < 0.04 for t, f in drawn.items())]
    messages = {
        "no effect": "your temperature has no effect: the draws follow the untempered probabilities. Dividing the "
        "probabilities (after the softmax) by T changes nothing once they are renormalised; divide the logits by T "
        "before the softmax",
        "multiplied": "you multiplied the logits by the temperature; divide them (T < 1 sharpens, T > 1 flattens)",
        "probabilities divided": "you divided the probabilities by T and took a softmax of them; divide the logits "
        "(before the only softmax)",
    }
    problem = None
    if "right" not in matched:
        problem = messages.get(matched[0]) if matched else None
        problem = problem or (
            f"with temperature 0.5 and probabilities {_fmt(probs)} your draws came out as {_fmt(drawn[0.5])}, expected "
            f"about {_fmt(_tempered(probs, 0.5))} = softmax(logits / T)"
        )
    parts.judge("temperature divides the logits", problem)
    if problem:
        return parts.finish("not checked: fix the temperature first")

    mixed = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])[torch.randperm(6, generator=g)]
    cases = [(probs, 1.0, 0.7), (mixed, 1.0, 0.6), (mixed, 1.0, 0.85), (probs, 2.0, 0.7), (probs, 1.0, 0.4)]
    problem = proportion_problem = None
    for i, (p, t, top_p) in enumerate(cases):
        tempered = _tempered(p, t)
        keep = _nucleus(tempered, top_p)
        freq = _frequencies(sample_next, p, t, top_p, seed=70 + i)
        if not torch.equal(freq > 0, keep):
            problem = _top_p_problem(p, t, top_p, tempered, keep, freq > 0)
            break
        expected = tempered * keep / (tempered * keep).sum()
        if proportion_problem is None and _tv(freq, expected) > 0.04:
            proportion_problem = (
                f"with probabilities {_fmt(tempered)} and top_p {top_p} your draws came out as {_fmt(freq)}, expected "
                f"about {_fmt(expected)}: inside the nucleus, draw in proportion to the probabilities (renormalised)"
            )
    parts.judge("top-p keeps the smallest set reaching top_p", problem)
    if problem:
        return parts.finish("not checked: fix top-p first")
    parts.judge("draws inside the nucleus follow the probabilities", proportion_problem)
    return parts.finish()


def _top_p_problem(probs, temperature, top_p, tempered, keep, drawn) -> str:
    """Explain how the set of tokens the student's top-p drew from differs from the rule's."""
    order = tempered.argsort(descending=True)
    k = int(keep.sum())
    running = tempered[order].cumsum(0)
    rule = (
        f"The rule: sort the tokens by probability and keep them until their total reaches top_p, including the one "
        f"that makes it reach. With probabilities {_fmt(tempered)}"
        + (f" (after temperature {temperature})" if temperature != 1 else "")
        + f" and top_p {top_p}, keep tokens {order[:k].tolist()} (total {running[k - 1]:.3g} >= {top_p}"
        + (f", while {running[k - 2]:.3g} < {top_p})" if k > 1 else ")")
        + f"; you kept {torch.where(drawn)[0].tolist()}."
    )
    crossing = order[k - 1]
    one_less, one_more = keep.clone(), keep.clone()
    one_less[crossing] = False
    if k < len(order):
        one_more[order[k]] = True
    if temperature != 1 and torch.equal(drawn, _nucleus(probs, top_p)):
        return "you chose the nucleus before applying the temperature: divide the logits by T first. " + rule
    if torch.equal(drawn, one_less):
        return "you dropped the token that crosses top_p. " + rule
    if k < len(order) and torch.equal(drawn, one_more):
        return "you kept one token too many (the one after the token that crosses top_p). " + rule
    if drawn.all():
        return "top-p removed nothing. " + rule
    if int(drawn.sum()) == k:
        return (
            f"you kept {k} tokens, but not the most likely ones: after sorting, map the kept positions back to token "
            "ids (scatter or index with the sort order). " + rule
        )
    return rule


# ----------------------------------------------------------------------------- 7. BLEU's clipped precision


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _bleu_variant(candidate: list[str], references: list[list[str]], n: int, mistake: str) -> tuple[int, int]:
    """(matches, total) for one caption computed with a typical mistake."""
    cand, refs = _ngrams(candidate, n), [_ngrams(r, n) for r in references]
    total = max(0, len(candidate) - n + 1)
    if mistake == "no clipping":
        return sum(c for gram, c in cand.items() if any(gram in r for r in refs)), total
    if mistake == "clipped by the sum over references":
        return sum(min(c, sum(r[gram] for r in refs)) for gram, c in cand.items()), total
    if mistake == "distinct n-grams":
        return sum(1 for gram in cand if any(gram in r for r in refs)), len(cand)
    raise ValueError(mistake)


def check_clipped_precision(clipped_precision: Callable) -> list[Part]:
    """clipped_precision(candidate, references, n) -> (matches, total), against nanovlm.metrics._bleu_stats.

    Diagnoses: no clipping, clipping by the sum over the references instead of the largest count in one,
    distinct n-grams counted once, a total of len - n or len, a negative total for captions shorter than n.
    """
    parts = Parts(
        ("total: a caption of L words has L - n + 1 n-grams", 3),
        ("matches clipped by the most in one reference", 5),
        ("a caption shorter than n: (0, 0)", 2),
    )
    rng = random.Random(7)
    words = "a red blue circle square the".split()
    cases = [
        (
            "the the the the the the the".split(),
            ["the cat is on the mat".split(), "there is a cat on the mat".split()],
            1,
        ),
        ("a red circle a red square".split(), ["a red circle and a blue square".split(), "a square".split()], 2),
    ]
    for _ in range(24):
        candidate = rng.choices(words, k=rng.randint(3, 9))
        references = [rng.choices(words, k=rng.randint(3, 9)) for _ in range(rng.randint(1, 3))]
        cases.append((candidate, references, rng.randint(1, 4)))
    short = [("a red".split(), ["a red circle".split()], 3), (["circle"], ["a circle".split()], 4)]

    def answer(candidate, references, n) -> tuple[float, float]:
        what = f"clipped_precision({' '.join(candidate)!r}, {[' '.join(r) for r in references]}, n={n})"
        out = _call(clipped_precision, what, (candidate, references, n))
        if isinstance(out, float | int):
            raise StudentError(
                f"{what} returned {out}; return the two counts (matches, total): BLEU adds them up over the whole "
                "corpus before dividing"
            )
        if not (isinstance(out, tuple | list) and len(out) == 2 and all(isinstance(x, int | float) for x in out)):
            raise StudentError(f"{what} returned {out!r}; return the pair of counts (matches, total)")
        return out[0], out[1]

    def example(candidate, references, n, got, expected, which: int) -> str:
        return (
            f"for candidate {' '.join(candidate)!r} and references {[' '.join(r) for r in references]} with n = {n} "
            f"you return {got[which]}, expected {expected[which]}"
        )

    got = [answer(*case) for case in cases]
    expected = [_reference_bleu_counts(*case) for case in cases]
    wrong = [i for i, (a, b) in enumerate(zip(got, expected, strict=True)) if a[1] != b[1]]
    problem = None
    if wrong:
        c, refs, n = cases[wrong[0]]
        totals = {
            "len - n": lambda c, n: max(0, len(c) - n),
            "len": lambda c, n: len(c),
            "distinct": lambda c, n: len(_ngrams(c, n)),
        }
        how = {
            "len - n": "you count L - n n-grams; a caption of L words has L - n + 1 (7 words: 7 unigrams, 6 bigrams)",
            "len": "you return the caption's length; a caption of L words has L - n + 1 n-grams",
            "distinct": "you count distinct n-grams; the total counts every position, repeats included",
        }
        found = next(
            (
                how[k]
                for k, f in totals.items()
                if all(g[1] == f(c_, n_) for g, (c_, _, n_) in zip(got, cases, strict=True))
            ),
            None,
        )
        problem = (
            (found or "the total is the number of n-grams in the candidate, L - n + 1")
            + ": "
            + example(c, refs, n, got[wrong[0]], expected[wrong[0]], 1)
        )
    parts.judge("total: a caption of L words has L - n + 1 n-grams", problem)

    wrong = [i for i, (a, b) in enumerate(zip(got, expected, strict=True)) if a[0] != b[0]]
    problem = None
    if wrong:
        how = {
            "no clipping": "you did not clip: an n-gram earns at most as many matches as it appears in one reference",
            "clipped by the sum over references": "you clipped by the count summed over all references; clip by the "
            "largest count in any single reference",
            "distinct n-grams": "you counted each distinct n-gram once; count every occurrence, then clip",
        }
        found = next(
            (k for k in how if all(g[0] == _bleu_variant(*case, k)[0] for g, case in zip(got, cases, strict=True))),
            None,
        )
        if found:  # show a case where the mistake makes a difference
            i = next(i for i, case in enumerate(cases) if _bleu_variant(*case, found)[0] != expected[i][0])
            problem = how[found] + ": " + example(*cases[i], got[i], expected[i], 0)
        else:
            i = wrong[0]
            problem = (
                "matches are the candidate's n-grams, each counted at most as often as it appears in one reference: "
            )
            problem += example(*cases[i], got[i], expected[i], 0)
    parts.judge("matches clipped by the most in one reference", problem)

    problem = None
    for candidate, references, n in short:
        out = answer(candidate, references, n)
        if tuple(out) != (0, 0):
            problem = (
                f"a caption with fewer than n words has no n-grams: for {' '.join(candidate)!r} and n = {n} you "
                f"return {tuple(out)}, expected (0, 0) (a total of max(0, L - n + 1))"
            )
            break
    parts.judge("a caption shorter than n: (0, 0)", problem)
    return parts.finish()


def _reference_bleu_counts(candidate: list[str], references: list[list[str]], n: int) -> tuple[int, int]:
    """(clipped matches, total n-grams) of one caption for one n, from nanovlm.metrics."""
    correct, guess, _, _ = metrics._bleu_stats(candidate, references, n)
    return correct[n - 1], guess[n - 1]


# ----------------------------------------------------------------------------- 8. CIDEr's tf-idf


def _reference_tfidf(caption: list[str], references: dict, max_n: int) -> dict[tuple[str, ...], float]:
    """CIDEr's tf-idf weights of a caption's n-grams, computed as nanovlm.metrics.cider_d does."""
    doc_freq = Counter(
        gram for refs in references.values() for gram in set().union(*(metrics._ngram_counts(r, max_n) for r in refs))
    )
    vectors = metrics._tfidf(metrics._ngram_counts(caption, max_n), doc_freq, math.log(len(references)), max_n)
    return {gram: weight for vector in vectors for gram, weight in vector.items()}


_TFIDF_RIGHT = {"tf": "count", "idf": "log", "N": "images", "df": "images"}
_TFIDF_CHOICES = {
    "tf": ("count", "frequency"),
    "idf": ("log", "ratio", "log10"),
    "N": ("images", "captions"),
    "df": ("images", "captions", "occurrences"),
}


def _tfidf_variant(caption, references, max_n, tf, idf, N, df) -> dict[tuple[str, ...], float]:
    """tf-idf weights computed with the given choices (the right ones are _TFIDF_RIGHT)."""
    all_refs = [r for refs in references.values() for r in refs]
    if df == "images":
        doc_freq = Counter(
            g for refs in references.values() for g in set().union(*(metrics._ngram_counts(r, max_n) for r in refs))
        )
    elif df == "captions":
        doc_freq = Counter(g for r in all_refs for g in metrics._ngram_counts(r, max_n))
    else:
        doc_freq = sum((metrics._ngram_counts(r, max_n) for r in all_refs), Counter())
    n_docs = len(references) if N == "images" else len(all_refs)
    counts = metrics._ngram_counts(caption, max_n)
    per_n = Counter(len(g) for g in counts.elements())
    log = {"log": math.log, "log10": math.log10, "ratio": lambda x: x}[idf]
    return {
        g: (c / per_n[len(g)] if tf == "frequency" else c) * log(n_docs / max(1, doc_freq[g]))
        for g, c in counts.items()
    }


def check_tfidf(tfidf: Callable) -> list[Part]:
    """tfidf(caption, references, max_n) -> {n-gram: weight}, against nanovlm.metrics (cider_d's _tfidf).

    Diagnoses, by computing each variant: missing n, keys that are not tuples, tf divided by the caption's
    n-gram count, idf without the log or in log10, N counted in captions instead of images, df counted per
    caption or per occurrence instead of per image, n-grams in no reference crashing or weighed 0.
    """
    parts = Parts(
        ("a weight for every n-gram, n = 1..max_n", 2),
        ("tf: the n-gram's count in the caption", 2),
        ("idf: log(number of images / df)", 2),
        ("df counts images, not captions", 2),
        ("n-grams in no reference: df = max(1, 0)", 2),
    )
    split = lambda texts: [t.split() for t in texts]  # noqa: E731
    shapes = {
        "img0": split(["a red circle", "a red circle above a square", "the red circle is above the square"]),
        "img1": split(["a blue square", "a blue square below a red circle"]),
        "img2": split(["two green triangles", "green triangles on the left"]),
    }
    rng = random.Random(8)
    words = "a red blue circle square above".split()
    random_refs = {i: [rng.choices(words, k=rng.randint(3, 7)) for _ in range(rng.randint(2, 3))] for i in range(4)}
    cases = [("a red circle above a square".split(), shapes, 4), (random_refs[2][0], random_refs, 2)]

    def answer(caption, references, max_n) -> dict:
        what = f"tfidf({' '.join(caption)!r}, references of {len(references)} images, max_n={max_n})"
        out = _call(tfidf, what, (caption, references, max_n))
        if not isinstance(out, dict):
            raise StudentError(f"{what} returned a {type(out).__name__}; return a dict {{n-gram tuple: weight}}")
        return out

    got = [answer(*case) for case in cases]
    expected = [_reference_tfidf(*case) for case in cases]
    problem = None
    for caption, weights, right in zip((c[0] for c in cases), got, expected, strict=True):
        if any(not isinstance(k, tuple) for k in weights):
            key = next(k for k in weights if not isinstance(k, tuple))
            problem = (
                f"keys must be tuples of words, e.g. ('red', 'circle') for the bigram 'red circle'; you have {key!r}"
            )
        elif set(weights) != set(right):
            missing = sorted(set(right) - set(weights), key=len)
            extra = sorted(set(weights) - set(right), key=len)
            sizes = sorted({len(k) for k in missing})
            problem = (
                f"for caption {' '.join(caption)!r}: "
                + (f"missing {_listing(missing)} (n = {_listing(sizes)}); " if missing else "")
                + (f"unexpected keys {_listing(extra)}; " if extra else "")
                + "give a weight to every n-gram of the caption, n = 1..max_n, each once"
            )
        if problem:
            break
    parts.judge("a weight for every n-gram, n = 1..max_n", problem)
    if problem:
        return parts.finish("not checked: fix which n-grams get a weight first")

    def matches(choice: dict) -> bool:
        return all(
            all(
                math.isclose(float(w[g]), v, rel_tol=1e-6, abs_tol=1e-9)
                for g, v in _tfidf_variant(*case, **choice).items()
            )
            for case, w in zip(cases, got, strict=True)
        )

    choices = [dict(zip(_TFIDF_CHOICES, c, strict=True)) for c in itertools.product(*_TFIDF_CHOICES.values())]
    found = next((c for c in choices if matches(c)), None)
    if found is None:
        caption, refs, _ = cases[0]
        gram = next(
            g for g, v in expected[0].items() if not math.isclose(float(got[0][g]), v, rel_tol=1e-6, abs_tol=1e-9)
        )
        df = sum(any(gram in metrics._ngram_counts(r, len(gram)) for r in rs) for rs in refs.values())
        count = metrics._ngram_counts(caption, len(gram))[gram]
        generic = (
            f"the weight of {gram} is {float(got[0][gram]):.4g}; expected {expected[0][gram]:.4g} = count {count} x "
            f"log({len(refs)} images / df {df}), df being the number of images whose references contain it"
        )
        for name in ("tf: the n-gram's count in the caption", "df counts images, not captions"):
            parts.judge(name, "not judged separately: see the idf part")
        parts.judge("idf: log(number of images / df)", generic)
    else:
        parts.judge(
            "tf: the n-gram's count in the caption",
            None
            if found["tf"] == "count"
            else "you divided each count by the number of n-grams in the caption: the CIDEr paper writes tf that way, "
            "but it cancels in the cosine similarity, and nanovlm (like pycocoevalcap) uses the raw count",
        )
        idf_problem = {
            "ratio": "no log: idf = log(N / df); without it a rare n-gram's weight explodes (N / df = 3, log 3 = 1.1)",
            "log10": "use the natural logarithm (math.log), as CIDEr does, not log10",
        }.get(found["idf"])
        if found["N"] == "captions":
            idf_problem = (idf_problem + "; and " if idf_problem else "") + (
                "N is the number of images (len(references)), not the number of reference captions"
            )
        parts.judge("idf: log(number of images / df)", idf_problem)
        parts.judge(
            "df counts images, not captions",
            {
                "images": None,
                "captions": "df counts the images whose references contain the n-gram; you counted captions: 'red "
                "circle' is in 3 captions of img0 and 1 of img1, so its df is 2, not 4",
                "occurrences": "df counts the images whose references contain the n-gram; you counted every "
                "occurrence: an n-gram repeated in the captions of one image still adds 1",
            }[found["df"]],
        )
    choice = found or _TFIDF_RIGHT
    caption, references, max_n = "a purple circle".split(), shapes, 2
    try:
        weights = answer(caption, references, max_n)
        right = _tfidf_variant(caption, references, max_n, **choice)
        unseen = [g for g in right if "purple" in g]
        if any(g not in weights for g in unseen):
            problem = (
                "n-grams that no reference contains are missing: they too get a weight, count x log(N / max(1, 0)) = "
                "count x log N"
            )
        elif not all(math.isclose(float(weights[g]), right[g], rel_tol=1e-6) for g in unseen):
            g = unseen[0]
            problem = (
                f"{g} is in no reference, so df = 0; CIDEr uses max(1, df), which weighs it count x log N = "
                f"{right[g]:.4g}; you gave {float(weights[g]):.4g}"
            )
        else:
            problem = None
    except StudentError as e:
        problem = f"{e}. The caption has 'purple', which no reference contains: df = 0, and CIDEr uses max(1, df)"
    parts.judge("n-grams in no reference: df = max(1, 0)", problem)
    return parts.finish()


# ----------------------------------------------------------------------------- 9. a captioning training step


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
    """A batch as nanovlm.data.Loader makes it: images, input_ids (B, T), targets (B, T) with -100."""
    tokens, lengths, prompts = _token_rows(g, rows, T, vocab=32)
    B = len(rows)
    _, targets = _reference_join(torch.zeros(B, 0, 1), torch.zeros(B, T, 1), tokens, lengths, prompts)
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
    return all(_close(p, q, atol=1e-6, rtol=1e-5) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def check_train_step(train_step: Callable) -> list[Part]:
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
    student = _train_model()
    start = copy.deepcopy(student)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.5)
    batches = [_train_batch(g, [(6, 1), (9, 4), (9, 1)]), _train_batch(g, [(9, 1), (4, 1), (7, 3)])]
    hints = {
        "out of bounds": "Positions that must not count carry target -100: pass ignore_index=-100 to F.cross_entropy.",
        "Expected target size": "F.cross_entropy wants logits (B*T, V) and targets (B*T,): flatten both.",
    }
    with torch.no_grad():
        losses = {k: v.item() for k, v in _losses(start, batches[0]).items()}
    what = "train_step(model, optimizer, batch)"
    loss = _number(_call(train_step, what, (student, optimizer, batches[0]), hints=hints), what)
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
    if _same_weights(student, start):
        has_grads = any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
        problem = (
            "gradients were computed but the weights did not change: call optimizer.step() after loss.backward()"
            if has_grads
            else "the weights did not change: call loss.backward() and then optimizer.step() (and if you call "
            "optimizer.zero_grad(), call it before backward() or after step(), not in between)"
        )
    elif kind is None:
        problem = "the weights moved, but they cannot be checked while the loss is not one the grader recognises"
    elif not _same_weights(student, reference):
        problem = "the weights moved differently from loss.backward(); optimizer.step(): one backward and one step each"
    parts.judge("backward() and optimizer.step() update the weights", problem)
    if problem:
        return parts.finish("not checked: fix the first step first")

    _number(_call(train_step, what, (student, optimizer, batches[1]), hints=hints), what)
    for model, opt, zero in steppers:
        _reference_step(model, opt, batches[1], kind, zero)
    problem = None
    if not _same_weights(student, reference):
        problem = (
            "gradients from the first step were added to the second's: PyTorch adds to .grad until you clear it, so "
            "call optimizer.zero_grad() once per step"
            if _same_weights(student, accumulating)
            else "the second step moved the weights differently from the reference step"
        )
    parts.judge("gradients cleared between steps", problem)
    return parts.finish()


# ============================================================================= the exercises


@dataclass(frozen=True)
class Exercise:
    number: int
    name: str  # the function the student writes, and the grade_id of the cell it is written in
    title: str
    check: Callable[[Callable], list[Part]]
    forbidden: tuple[tuple[Any, str], ...] = ()  # package functions the student's code may not call


EXERCISES: dict[str, Exercise] = {
    e.name: e
    for e in [
        Exercise(1, "patchify", "cut images into patches", check_patchify, ((vit, "patchify"),)),
        Exercise(
            2,
            "causal_attention",
            "attention with a causal mask",
            check_causal_attention,
            (
                (attention, "attention_math"),
                (attention, "attention_sdpa"),
                (attention, "causal_mask"),
                (F, "scaled_dot_product_attention"),
            ),
        ),
        Exercise(
            3,
            "decode_step",
            "one KV-cache decode step",
            check_decode_step,
            ((MultiHeadAttention, "forward"), (attention, "causal_mask")),
        ),
        Exercise(
            4,
            "project",
            "the projector: pixel shuffle and MLP",
            check_project,
            ((projector, "pixel_shuffle"), (Projector, "forward")),
        ),
        Exercise(5, "join_image_and_text", "join image and text tokens, with the loss mask", check_join_image_and_text),
        Exercise(
            6, "sample_next", "greedy, temperature and top-p decoding", check_sample_next, ((vlm, "sample_next"),)
        ),
        Exercise(
            7,
            "clipped_precision",
            "BLEU's clipped n-gram precision",
            check_clipped_precision,
            ((metrics, "_bleu_stats"), (metrics, "bleu")),
        ),
        Exercise(8, "tfidf", "CIDEr's tf-idf weights", check_tfidf, ((metrics, "_tfidf"), (metrics, "cider_d"))),
        Exercise(9, "train_step", "a captioning training step", check_train_step, ((VLM, "forward"),)),
    ]
}


def _exercise(name: str) -> Exercise:
    if name not in EXERCISES:
        raise ValueError(f"no exercise named {name!r}; the exercises are {', '.join(EXERCISES)}")
    return EXERCISES[name]


def _failed(exercise: Exercise, error: str) -> Result:
    return Result(exercise.name, exercise.number, exercise.title, POINTS, 0, [], error)


def check_function(exercise: str, fn: Callable) -> Result:
    """Grade one function in this process, with no time limit (the notebooks' check cells and the tests use it)."""
    ex = _exercise(exercise)
    if not callable(fn):
        return _failed(ex, f"{ex.name} is a {type(fn).__name__}, not a function")
    try:
        with _forbid(ex.forbidden), torch.random.fork_rng(devices=[]):
            parts = ex.check(fn)
    except (NotAttempted, StudentError) as e:
        return _failed(ex, str(e))
    except Exception as e:  # a return value so odd that the check itself tripped: grade it zero, don't crash
        return _failed(ex, f"the check could not make sense of your function's output ({type(e).__name__}: {e})")
    return Result(ex.name, ex.number, ex.title, POINTS, sum(p.earned for p in parts), parts)


def check(exercise: str, fn: Callable) -> None:
    """Print the feedback on one function; raise AssertionError unless it earns full marks (for test cells)."""
    result = check_function(exercise, fn)
    print(format_result(result))
    if not result.full_marks:
        raise AssertionError(f"{result.score}/{result.points} points for {exercise}: see the feedback above")


# ============================================================================= notebooks


def read_notebook(path: str | Path) -> dict:
    """A notebook file as a dict (plain JSON: grading needs neither nbformat nor nbgrader)."""
    try:
        nb = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a readable notebook: {e}") from e
    if not isinstance(nb, dict) or not isinstance(nb.get("cells"), list):
        raise ValueError(f"{path} is not a Jupyter notebook: it has no list of cells")
    return nb


def _source(cell: dict) -> str:
    source = cell.get("source", "")
    return "".join(source) if isinstance(source, list) else source


def _nbgrader(cell: dict) -> dict:
    return cell.get("metadata", {}).get("nbgrader", {})


def _is_test(cell: dict) -> bool:
    """An autograded test cell: graded, and not where the student writes."""
    meta = _nbgrader(cell)
    return bool(meta.get("grade")) and not meta.get("solution")


def find_exercises(nb: dict) -> dict[str, int]:
    """{exercise name: index of the cell with the student's function}.

    Solution cells are found by their nbgrader grade_id; a notebook whose metadata was lost (some editors drop
    it) falls back to the code cells that define a function with an exercise's name.
    """
    found = {}
    for i, cell in enumerate(nb["cells"]):
        meta = _nbgrader(cell)
        if cell.get("cell_type") == "code" and meta.get("solution") and meta.get("grade_id") in EXERCISES:
            found[meta["grade_id"]] = i
    if found:
        return found
    for i, cell in enumerate(nb["cells"]):
        if cell.get("cell_type") == "code" and not _is_test(cell):
            for name in re.findall(r"^def\s+(\w+)\s*\(", _source(cell), re.M):
                if name in EXERCISES:
                    found[name] = i
    return found


def _cells_to_run(nb: dict, answer: int, answers: set[int]) -> list[tuple[int, str, bool]]:
    """(index, source, is the answer) of the code cells to run to define the function of cell `answer`.

    The cells before it run (the setup: imports, constants; their errors are ignored) and then the answer;
    test cells, other exercises' answers and everything after the answer do not.
    """
    return [
        (i, _source(cell), i == answer)
        for i, cell in enumerate(nb["cells"][: answer + 1])
        if cell.get("cell_type") == "code" and not _is_test(cell) and (i == answer or i not in answers)
    ]


def _without_magics(source: str) -> str:
    """IPython lines (%magic, !shell) become `pass`, so that the cell is plain Python."""
    return re.sub(r"^(\s*)[%!].*$", r"\1pass", source, flags=re.M)


def run_cells_and_check(exercise: str, cells: list[tuple[int, str, bool]]) -> Result:
    """Run the cells in a fresh namespace, then check the function the answer cell defines."""
    ex = _exercise(exercise)
    namespace: dict[str, Any] = {"__name__": "__main__"}
    exec(PRELUDE, namespace)
    with _forbid(ex.forbidden):
        for index, source, is_answer in cells:
            _phase(f"running cell {index + 1}" + (" (your solution)" if is_answer else " (setup)"))
            try:
                exec(
                    compile(_without_magics(source), SOLUTION_FILE if is_answer else f"<cell {index + 1}>", "exec"),
                    namespace,
                )
            except SyntaxError as e:
                if is_answer:
                    return _failed(
                        ex, f"syntax error in your solution cell, line {e.lineno}: {e.msg}: {(e.text or '').strip()}"
                    )
            except (Exception, SystemExit) as e:
                if is_answer:  # a setup cell may fail (it might draw a figure): only the answer counts
                    return _failed(ex, f"running your solution cell raised {type(e).__name__}: {e}{_where(e)}")
        fn = namespace.get(ex.name)
        if not callable(fn):
            return _failed(ex, f"no function named {ex.name} after running your solution cell: keep its name")
        return check_function(ex.name, fn)


def _grade_in_child(conn, exercise: str, cells: list[tuple[int, str, bool]]) -> None:
    """Entry point of a grading process: run the cells and the check, sending progress and the result."""
    global _phase_sink
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):  # the student's prints go nowhere; what matters travels through conn
        os.dup2(devnull, fd)
    os.environ["MPLBACKEND"] = "Agg"
    torch.set_num_threads(1)
    _phase_sink = lambda text: conn.send(("phase", text))  # noqa: E731
    conn.send(("result", run_cells_and_check(exercise, cells)))


def _context() -> multiprocessing.context.BaseContext:
    """Processes forked from a server that has imported torch once (fast and clean), or spawned where there is none."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])
        return ctx
    return multiprocessing.get_context("spawn")


def grade_isolated(exercise: str, cells: list[tuple[int, str, bool]], timeout: float = 30.0) -> Result:
    """run_cells_and_check in a separate process; a time-out or a crash there is a zero with the reason."""
    ex = _exercise(exercise)
    ctx = _context()
    receiver, sender = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_grade_in_child, args=(sender, exercise, cells), daemon=True)
    process.start()  # with a fork server, returns once forked: the server's one-time start is not timed
    sender.close()
    phase, deadline = "starting", time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not receiver.poll(left):
                return _failed(ex, f"timed out: not done after {timeout:g} s, while {phase} (an infinite loop?)")
            try:
                kind, payload = receiver.recv()
            except (EOFError, OSError):
                process.join(5)
                return _failed(
                    ex,
                    f"the grading process stopped (exit code {process.exitcode}) while {phase}: does your code call "
                    "exit() or crash Python?",
                )
            if kind == "result":
                return payload
            phase = payload
    finally:
        if process.is_alive():
            process.kill()
        process.join()
        receiver.close()


def grade_notebook(path: str | Path, timeout: float = 30.0, isolate: bool = True) -> NotebookGrade:
    """Grade every exercise found in one notebook, each in its own process with `timeout` seconds.

    isolate=False runs the cells and checks in this process, with no time limit (for tests and debugging).
    """
    try:
        nb = read_notebook(path)
    except ValueError as e:
        return NotebookGrade(str(path), [], str(e))
    found = find_exercises(nb)
    if not found:
        return NotebookGrade(
            str(path),
            [],
            f"no exercise found: no solution cell with a grade_id among {', '.join(EXERCISES)}, and "
            "no cell defining a function of those names",
        )
    answers = set(found.values())
    results = []
    for name, index in sorted(found.items(), key=lambda item: EXERCISES[item[0]].number):
        cells = _cells_to_run(nb, index, answers)
        results.append(grade_isolated(name, cells, timeout) if isolate else run_cells_and_check(name, cells))
    return NotebookGrade(str(path), results)


def grade_notebooks(paths: list[str | Path], timeout: float = 30.0, isolate: bool = True) -> list[NotebookGrade]:
    """Grade notebooks; a folder stands for the .ipynb files in it."""
    files: list[Path] = []
    for path in map(Path, paths):
        files += sorted(path.glob("*.ipynb")) if path.is_dir() else [path]
    return [grade_notebook(f, timeout, isolate) for f in files]


# ----------------------------------------------------------------------------- student versions


def _clear_regions(source: str, begin: str, end: str, stub: list[str] | None, where: str) -> tuple[str, bool]:
    """Replace each begin..end region (marker lines included) with stub, indented like the marker, or drop it."""
    lines, inside, found = [], False, False
    for line in source.split("\n"):
        if begin in line:
            if inside:
                raise ValueError(f"{where}: {begin} inside another {begin} region")
            inside = found = True
            indent = line[: len(line) - len(line.lstrip())]
            lines += [indent + s for s in stub or []]
        elif end in line:
            if not inside:
                raise ValueError(f"{where}: {end} without a {begin} before it")
            inside = False
        elif not inside:
            lines.append(line)
    if inside:
        raise ValueError(f"{where}: {begin} without an {end}")
    return "\n".join(lines), found


def student_version(nb: dict, name: str = "notebook") -> dict:
    """The notebook as nbgrader generate_assignment releases it.

    Solution regions become `# YOUR CODE HERE / raise NotImplementedError()` (a solution cell without a region
    is replaced whole), hidden test regions are deleted, outputs and execution counts are cleared. As nbgrader
    does, a solution region outside a solution cell or hidden tests outside a test cell are errors.
    """
    nb = copy.deepcopy(nb)
    for i, cell in enumerate(nb["cells"]):
        where, meta, code = f"{name}, cell {i + 1}", _nbgrader(cell), cell.get("cell_type") == "code"
        stub = (STUB if code else TEXT_STUB).split("\n")
        source, replaced = _clear_regions(_source(cell), "BEGIN SOLUTION", "END SOLUTION", stub, where)
        if replaced and not meta.get("solution"):
            raise ValueError(f"{where}: a solution region in a cell not marked as a solution cell (nbgrader metadata)")
        if meta.get("solution") and not replaced:
            source = "\n".join(stub)
        source, removed = _clear_regions(source, "BEGIN HIDDEN TESTS", "END HIDDEN TESTS", None, where)
        if removed and not meta.get("grade"):
            raise ValueError(f"{where}: hidden tests in a cell not marked as an autograded test cell")
        cell["source"] = source.splitlines(keepends=True)
        if code:
            cell["outputs"], cell["execution_count"] = [], None
    return nb


def make_student_version(source: str | Path, release: str | Path) -> list[Path]:
    """Write the student version of each notebook in source (a folder, or one .ipynb) into the folder release."""
    source, release = Path(source), Path(release)
    files = sorted(source.glob("*.ipynb")) if source.is_dir() else [source]
    if not files:
        raise FileNotFoundError(f"no notebooks (*.ipynb) in {source}")
    release.mkdir(parents=True, exist_ok=True)
    written = []
    for path in files:
        nb = student_version(read_notebook(path), path.name)
        out = release / path.name
        out.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        written.append(out)
    return written


# ============================================================================= reports and the command line


def format_result(result: Result) -> str:
    """A readable report of one exercise: its score, then each part with what to fix."""
    lines = [f"Exercise {result.number} ({result.exercise}: {result.title}): {result.score}/{result.points}"]
    if result.error:
        lines.append(textwrap.fill(result.error, 110, initial_indent="    ", subsequent_indent="    "))
    for part in result.parts:
        mark = "ok  " if part.earned == part.points else "FAIL"
        lines.append(f"  {mark} {part.name}: {part.earned}/{part.points}")
        if part.message != "ok":
            lines.append(textwrap.fill(part.message, 110, initial_indent="       ", subsequent_indent="       "))
    return "\n".join(lines)


def format_grades(grades: list[NotebookGrade]) -> str:
    """The report of a grading run: per notebook and exercise, then the total."""
    blocks = []
    for grade in grades:
        lines = [f"{grade.path}: {grade.score}/{grade.points}" if grade.results else grade.path]
        if grade.error:
            lines.append(f"    {grade.error}")
        lines += [textwrap.indent(format_result(r), "  ") for r in grade.results]
        blocks.append("\n".join(lines))
    score, points = sum(g.score for g in grades), sum(g.points for g in grades)
    n = sum(len(g.results) for g in grades)
    blocks.append(f"total: {score}/{points} over {n} exercise(s) in {len(grades)} notebook(s)")
    return "\n\n".join(blocks)


def grades_json(grades: list[NotebookGrade]) -> dict:
    """The grades as plain data, for --json."""
    return {
        "notebooks": [
            {
                "path": g.path,
                "score": g.score,
                "points": g.points,
                "error": g.error,
                "exercises": [asdict(r) for r in g.results],
            }
            for g in grades
        ],
        "score": sum(g.score for g in grades),
        "points": sum(g.points for g in grades),
    }


def add_parser(sub) -> None:
    """Register `grade`: grade submitted notebooks, or write the student versions of the source notebooks."""
    p = sub.add_parser(
        "grade",
        help="grade exercise notebooks (or write their student versions)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("notebooks", nargs="*", help="submitted notebooks (.ipynb), or folders of them")
    p.add_argument("--json", action="store_true", help="print JSON instead of a report")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds each exercise may take (default 30)")
    p.add_argument(
        "--make-student",
        nargs=2,
        metavar=("SOURCE", "RELEASE"),
        help="write the student versions of the notebooks in SOURCE into RELEASE (no grading)",
    )


def run(args) -> None:
    """Write student versions (--make-student) or grade the notebooks named, and print the report."""
    if args.make_student:
        for path in make_student_version(*args.make_student):
            print(f"wrote {path}")
        return
    if not args.notebooks:
        raise ValueError("name the notebooks to grade (python -m nanovlm grade submitted/), or use --make-student")
    grades = grade_notebooks(args.notebooks, timeout=args.timeout)
    print(json.dumps(grades_json(grades), indent=2) if args.json else format_grades(grades), flush=True)


def cli(argv: list[str] | None = None) -> None:
    """Run the grade command alone: cli(["submitted/"]) (a leading "grade" is allowed)."""
    parser = argparse.ArgumentParser(prog="python -m nanovlm")
    add_parser(parser.add_subparsers(dest="command", required=True))
    argv = list(argv or [])
    run(parser.parse_args(argv if argv[:1] == ["grade"] else ["grade", *argv]))
