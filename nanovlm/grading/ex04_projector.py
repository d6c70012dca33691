"""Exercise 4, project: the projector's pixel shuffle and MLP, checked against nanovlm.projector.Projector."""

import itertools
import math

import torch
import torch.nn.functional as F
from einops import rearrange

from .. import projector
from ..projector import Projector, ProjectorConfig, pixel_shuffle
from .results import Part, Parts
from .student import Student, close, largest_difference, returned_tensor, shape_of

# the package functions the student's code may not call, as (module or class, name)
FORBIDDEN = ((projector, "pixel_shuffle"), (Projector, "forward"))

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


def check_project(student: Student) -> list[Part]:
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
                out = returned_tensor(student.call(what, (proj, x), hints=hints), what)
        finally:
            hook.remove()
        expected = (B, N // s**2, 12)
        if shape_of(out) != expected:
            hint = ""
            if shape_of(out)[:2] == (B, N) and s > 1:
                hint = f" The tokens were not merged: with pixel_shuffle={s} every {s}x{s} square becomes one token."
            elif shape_of(out)[-1] == C * s * s:
                hint = f" {C * s * s} is the merged width C*s^2: the MLP (fc -> GELU -> proj) maps it to out_dim = 12."
            parts.judge(
                "output shape (B, N / s^2, out_dim)",
                f"{what} returned shape {shape_of(out)}, expected {expected}.{hint}",
            )
            return parts.finish("not checked: fix the output shape first")
        cases.append((proj, x, s, out, seen[0] if seen else None))
    parts.judge("output shape (B, N / s^2, out_dim)", None)

    with torch.no_grad():
        for shuffle, activation in itertools.product(_SHUFFLES, _ACTIVATIONS):
            if all(close(out, _projector_variant(p, x, s, shuffle, activation)) for p, x, s, out, _ in cases):
                return _judge_projector(parts, shuffle, activation)
        fed_right = all(seen is not None and close(seen, pixel_shuffle(x, s)) for _, x, s, _, seen in cases)
        proj, x, s, out, _ = cases[0]
        expected = proj(x)
    if fed_right:
        parts.judge("pixel shuffle merges s x s squares as (s1 s2 c)", None)
        parts.judge(
            "MLP: fc -> GELU -> proj",
            "the MLP's output differs from projector.proj(F.gelu(projector.fc(merged))): "
            + largest_difference(out, expected, "batch token channel"),
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
