"""Questions about a scene with one-word answers, asked only when the answer is unambiguous."""

from __future__ import annotations

import random

from .config import SceneConfig, _held_out
from .language import (
    NUMBER_WORDS,
    RELATION_WORDS,
    _article,
    _describe,
    _groups,
    _pick,
    _plural,
    _relation_sample,
    _words,
)
from .layout import CONVERSE, _kind


def questions(scene: dict, rng: random.Random, cfg: SceneConfig | None = None) -> list[dict]:
    """Colour, shape, count, existence (one yes, one no) and relation questions about a scene."""
    cfg = cfg or SceneConfig()
    objects = scene["objects"]
    out = []
    for ask in (_q_colour, _q_shape, _q_count, _q_exists, _q_absent, _q_relation):
        qa = ask(objects, rng, cfg)
        if qa is not None:
            out.append({"question": qa[0], "answer": qa[1], "type": qa[2]})
    return out


def _singled_out(objects: list[dict], rng: random.Random, options: tuple) -> tuple[int, str] | None:
    """A random object that some description in options singles out, with that description."""
    for i in rng.sample(range(len(objects)), len(objects)):
        words = _describe(objects, i, rng, options)
        if words:
            return i, words
    return None


def _q_colour(objects: list[dict], rng: random.Random, cfg: SceneConfig) -> tuple[str, str, str] | None:
    found = _singled_out(objects, rng, (("shape",), ("size", "shape")))
    if found is None:
        return None
    ask = _pick(rng, ("what colour is", "what color is", "which colour is"))
    return f"{ask} the {found[1]}?", objects[found[0]]["color"], "colour"


def _q_shape(objects: list[dict], rng: random.Random, cfg: SceneConfig) -> tuple[str, str, str] | None:
    found = _singled_out(objects, rng, (("color",), ("size", "color")))
    if found is None:
        return None
    noun = _pick(rng, ("object", "thing"))
    return f"what shape is the {found[1]} {noun}?", objects[found[0]]["shape"], "shape"


def _q_count(objects: list[dict], rng: random.Random, cfg: SceneConfig) -> tuple[str, str, str]:
    """How many of something; repeated groups are asked about more often, absent pairs now and then."""
    repeated = [key for key, members in _groups(objects) if len(members) > 1]
    absent = [p for p in _seen_pairs(cfg) if not any((o["color"], o["shape"]) == p for o in objects)]
    if repeated and rng.random() < 0.5:
        size, color, shape = rng.choice(repeated)
        attrs = {"color": color, "shape": shape}
    elif absent and rng.random() < 0.15:
        attrs = dict(zip(("color", "shape"), rng.choice(absent), strict=True))
    else:
        obj = rng.choice(objects)
        attrs = {k: obj[k] for k in rng.choice((("shape",), ("color",), ("color", "shape"), ()))}
    count = sum(all(o[k] == v for k, v in attrs.items()) for o in objects)
    noun = _plural(attrs["shape"]) if "shape" in attrs else _pick(rng, ("objects", "shapes"))
    subject = f"{attrs['color']} {noun}" if "color" in attrs else noun
    where = _pick(rng, ("are there", "are in the image", "can you see"))
    return f"how many {subject} {where}?", NUMBER_WORDS[count], "count"


def _seen_pairs(cfg: SceneConfig) -> list[tuple[str, str]]:
    held = _held_out(cfg)
    return [(c, s) for c in cfg.colors for s in cfg.shapes if (c, s) not in held]


def _existence(words: str, rng: random.Random) -> str:
    return _pick(rng, (f"is there {_article(words)} {words}?", f"does the image contain {_article(words)} {words}?"))


def _q_exists(objects: list[dict], rng: random.Random, cfg: SceneConfig) -> tuple[str, str, str]:
    obj = rng.choice(objects)
    attrs = ("color", "shape") if rng.random() < 0.5 else ("size", "color", "shape")
    return _existence(_words(obj, attrs, rng), rng), "yes", "existence"


def _q_absent(objects: list[dict], rng: random.Random, cfg: SceneConfig) -> tuple[str, str, str] | None:
    """An absent object; often a hard one whose colour and shape are both present, just not together."""
    # in object order: a set's order would follow Python's per-process string hashing, and the questions
    # would then differ between runs
    present = list(dict.fromkeys((o["color"], o["shape"]) for o in objects))
    absent = [p for p in _seen_pairs(cfg) if p not in present]
    colors, shapes = {o["color"] for o in objects}, {o["shape"] for o in objects}
    hard = [p for p in absent if p[0] in colors and p[1] in shapes]
    other_size = [(s, *p) for p in present for s in cfg.sizes if (s, *p) not in {_kind(o) for o in objects}]
    other_size = [k for k in other_size if (k[1], k[2]) not in _held_out(cfg)]
    roll = rng.random()
    if hard and roll < 0.4:
        color, shape = rng.choice(hard)
        words = f"{color} {shape}"
    elif other_size and roll < 0.6:
        size, color, shape = rng.choice(other_size)
        words = f"{size} {color} {shape}"
    elif absent:
        color, shape = rng.choice(absent)
        words = f"{color} {shape}"
    else:
        return None
    return _existence(words, rng), "no", "existence"


def _q_relation(objects: list[dict], rng: random.Random, cfg: SceneConfig) -> tuple[str, str, str] | None:
    sample = _relation_sample(objects, rng)
    if sample is None:
        return None
    i, relation, j = sample
    first, second = _describe(objects, i, rng), _describe(objects, j, rng)
    roll = rng.random()
    if roll < 0.34:
        return f"where is the {first} relative to the {second}?", relation.split()[0], "relation"
    asked, answer = (relation, "yes") if roll < 0.67 else (CONVERSE[relation], "no")
    return f"is the {first} {_pick(rng, RELATION_WORDS[asked])} the {second}?", answer, "relation"
