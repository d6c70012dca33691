"""Exercise 17, square_image: a photo of any shape made into the model's square input, by centre crop or letterbox.

The scenes are square; COCO's photos are not (notebook 11). nanovlm.data.resize_image, the reference here,
makes every photo square when `data coco` packs it: "crop" keeps the middle square, "pad" keeps everything on
black bars. The check draws flat-coloured test cards, so any reasonable resampling passes and the geometry
decides.
"""

import numpy as np
from PIL import Image

from .. import data
from .results import Part, Parts
from .student import Student, StudentError

FORBIDDEN = ((data, "resize_image"),)
RED, BLUE = (220, 30, 30), (30, 30, 220)


def _card(w: int, h: int) -> Image.Image:
    """Red in the middle square, blue on the two margins that a centre crop cuts away."""
    img = Image.new("RGB", (w, h), BLUE)
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img.paste(Image.new("RGB", (side, side), RED), (left, top))
    return img


def _near(pixels: np.ndarray, color: tuple[int, int, int], tol: int = 12) -> bool:
    return pixels.size > 0 and bool((np.abs(pixels.astype(int) - np.array(color)) <= tol).all())


def check_square_image(student: Student) -> list[Part]:
    """square_image(img, size, mode) -> uint8 (size, size, 3), its geometry checked on test cards."""
    parts = Parts(
        ("a (size, size, 3) uint8 array", 2),
        ("crop keeps the middle square", 3),
        ("pad keeps the whole photo, centred on black bars", 3),
        ("an unknown mode raises ValueError", 2),
    )
    shapes = [(120, 60), (60, 120), (97, 41), (50, 50)]
    outs = {}
    for mode in ("crop", "pad"):
        for w, h in shapes:
            what = f"square_image(<{w}x{h} photo>, 32, {mode!r})"
            out = student.call(what, (_card(w, h), 32, mode))
            if isinstance(out, Image.Image):
                raise StudentError(f"{what} returned a PIL image; return np.asarray(image, dtype=np.uint8)")
            out = np.asarray(out)
            if out.shape != (32, 32, 3) or out.dtype != np.uint8:
                parts.judge(
                    "a (size, size, 3) uint8 array",
                    f"{what} returned {out.dtype} of shape {out.shape}; return a uint8 array of shape (32, 32, 3)",
                )
                return parts.finish("not checked: fix the shape and dtype first")
            outs[mode, w, h] = out
    parts.judge("a (size, size, 3) uint8 array", None)

    problem = None
    for w, h in shapes:
        out = outs["crop", w, h]
        if not _near(out[2:-2, 2:-2], RED):
            blue = _near(out[:, :3], BLUE) or _near(out[:3], BLUE)
            problem = f"for a {w}x{h} photo whose middle square is red and whose margins are blue, your crop shows " + (
                "blue at an edge: crop the middle square (cut (w - h) / 2 from each side of the longer one), not a "
                "corner, and do not squeeze the whole photo"
                if blue
                else "other colours: the middle square, resized, should be all red"
            )
            break
    parts.judge("crop keeps the middle square", problem)

    problem = None
    for w, h in shapes:
        out, ref = outs["pad", w, h], data.resize_image(_card(w, h), 32, "pad")
        black = (ref == 0).all(-1)
        bars, photo = black & _away_from(~black), ~black & _away_from(black)  # clear of the edge either way
        if not ((out[bars] == 0).all() and (out[photo] > 0).any(-1).all()):
            rows, cols = np.where(~black)
            problem = (
                f"for a {w}x{h} photo, the photo should fill rows {rows.min()}-{rows.max()} and columns "
                f"{cols.min()}-{cols.max()} of 32 and the rest be black (0, 0, 0): scale the longer side to 32 "
                "keeping the aspect, and paste it at ((32 - width) // 2, (32 - height) // 2)"
            )
            break
    parts.judge("pad keeps the whole photo, centred on black bars", problem)

    problem = None
    try:
        out = student.call("square_image(photo, 32, 'stretch')", (_card(60, 30), 32, "stretch"))
        problem = "square_image(photo, 32, 'stretch') returned an image; an unknown mode must raise ValueError"
    except StudentError as e:
        if "raised ValueError" not in str(e):
            problem = f"{e}; raise ValueError naming the mode instead"
    parts.judge("an unknown mode raises ValueError", problem)
    return parts.finish()


def _away_from(black: np.ndarray) -> np.ndarray:
    """Pixels at least 2 away from any bar pixel (resampling may blur the photo's edge)."""
    near = black.copy()
    for dy in (-2, -1, 1, 2):
        near |= np.roll(black, dy, 0)
        near |= np.roll(black, dy, 1)
    return ~near
