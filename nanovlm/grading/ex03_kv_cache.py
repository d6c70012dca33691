"""Exercise 3, decode_step: one KV-cache decode step, checked against MultiHeadAttention's full causal pass."""

from collections.abc import Callable

import torch

from .. import attention
from ..attention import KVCache, MultiHeadAttention
from .results import Part, Parts
from .student import Student, StudentError, close, largest_difference, listing, returned_tensor, shape_of

# the package functions the student's code may not call, as (module or class, name)
FORBIDDEN = ((MultiHeadAttention, "forward"), (attention, "causal_mask"))


def check_decode_step(student: Student) -> list[Part]:
    """decode_step(attn, x, cache) -> what attn(x, causal=True, cache=cache) returns, for any number of new tokens.

    Decodes a sequence one token at a time and as a prompt chunk followed by tokens, and compares with the
    full causal forward pass. Diagnoses: nothing written, keys stored under the wrong layer, keys written twice,
    new tokens attending only to themselves, a chunk attending to its own future or not to the cache (positions
    named).
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
    hints = {
        "must match the size": "Is your mask (T_new, T_new)? With a cache it is (T_new, T_past + T_new).",
        "exceeds the cache's max_len": "Call cache.update once per decode step: it writes the new positions once.",
        "does not exist: this cache has": "Write under attn.layer, this module's slot in the cache.",
    }

    def new_cache() -> KVCache:
        # attn is the last of the cache's layers, so its write moves the cache on, as in a model
        return KVCache(n_layers=attn.layer + 1, max_len=T)

    def run(chunks: list[tuple[int, int]], xs: torch.Tensor = x) -> tuple[torch.Tensor, KVCache]:
        cache = new_cache()
        outs = []
        for a, b in chunks:
            what = f"decode_step(attn, x[:, {a}:{b}], cache) with {a} position(s) cached"
            out = returned_tensor(student.call(what, (attn, xs[:, a:b], cache), hints=hints), what)
            if shape_of(out) != (B, b - a, C):
                raise _ShapeProblem(f"{what} returned shape {shape_of(out)}, expected {(B, b - a, C)}")
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
        if not close(stepwise, full):
            problem = _visibility_problem(run, steps, x, stepwise) or (
                "decoding token by token differs from the full causal pass: "
                + largest_difference(stepwise, full, "batch position channel")
            )
        parts.judge("one token at a time matches the full pass", problem)

        chunks = [(0, 4), (4, 7)]
        try:
            chunked, cache = run(chunks)
            problem = None
            if not close(chunked, full):
                problem = _visibility_problem(run, chunks, x, chunked) or (
                    "a prompt chunk followed by tokens differs from the full causal pass: "
                    + largest_difference(chunked, full, "batch position channel")
                )
        except (StudentError, _ShapeProblem) as e:
            problem, cache = f"with a prompt chunk of 4 tokens: {e}", step_cache
        parts.judge("a chunk of new tokens: causal, after the cache", problem)

        reference = new_cache()
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
            f"decoding {where}, {listing(leaks)}, which come(s) after it: new tokens need the causal mask too, "
            "shifted by the cached length (query i sits at position T_past + i and sees keys 0 .. T_past + i)"
        )
    if blind and set(cached) <= set(blind):
        written, note = _written_layers(cache), ""
        if not written:
            note = " (nothing was written to it)"
        elif cache.pos == 0:
            note = f" (its pos never moved on: the keys went to layer {listing(written)}, not to attn.layer)"
        return (
            f"decoding {where}, the new tokens never saw the cached positions{note}: write this step's keys and "
            "values with k, v = cache.update(attn.layer, k, v) and attend over everything it returns"
        )
    if blind:
        pairs = [f"position {i} could not see position {j}" for i, j in blind]
        return (
            f"decoding {where}, {listing(pairs)}: a plain tril() of the (T_new, T_past + T_new) mask forgets the "
            "cached positions; query i sits at position T_past + i, so use tril(diagonal=T_past)"
        )
    return None


def _written_layers(cache: KVCache) -> list[int]:
    """The layers whose slot of the cache has been written (a slot is allocated at its first update)."""
    return [layer for layer, k in enumerate(cache.k) if k is not None]


def _cache_problem(cache: KVCache, reference: KVCache, layer: int) -> str | None:
    """What is wrong with the keys and values a student's steps left in the cache, or None."""
    written = _written_layers(cache)
    if not written:
        return "the cache is empty: call k, v = cache.update(attn.layer, k, v) in every step"
    if written != [layer]:
        return (
            f"the keys are stored under layer {listing(written)}; this module's slot is attn.layer = {layer} "
            "(a model shares one cache between its layers, and the cache moves on when the last one has written)"
        )
    got, want = cache.k[layer], reference.k[layer]
    if got.shape != want.shape:
        return (
            f"the cache holds keys of shape {shape_of(got)}, expected {shape_of(want)} (B, n_heads, max_len, "
            "head size): write each step's keys split into heads, (B, n_heads, T_new, head size)"
        )
    if not close(got, want) or not close(cache.v[layer], reference.v[layer]):
        return "the cached keys/values differ from attn.qkv(x) split into heads (B, n_heads, T, head size)"
    return None
