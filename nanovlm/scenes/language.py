"""English about scenes: the caption grammar, and the parser that reads a caption back.

Captions come first: the canonical one, then varied templates; every caption names every object. The
parser is their inverse, and tolerant, so that a model's captions can be checked against the scene.
"""

from __future__ import annotations

import random
import re
from itertools import pairwise

from .config import COLORS, SHAPES, SIZES
from .layout import CONVERSE, RELATION_MARGIN, _extent, _kind, relation_pairs

# ---------------------------------------------------------------------------------------------------
# Captions

NUMBER_WORDS = tuple("zero one two three four five six seven eight nine ten eleven twelve".split())
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}  # first is canonical
SHAPE_WORDS = {
    "circle": ("circle", "disc"),
    "square": ("square", "box"),
    "triangle": ("triangle",),
    "diamond": ("diamond", "rhombus"),
}
RELATION_WORDS = {
    "left of": ("to the left of", "left of", "on the left of"),
    "right of": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over", "higher than"),
    "below": ("below", "under", "beneath", "lower than"),
}


def captions(scene: dict, rng: random.Random, image_size: int, n: int = 5) -> list[str]:
    """n captions of a scene: captions[0] is the canonical form, the others vary wording and order."""
    objects = scene["objects"]
    out = [canonical_caption(objects, image_size)]
    templates = [_t_there_are, _t_prefix, _t_shown, _t_sentences, _t_ordered, _t_relation_first, _t_list_then_relation]
    rng.shuffle(templates)
    for attempt in range(20 * n):
        if len(out) == n:
            break
        caption = templates[attempt % len(templates)](objects, rng)
        if caption is not None and (_sentence_case(caption) not in out or attempt >= 10 * n):
            out.append(_sentence_case(caption))
    return out


def canonical_caption(objects: list[dict], image_size: int) -> str:
    """Every object group in a fixed attribute order (colour, shape, size), where each one-of-a-kind object
    is, then the first relation that holds.

    A fixed order makes the caption a function of what is in the image, not of where: the model only
    has to find each kind of object. The location words ("at the top left") come before the relation
    sentence, so the model can read the relation off positions it has already written down; its stated
    relations then hold far more often (README, "Places before the relation").
    """
    groups = sorted(_groups(objects), key=lambda g: _attribute_rank(g[0]))
    places = [f" {where(objects[m[0]], image_size)}" if len(m) == 1 else "" for _, m in groups]
    text = _join([_phrase(len(m), *key) + place for (key, m), place in zip(groups, places, strict=True)]) + "."
    listed = {i: r for r, (_, members) in enumerate(groups) for i in members}
    pairs = sorted(relation_pairs(objects), key=lambda p: sorted((listed[p[0]], listed[p[2]])))
    if pairs:
        i, relation, j = pairs[0]
        if listed[j] < listed[i]:
            i, relation, j = j, CONVERSE[relation], i
        full = ("size", "color", "shape")
        text += f" the {_words(objects[i], full)} is {RELATION_WORDS[relation][0]} the {_words(objects[j], full)}."
    return _sentence_case(text)


WHERE = (
    ("at the top left", "at the top", "at the top right"),
    ("on the left", "in the middle", "on the right"),
    ("at the bottom left", "at the bottom", "at the bottom right"),
)


def where(obj: dict, image_size: int) -> str:
    """The ninth of the image (a 3 x 3 grid) that holds the object's centre, in words."""
    row, col = (min(2, int(obj[c] * 3 / image_size)) for c in ("cy", "cx"))
    return WHERE[row][col]


def _attribute_rank(kind: tuple[str, str, str]) -> tuple[int, int, int]:
    size, color, shape = kind
    return list(COLORS).index(color), SHAPES.index(shape), list(SIZES).index(size)


def _groups(objects: list[dict]) -> list[tuple[tuple[str, str, str], list[int]]]:
    """Identical objects grouped, groups ordered left to right by their leftmost member."""
    groups: dict[tuple[str, str, str], list[int]] = {}
    for i in sorted(range(len(objects)), key=lambda i: objects[i]["cx"]):
        groups.setdefault(_kind(objects[i]), []).append(i)
    return list(groups.items())


def _pick(rng: random.Random | None, options: tuple[str, ...] | list[str], p_first: float = 0.0) -> str:
    """options[0] without an rng or with probability p_first, else a uniform choice."""
    if rng is None or rng.random() < p_first:
        return options[0]
    return rng.choice(options)


