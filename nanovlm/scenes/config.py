"""What a scene may hold (colours, sizes, shapes) and `SceneConfig`, which says what a dataset draws."""

from __future__ import annotations

from dataclasses import dataclass

COLORS = {  # saturated colours, far from each other and from the light backgrounds
    "red": (210, 35, 35),
    "green": (40, 165, 55),
    "blue": (35, 85, 220),
    "yellow": (240, 212, 30),
    "purple": (145, 55, 185),
    "orange": (245, 125, 15),
}
SIZES = {"small": 10.0, "large": 18.0}  # how far across an object is, in pixels of a 64x64 image
SHAPES = ("circle", "square", "triangle", "diamond")
ASPECT = {"circle": (1.0, 1.0), "square": (0.9, 0.9), "triangle": (1.1, 0.95), "diamond": (0.85, 1.2)}  # (w, h)


@dataclass
class SceneConfig:
    """What the scenes look like and how many images each split gets."""

    image_size: int = 64  # pixels per side; object sizes scale with it
    min_objects: int = 1  # fewest objects in one image
    max_objects: int = 4  # most objects in one image (at most 12: counts are written as words)
    shapes: tuple[str, ...] = ("circle", "square", "triangle")  # shapes to draw, names from SHAPES (also "diamond")
    colors: tuple[str, ...] = tuple(COLORS)  # colours to use, names from COLORS
    sizes: tuple[str, ...] = tuple(SIZES)  # sizes to use, names from SIZES
    repeat_prob: float = 0.3  # chance that a multi-object image repeats one object 2-3 times (counting)
    max_iou: float = 0.02  # largest allowed intersection-over-union of two objects' boxes
    n_train: int = 40000  # images in split "train"
    n_val: int = 1000  # images in split "val"
    n_test: int = 1000  # images in split "test"
    n_novel: int = 500  # images in split "novel": each holds at least one held-out combination
    novel: tuple[tuple[str, str], ...] = (("green", "triangle"), ("blue", "circle"))  # (colour, shape) only in "novel"
    captions_per_image: int = 5  # captions per image; the first is the canonical one
    seed: int = 0  # everything (scenes, pixels, captions, questions) follows from it


def check_config(cfg: SceneConfig) -> None:
    """Raise ValueError naming the SceneConfig field that cannot work."""
    for name, known in (("shapes", SHAPES), ("colors", COLORS), ("sizes", SIZES)):
        unknown = [v for v in getattr(cfg, name) if v not in known]
        if unknown or not getattr(cfg, name):
            raise ValueError(f"SceneConfig.{name}={getattr(cfg, name)}: use a non-empty subset of {list(known)}")
    if not 1 <= cfg.min_objects <= cfg.max_objects <= 12:
        raise ValueError(
            f"SceneConfig min_objects={cfg.min_objects}, max_objects={cfg.max_objects}: need 1 <= min <= max <= 12"
        )
    held, combos = _held_out(cfg), {(c, s) for c in cfg.colors for s in cfg.shapes}
    if not held <= combos or held == combos:
        raise ValueError(
            f"SceneConfig.novel={cfg.novel}: pick some (colour, shape) pairs of the configured ones, not all"
        )
    if cfg.n_novel and not held:
        raise ValueError("SceneConfig.n_novel > 0 needs held-out pairs in SceneConfig.novel (or set n_novel=0)")
    if cfg.captions_per_image < 1 or cfg.image_size < 16:
        raise ValueError(f"SceneConfig: captions_per_image={cfg.captions_per_image} must be >= 1, image_size >= 16")


def _held_out(cfg: SceneConfig) -> set[tuple[str, str]]:
    return {(color, shape) for color, shape in cfg.novel}
