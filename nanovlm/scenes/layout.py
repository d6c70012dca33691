"""Where objects go: sampling a scene record, and the one rule for the relations that hold between objects.

The caption generator states only relations that `relation_holds` accepts, and the grounded metrics
score a model's stated relations with the same rule.
"""

from __future__ import annotations

import random
from itertools import combinations

from .config import ASPECT, SIZES, SceneConfig, _held_out

# ---------------------------------------------------------------------------------------------------
# Sampling a scene: which objects, and where


def sample_scene(rng: random.Random, cfg: SceneConfig, image_id: int, novel: bool = False) -> dict:
    """A random scene record; with novel=True it holds at least one held-out (colour, shape) pair."""
    n = rng.randint(cfg.min_objects, cfg.max_objects)
    for _ in range(100):
        objects = _place(rng, cfg, _sample_kinds(rng, cfg, n, novel))
        if objects is not None:
            return {"image_id": int(image_id), "objects": objects}
    raise RuntimeError(f"scenes: could not place {n} objects without overlap in {cfg.image_size}px; lower max_objects")


def _sample_kinds(rng: random.Random, cfg: SceneConfig, n: int, novel: bool) -> list[tuple[str, str, str]]:
    """n (size, colour, shape) triples; one may repeat 2-3 times so that counting matters."""
    held = _held_out(cfg)
    seen = [(c, s) for c in cfg.colors for s in cfg.shapes if (c, s) not in held]
    pool = seen + sorted(held) if novel else seen

    def draw(pairs: list[tuple[str, str]]) -> tuple[str, str, str]:
        color, shape = rng.choice(pairs)
        return rng.choice(cfg.sizes), color, shape

    kinds = [draw(sorted(held) if novel else seen)]
    if n >= 2 and rng.random() < cfg.repeat_prob:
        kinds += kinds[:1] * (rng.randint(2, min(3, n)) - 1)
    while len(kinds) < n:
        kinds.append(draw(pool))
    return kinds


def _place(rng: random.Random, cfg: SceneConfig, kinds: list[tuple[str, str, str]]) -> list[dict] | None:
    """Objects at random positions inside the image that barely overlap, or None if they do not fit."""
    scale = cfg.image_size / 64
    objects = []
    for size, color, shape in kinds:
        extent = SIZES[size] * scale * rng.uniform(0.94, 1.06)  # a little size jitter; small/large stay apart
        w, h = extent * ASPECT[shape][0], extent * ASPECT[shape][1]
        for _ in range(50):
            cx = round(rng.uniform(w / 2 + scale, cfg.image_size - w / 2 - scale), 2)
            cy = round(rng.uniform(h / 2 + scale, cfg.image_size - h / 2 - scale), 2)
            box = [round(v, 2) for v in (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)]
            if all(box_iou(box, o["bbox"]) <= cfg.max_iou for o in objects):
                break
        else:
            return None
        objects.append({"shape": shape, "color": color, "size": size, "cx": cx, "cy": cy, "bbox": box})
    return objects


def box_iou(a: list[float], b: list[float]) -> float:
    """Intersection over union of two [x0, y0, x1, y1] boxes."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - iw * ih
    return iw * ih / union


# ---------------------------------------------------------------------------------------------------
# The one relation rule

RELATIONS = ("left of", "right of", "above", "below")
CONVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
RELATION_MARGIN = 0.6  # centres must differ by this fraction of the objects' mean extent (6 px for two small)


def relation_holds(a: dict, relation: str, b: dict) -> bool:
    """True when object a is clearly `relation` object b: far enough apart, and on the dominant axis."""
    dx, dy = b["cx"] - a["cx"], b["cy"] - a["cy"]  # image y grows downwards
    axes = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}
    if relation not in axes:
        raise ValueError(f"relation {relation!r} is unknown; use one of {RELATIONS}")
    along, across = axes[relation]
    margin = RELATION_MARGIN * (_extent(a) + _extent(b)) / 2
    return along >= margin and along > abs(across)


def relation_pairs(objects: list[dict]) -> list[tuple[int, str, int]]:
    """(i, relation, j) for every pair of one-of-a-kind objects (i < j) where a relation holds."""
    kinds = [_kind(o) for o in objects]
    single = [i for i, k in enumerate(kinds) if kinds.count(k) == 1]
    pairs = combinations(single, 2)
    return [(i, r, j) for i, j in pairs for r in RELATIONS if relation_holds(objects[i], r, objects[j])]


def _extent(obj: dict) -> float:
    x0, y0, x1, y1 = obj["bbox"]
    return (x1 - x0 + y1 - y0) / 2


def _kind(obj: dict) -> tuple[str, str, str]:
    """An object's (size, colour, shape): objects of one kind look alike, so only a count tells them apart."""
    return obj["size"], obj["color"], obj["shape"]