def _plural(word: str) -> str:
    return word + "es" if word.endswith(("s", "x")) else word + "s"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _phrase(count: int, size: str, color: str, shape: str, rng: random.Random | None = None) -> str:
    """A counted noun phrase such as 'a large red circle' or 'two small blue squares'."""
    noun = _pick(rng, SHAPE_WORDS[shape], p_first=0.8)
    adjectives = f"{_pick(rng, SIZE_WORDS[size], p_first=0.5)} {color}"
    if count == 1:
        return f"{_pick(rng, ('a', 'one'), p_first=0.9)} {adjectives} {noun}"
    number = "a pair of" if count == 2 and rng is not None and rng.random() < 0.25 else NUMBER_WORDS[count]
    return f"{number} {adjectives} {_plural(noun)}"


def _join(phrases: list[str], rng: random.Random | None = None) -> str:
    if len(phrases) == 1:
        return phrases[0]
    last = _pick(rng, (" and ", " and ", " as well as ", " with ", " plus "), p_first=0.5)
    if len(phrases) > 2 and last == " and " and rng is not None and rng.random() < 0.3:
        last = ", and "
    return ", ".join(phrases[:-1]) + last + phrases[-1]


def _listing(objects: list[dict], rng: random.Random, indices: list[int] | None = None) -> str:
    """Every group among `indices` (default all) as counted phrases, left to right or shuffled."""
    chosen = set(range(len(objects)) if indices is None else indices)
    groups = [(key, [i for i in members if i in chosen]) for key, members in _groups(objects)]
    groups = [(key, members) for key, members in groups if members]
    if rng.random() < 0.5:
        rng.shuffle(groups)
    return _join([_phrase(len(members), *key, rng) for key, members in groups], rng)


def _words(obj: dict, attrs: tuple[str, ...], rng: random.Random | None = None) -> str:
    """The chosen attributes of obj as words in English order, e.g. 'big red circle'."""
    words = {"size": _pick(rng, SIZE_WORDS[obj["size"]], 0.5), "color": obj["color"]}
    words["shape"] = _pick(rng, SHAPE_WORDS[obj["shape"]], 0.8)
    return " ".join(words[a] for a in ("size", "color", "shape") if a in attrs)


DESCRIPTIONS = (("shape",), ("color", "shape"), ("size", "shape"), ("size", "color", "shape"))


def _describe(objects: list[dict], i: int, rng: random.Random, options: tuple = DESCRIPTIONS) -> str | None:
    """Words that single out object i among objects (a random unique choice), or None if none does."""
    unique = [a for a in options if sum(all(o[k] == objects[i][k] for k in a) for o in objects) == 1]
    return _words(objects[i], rng.choice(unique), rng) if unique else None


def _relation_sample(objects: list[dict], rng: random.Random) -> tuple[int, str, int] | None:
    pairs = relation_pairs(objects)
    if not pairs:
        return None
    i, relation, j = rng.choice(pairs)
    return (j, CONVERSE[relation], i) if rng.random() < 0.5 else (i, relation, j)


def _be(count: int) -> str:
    return "is" if count == 1 else "are"


def _t_there_are(objects: list[dict], rng: random.Random) -> str:
    noun = _pick(rng, ("object", "shape", "thing"))
    noun = noun if len(objects) == 1 else _plural(noun)
    return f"there {_be(len(objects))} {NUMBER_WORDS[len(objects)]} {noun}: {_listing(objects, rng)}."


def _t_prefix(objects: list[dict], rng: random.Random) -> str:
    prefixes = (
        "a picture of",
        "an image of",
        "a drawing of",
        "this image shows",
        "the picture contains",
        "we can see",
        "a scene with",
        "a simple scene with",
        "here we have",
    )
    return f"{_pick(rng, prefixes)} {_listing(objects, rng)}."


def _t_shown(objects: list[dict], rng: random.Random) -> str:
    be = _be(len(objects))
    endings = (f"{be} shown", f"{be} visible", f"{be} in the picture", "on a plain background")
    return f"{_listing(objects, rng)} {_pick(rng, endings)}."


def _t_sentences(objects: list[dict], rng: random.Random) -> str:
    groups = _groups(objects)
    if rng.random() < 0.5:
        rng.shuffle(groups)
    lead = _pick(rng, ("there {be} ", "i see ", "", "you can see "))
    return " ".join(f"{lead.format(be=_be(len(m)))}{_phrase(len(m), *key, rng)}." for key, m in groups)


def _t_ordered(objects: list[dict], rng: random.Random) -> str | None:
    """'From left to right: ...' when every object is one of a kind and each is clearly past the previous."""
    if len(objects) < 2 or len(_groups(objects)) < len(objects):
        return None
    axis, words = rng.choice((("cx", "left to right"), ("cy", "top to bottom")))
    order = sorted(objects, key=lambda o: o[axis])
    if any(b[axis] - a[axis] < RELATION_MARGIN * (_extent(a) + _extent(b)) / 2 for a, b in pairwise(order)):
        return None
    listing = _join([_phrase(1, *_kind(o), rng) for o in order], rng if rng.random() < 0.5 else None)
    return f"from {words}: {listing}." if rng.random() < 0.5 else f"{listing}, from {words}."


