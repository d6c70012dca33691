"""Exercise 10, sincos_2d: fixed 2-D sine-cosine position embeddings for a grid of patches.

nanovlm's ViT learns its position embeddings; MAE and many ViTs since use fixed ones instead, built from the
transformer paper's sines and cosines, once for the row and once for the column. The package has no such
function, so the reference is here: `reference_sincos_2d`.
"""

import torch

from .results import Part, Parts
from .student import Student, StudentError, close, largest_difference, returned_tensor, shape_of

FORBIDDEN = ()  # nothing in the package computes it


def _one_axis(positions: torch.Tensor, width: int, exponent: str = "k/(dim/4)", order: str = "sin cos") -> torch.Tensor:
    """(len(positions), width): sin(p w_k) for k < width/2, then cos(p w_k); w_k = 10000^(-k/(width/2))."""
    half = width // 2
    k = torch.arange(half, dtype=torch.float64)
    omega = 10000.0 ** (-k / (half if exponent == "k/(dim/4)" else width))
    angles = positions.double()[:, None] * omega[None, :]
    if order == "interleaved":
        return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(1)
    parts = [angles.sin(), angles.cos()] if order == "sin cos" else [angles.cos(), angles.sin()]
    return torch.cat(parts, dim=1)


def reference_sincos_2d(rows: int, cols: int, dim: int, mistake: str = "") -> torch.Tensor:
    """(rows * cols, dim): patch (r, c), row r * cols + c, is [E(r), E(c)], E the 1-D embedding of width dim / 2.

    `mistake` computes a typical wrong version instead, for the feedback.
    """
    if dim % 4:
        raise ValueError(f"dim must be a multiple of 4 (sin and cos, for rows and columns), got {dim}")
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    if mistake == "column-major":
        r, c = r.T, c.T
    r, c = r.reshape(-1), c.reshape(-1)
    exponent = "k/(dim/2)" if mistake == "k/(dim/2)" else "k/(dim/4)"
    order = {"interleaved": "interleaved", "cos sin": "cos sin"}.get(mistake, "sin cos")
    er, ec = _one_axis(r, dim // 2, exponent, order), _one_axis(c, dim // 2, exponent, order)
    return torch.cat([ec, er] if mistake == "columns first" else [er, ec], dim=1).float()


ORDER_MISTAKES = {
    "columns first": "your first half encodes the column and the second the row; the row comes first",
    "column-major": "your patches run down the columns (index c * rows + r); patch (r, c) is row r * cols + c, "
    "as patchify orders them",
}
FORMULA_MISTAKES = {
    "interleaved": "you interleave sin and cos (sin, cos, sin, cos, ...); each half is all the sines, then all "
    "the cosines",
    "cos sin": "you put the cosines before the sines; each half is sin(p w_k) for every k, then cos(p w_k)",
    "k/(dim/2)": "your frequencies fall too slowly: w_k = 10000^(-k / (dim/4)), the exponent's denominator is the "
    "number of frequencies, dim / 4, not dim / 2",
}


def check_sincos_2d(student: Student) -> list[Part]:
    """sincos_2d(rows, cols, dim) -> (rows * cols, dim) against reference_sincos_2d, mistakes named."""
    parts = Parts(
        ("shape (rows * cols, dim)", 2),
        ("patch (r, c) at row r * cols + c; the row's half first", 3),
        ("each half: sines, then cosines, w_k = 10000^(-k / (dim/4))", 3),
        ("a dim that is not a multiple of 4 raises ValueError", 2),
    )
    cases = [(4, 4, 16), (3, 5, 8), (2, 7, 24), (16, 16, 64)]
    got = []
    for rows, cols, dim in cases:
        what = f"sincos_2d({rows}, {cols}, {dim})"
        out = returned_tensor(student.call(what, (rows, cols, dim)), what)
        if shape_of(out) != (rows * cols, dim):
            parts.judge("shape (rows * cols, dim)", f"{what} returned shape {shape_of(out)}, expected "
                        f"({rows * cols}, {dim}): one row per patch, one column per channel")  # fmt: skip
            return parts.finish("not checked: fix the shape first")
        got.append(out)
    parts.judge("shape (rows * cols, dim)", None)

    def matches(mistake: str) -> bool:
        return all(close(g, reference_sincos_2d(*case, mistake), atol=1e-4) for g, case in zip(got, cases, strict=True))

    if matches(""):
        parts.judge("patch (r, c) at row r * cols + c; the row's half first", None)
        parts.judge("each half: sines, then cosines, w_k = 10000^(-k / (dim/4))", None)
    elif found := next((m for m in ORDER_MISTAKES if matches(m)), None):
        parts.judge("patch (r, c) at row r * cols + c; the row's half first", ORDER_MISTAKES[found])
        parts.judge("each half: sines, then cosines, w_k = 10000^(-k / (dim/4))", None)
    elif found := next((m for m in FORMULA_MISTAKES if matches(m)), None):
        parts.judge("patch (r, c) at row r * cols + c; the row's half first", None)
        parts.judge("each half: sines, then cosines, w_k = 10000^(-k / (dim/4))", FORMULA_MISTAKES[found])
    else:
        i = next(
            i for i, (g, case) in enumerate(zip(got, cases, strict=True)) if not close(g, reference_sincos_2d(*case))
        )
        rows, cols, dim = cases[i]
        expected = reference_sincos_2d(rows, cols, dim)
        first = expected[cols + 1, : dim // 2].tolist()[:2]
        problem = (
            f"sincos_2d({rows}, {cols}, {dim}): {largest_difference(got[i], expected, 'patch channel')}. Patch (1, 1) "
            f"should start with sin(1 * w_0) = {first[0]:.4f}, sin(1 * w_1) = {first[1]:.4f}"
        )
        parts.judge("patch (r, c) at row r * cols + c; the row's half first", problem)
        parts.judge("each half: sines, then cosines, w_k = 10000^(-k / (dim/4))", problem)

    problem = None
    for dim in (6, 10):
        what = f"sincos_2d(2, 2, {dim})"
        try:
            out = student.call(what, (2, 2, dim))
        except StudentError as e:
            if "raised ValueError" not in str(e):
                problem = f"{e}; raise ValueError naming dim instead"
            continue
        problem = (
            f"{what} returned {type(out).__name__} of shape {shape_of(out) if hasattr(out, 'shape') else '?'}; "
            f"{dim} channels cannot hold sin and cos for both rows and columns: raise ValueError"
        )
        break
    parts.judge("a dim that is not a multiple of 4 raises ValueError", problem)
    return parts.finish()