def _t_relation_first(objects: list[dict], rng: random.Random) -> str | None:
    """'A large blue square is above a small yellow triangle, and there are also ...'."""
    sample = _relation_sample(objects, rng)
    if sample is None:
        return None
    i, relation, j = sample
    first, second = _phrase(1, *_kind(objects[i]), rng), _phrase(1, *_kind(objects[j]), rng)
    text = f"{first}{_pick(rng, (' is ', ' '))}{_pick(rng, RELATION_WORDS[relation])} {second}"
    rest = [k for k in range(len(objects)) if k not in (i, j)]
    if not rest:
        return text + "."
    be = _be(len(rest))
    tail = _pick(rng, (f", and there {be} also ", f". there {be} also ", ", plus ", "; the picture also has "))
    return f"{text}{tail}{_listing(objects, rng, rest)}."


def _t_list_then_relation(objects: list[dict], rng: random.Random) -> str | None:
    """All objects listed, then 'The red circle is to the left of the square.'."""
    sample = _relation_sample(objects, rng)
    if sample is None:
        return None
    i, relation, j = sample
    lead = _pick(rng, ("", "a picture of ", "here we have "))
    first, second = _describe(objects, i, rng), _describe(objects, j, rng)
    return f"{lead}{_listing(objects, rng)}. the {first} is {_pick(rng, RELATION_WORDS[relation])} the {second}."


def _sentence_case(text: str) -> str:
    text = re.sub(r"(^|[.!?]\s+)([a-z])", lambda m: m.group(1) + m.group(2).upper(), text)
    return re.sub(r"\bi\b", "I", text)


# ---------------------------------------------------------------------------------------------------
# Parsing a caption back into objects and relations


def _synonyms(**meanings: str) -> dict[str, str]:
    """{word: meaning} from meaning="word word ..."."""
    return {word: meaning for meaning, words in meanings.items() for word in words.split()}


# Words a caption may use. Values the scenes never have ("medium", "pink", "star") still parse, so that a
# metric can count them as wrong instead of the parser silently dropping them.
_SIZE_FORMS = _synonyms(small="small little tiny smaller", large="large big huge larger bigger", medium="medium")
_COLOR_FORMS = _synonyms(
    red="red", green="green", blue="blue", yellow="yellow", purple="purple violet", orange="orange",
    gray="gray grey", black="black", white="white", pink="pink", brown="brown", cyan="cyan",
)  # fmt: skip
_SHAPE_NOUNS = _synonyms(
    circle="circle disc disk dot ball", square="square box", triangle="triangle", diamond="diamond rhombus",
    rectangle="rectangle", star="star", oval="oval", heart="heart", hexagon="hexagon", pentagon="pentagon",
)  # fmt: skip
_SHAPE_FORMS = {w: (s, False) for w, s in _SHAPE_NOUNS.items()}  # word: (shape, plural?)
_SHAPE_FORMS |= {_plural(w): (s, True) for w, s in _SHAPE_NOUNS.items()} | {"rhombi": ("diamond", True)}
_COUNTS = {**{w: i for i, w in enumerate(NUMBER_WORDS)}, "a": 1, "an": 1, "another": 1, "single": 1}
_DEFINITE = {"the", "this", "that", "these", "those"}
_VAGUE = {"some", "several", "many", "few", "multiple", "various", "numerous", "no", "any"}
_NP_FILLER = {"and", ",", "coloured", "colored", "sized", "very", "bright", "dark", "light", "pale"}
_COPULA = {"is", "are", "both", "all", "and", ","}
_SENTENCE_END = {".", ";", "!", "?"}
_PHRASES = sorted(
    [((w,), ("rel", r)) for r, forms in RELATION_WORDS.items() for w in forms if " " not in w]
    + [(tuple(w.split()), ("rel", r)) for r, forms in RELATION_WORDS.items() for w in forms if " " in w]
    + [
        (tuple(f"{p} the {side} {s}of".split()), ("rel", f"{side} of"))
        for p in ("to", "on", "at")
        for side in ("left", "right")
        for s in ("", "side ", "hand side ")
    ]
    + [(("underneath",), ("rel", "below")), (("on", "top", "of"), ("rel", "above"))]
    + [(tuple(f"{a}{w} of".split()), ("count", 2)) for a in ("a ", "") for w in ("pair", "couple")],
    key=lambda p: -len(p[0]),
)


class _Unparseable(Exception):
    """Something that looks like an object phrase cannot be read."""


def parse_caption(text: str) -> dict:
    """Objects (count, size, colour, shape) and relations stated by a caption; parsed=False if unreadable."""
    try:
        objects, relations = _Parser().run(_tokens(text))
    except _Unparseable:
        return {"parsed": False, "objects": [], "relations": []}
    return {"parsed": bool(objects), "objects": objects, "relations": relations}


def _tokens(text: str) -> list[tuple[str, object]]:
    """Lower-cased words, numbers and punctuation, with multi-word relations and counts joined."""
    words = re.findall(r"[a-z]+|\d+|[.,;:!?]", text.lower())
    out, i = [], 0
    while i < len(words):
        match = next((p for p in _PHRASES if tuple(words[i : i + len(p[0])]) == p[0]), None)
        if match:
            out.append(match[1])
            i += len(match[0])
        else:
            out.append(("count", int(words[i])) if words[i].isdigit() else ("word", words[i]))
            i += 1
    return out


class _Parser:
    """A left-to-right scan: modifiers gather until a shape noun closes an object phrase."""

    def __init__(self):
        self.objects: list[dict] = []
        self.relations: list[dict] = []
        self.sentence: list[int] = []  # object indices mentioned in the current sentence
        self.pending_relation: tuple[int, str] | None = None
        self.after_object = False  # just after an object phrase (and copulas): bare adjectives describe it
        self._reset()

    def _reset(self) -> None:
        self.count: int | str | None = None
        self.definite = False
        self.attrs: dict[str, str] = {}
        self.predicate = False

    def run(self, tokens: list[tuple[str, object]]) -> tuple[list[dict], list[dict]]:
        for kind, value in tokens + [("word", ".")]:
            if kind == "word" and value in _SHAPE_FORMS:
                self._close(*_SHAPE_FORMS[value])
            elif kind == "word" and (value in _SIZE_FORMS or value in _COLOR_FORMS):
                self._attribute(value)
            elif kind == "word" and self.attrs and value in _NP_FILLER:
                continue
            else:
                self._other(kind, value)
        return self.objects, self.relations

    def _attribute(self, word: str) -> None:
        if not self.attrs and self.count is None and not self.definite:
            self.predicate = self.after_object  # 'the circle is red'
        name, value = ("size", _SIZE_FORMS[word]) if word in _SIZE_FORMS else ("color", _COLOR_FORMS[word])
        if self.attrs.get(name, value) != value:
            raise _Unparseable(f"two {name}s in one phrase: {self.attrs[name]} and {value}")
        self.attrs[name] = value

    def _other(self, kind: str, value: object) -> None:
        if self.attrs:
            self._finish_predicate()
        if kind == "count" or value in _COUNTS or value in _VAGUE:
            definite = self.definite and self.count is None  # 'the two circles'
            self._reset()
            self.definite = definite
            self.count = value if kind == "count" else _COUNTS.get(value, "vague")
        else:
            self._reset()
            self.definite = value in _DEFINITE
        if kind == "rel":
            self.pending_relation = (self.sentence[-1], value) if self.sentence else None
        if value in _SENTENCE_END:
            self.sentence, self.pending_relation = [], None
        self.after_object = self.after_object and value in _COPULA

    def _finish_predicate(self) -> None:
        """Adjectives not followed by a shape: they must describe the object just named."""
        if not (self.predicate and self.sentence):
            raise _Unparseable(f"attributes {self.attrs} without a shape")
        target = self.objects[self.sentence[-1]]
        for name, value in self.attrs.items():
            if target[name] not in (None, value):
                raise _Unparseable(f"object {target} said to be {value}")
            target[name] = value

    def _close(self, shape: str, plural: bool) -> None:
        count = self.count if self.count is not None else (None if plural else 1)
        if count == "vague" or count == 0:
            raise _Unparseable(f"no exact count for {shape}")
        found = {"count": count, "size": self.attrs.get("size"), "color": self.attrs.get("color"), "shape": shape}
        index = self._refer(found) if self.definite else None
        if index is None:
            if count is None:
                raise _Unparseable(f"plural {shape} without a count")
            self.objects.append(found)
            index = len(self.objects) - 1
        if self.pending_relation is not None:
            subject, relation = self.pending_relation
            self.relations.append({"subject": subject, "relation": relation, "object": index})
            self.pending_relation = None
        self.sentence.append(index)
        self._reset()
        self.after_object = True

    def _refer(self, found: dict) -> int | None:
        """The earlier object a definite phrase ('the red circle') points to, if any."""
        for i, obj in enumerate(self.objects):
            if found["shape"] == obj["shape"] and all(found[k] in (None, obj[k]) for k in ("size", "color")):
                return i
        return None
