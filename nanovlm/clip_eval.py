"""What a contrastive model (clip.CLIP) gets right and wrong, checked against the exact scene records.

- retrieval: each image's canonical caption finds the image among all the others, and the other way round;
- zero_shot: colour, shape and size of one-object scenes, read off by comparing the image with captions
  that name each value (no classifier is trained);
- swaps: the hard case. Does the true caption of a two-object scene beat the same caption with the two
  colours exchanged (binding), or with the relation turned round? A caption naming a colour absent from
  the image is the control that any colour-aware model gets right.

Every function needs only the model's two encoders: encode_image((B, 3, H, W) in [0, 1]) and encode_text
((B, T) ids), each giving (B, E) unit vectors, so a dot product is a cosine similarity.
"""

import math
import random
from collections.abc import Sequence
from itertools import permutations, product

import numpy as np
import torch
import torch.nn.functional as F

from . import metrics, scenes
from .clip import CLIP
from .data import PackedSplit, to_tensor
from .tokenizer import Tokenizer

ATTRIBUTES = ("color", "shape", "size")
KS = (1, 5, 10)  # recall@K of retrieval

# Zero-shot prompts, each a one-object caption in the dataset's own phrasing (canonical caption first, then
# the captions' other templates). Every prompt names all three attributes, as every training caption does;
# the ones a question leaves open are summed over. A template with {where} is written with each of the
# nine places of the 3 x 3 grid.
TEMPLATES = (
    "A {size} {color} {shape} {where}.",
    "A picture of a {size} {color} {shape}.",
    "There is one shape: a {size} {color} {shape}.",
    "A {size} {color} {shape} is shown.",
    "There is a {size} {color} {shape}.",
)

# What each kind of swap changes in the true caption, for the report.
SWAPS = {
    "binding": "the two objects' colours exchanged",
    "relation": "the relation's two objects exchanged",
    "converse": "the relation word replaced by its converse",
    "control": "one colour replaced by a colour absent from the image",
}


# ----------------------------------------------------------------------------- embeddings


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def embed_texts(model: CLIP, tokenizer: Tokenizer, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """(N, E) unit vectors of texts, tokenized as training reads captions: <|image|> text <|endoftext|>.

    Rows are cut to the text encoder's max_seq_len (as the training loader cuts them) and padded with
    <|endoftext|>, which the encoder never reads past.
    """
    if not texts:
        raise ValueError("embed_texts got no texts; pass at least one")
    model.eval()
    width = model.cfg.text.max_seq_len
    out = []
    for start in range(0, len(texts), batch_size):
        chunk = tokenizer.encode_batch(list(texts[start : start + batch_size]))
        seqs = [[tokenizer.image, *ids, tokenizer.eot][:width] for ids in chunk]
        ids = torch.full((len(seqs), max(map(len, seqs))), tokenizer.eot, dtype=torch.long)  # (B, T)
        for row, seq in enumerate(seqs):
            ids[row, : len(seq)] = torch.tensor(seq)
        out.append(model.encode_text(ids.to(_device(model))).float().cpu())
    return torch.cat(out)  # (N, E)


def count_cut(model: CLIP, tokenizer: Tokenizer, texts: Sequence[str]) -> int:
    """How many texts embed_texts cuts: their tokens, <|image|> and <|endoftext|> exceed max_seq_len."""
    return sum(len(ids) + 2 > model.cfg.text.max_seq_len for ids in tokenizer.encode_batch(list(texts)))


@torch.no_grad()
def embed_images(model: CLIP, images: np.ndarray, batch_size: int = 256) -> torch.Tensor:
    """(N, E) unit vectors of (N, H, W, 3) uint8 images."""
    if len(images) == 0:
        raise ValueError("embed_images got no images; pass at least one")
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        pixels = to_tensor(images[start : start + batch_size], _device(model))  # (B, 3, H, W)
        out.append(model.encode_image(pixels).float().cpu())
    return torch.cat(out)  # (N, E)


def _count(split: PackedSplit, limit: int | None) -> int:
    """How many of the split's first images to use."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit {limit}: use at least 1 image, or pass None for the whole split")
    return min(limit or len(split), len(split))


def _records(split: PackedSplit, task: str) -> list[dict]:
    if split.scenes is None:
        raise ValueError(f"{task} needs scene records, and {split.dir} has none; evaluate on a scenes split")
    return split.scenes


# ----------------------------------------------------------------------------- retrieval


def retrieval(model: CLIP, tokenizer: Tokenizer, split: PackedSplit, limit: int | None = None) -> dict:
    """Recall@1/5/10 of the first `limit` images and their canonical captions, in both directions.

    An image whose canonical caption equals the query's counts as a hit: the caption says all there is to
    tell identical scenes apart, so no model can rank one above the other.
    """
    n = _count(split, limit)
    captions = [refs[0] for refs in split.captions[:n]]
    sim = (embed_images(model, split.images[:n]) @ embed_texts(model, tokenizer, captions).T).numpy()  # (N, N)
    caption_id = np.unique(captions, return_inverse=True)[1]  # (N,) equal captions share an id
    same = caption_id[:, None] == caption_id[None, :]  # (N, N) symmetric
    return {
        "task": "retrieval",
        "n": n,
        "n_duplicate_captions": int((same.sum(axis=1) > 1).sum()),
        "n_cut": count_cut(model, tokenizer, captions),
        "text_to_image": metrics.retrieval_recall_at_k(sim.T, KS, targets=same),
        "image_to_text": metrics.retrieval_recall_at_k(sim, KS, targets=same),
        "chance": {f"r@{k}": min(k, n) / n for k in KS},
    }


# ----------------------------------------------------------------------------- zero-shot attributes


def vocabulary(records: Sequence[dict]) -> dict[str, list[str]]:
    """The colours, shapes and sizes the scenes use, in the scenes config's order: the classes to choose from."""
    used = {attr: {o[attr] for r in records for o in r["objects"]} for attr in ATTRIBUTES}
    known = {"color": list(scenes.COLORS), "shape": list(scenes.SHAPES), "size": list(scenes.SIZES)}
    return {attr: [v for v in known[attr] if v in used[attr]] for attr in ATTRIBUTES}


def prompts(classes: dict[str, list[str]], templates: Sequence[str] = TEMPLATES) -> list[tuple[dict, str]]:
    """Every template written with every (colour, shape, size) and, where it has one, every place."""
    places = [p for row in scenes.WHERE for p in row]
    out = []
    for template, color, shape, size in product(templates, classes["color"], classes["shape"], classes["size"]):
        for where in places if "{where}" in template else [""]:
            values = {"color": color, "shape": shape, "size": size}
            out.append((values, template.format(**values, where=where)))
    return out


def zero_shot(
    model: CLIP,
    tokenizer: Tokenizer,
    split: PackedSplit,
    templates: Sequence[str] = TEMPLATES,
    limit: int | None = None,
) -> dict:
    """Colour, shape and size of the one-object scenes among the first `limit` images, read zero-shot.

    Every prompt is a whole one-object caption (one colour, shape and size; every template and place), and
    the model's softmax over all of them, at its own learned scale, says how likely each caption is. The
    probability of a value is the sum over the prompts that name it: 'circle' is every circle caption
    together, whatever its colour, size, template or place. The prediction is the likeliest value.

    CLIP's own ensemble averages the unit vectors of a class's prompts into one class vector instead
    (`class_vectors`); where the prompts vary three attributes at once, that average mixes captions the
    image is near with captions it is far from, and reads shape and size worse (notebook 08 compares the
    two). Confusion rows are the truth, columns the prediction.
    """
    records = _records(split, "zero-shot")[: _count(split, limit)]
    rows = [i for i, r in enumerate(records) if len(r["objects"]) == 1]
    if not rows:
        raise ValueError(f"zero-shot needs one-object scenes, and the first {len(records)} of {split.dir} have none")
    classes = vocabulary(split.scenes)
    written = prompts(classes, templates)
    text = embed_texts(model, tokenizer, [t for _, t in written])  # (P, E)
    image = embed_images(model, split.images[rows])  # (n, E)
    with torch.no_grad():
        p = (model.scale().float().cpu() * image @ text.T).softmax(dim=-1)  # (n, P): each prompt's probability
    result = {"task": "zeroshot", "n": len(rows), "n_prompts": len(written)}
    for attr in ATTRIBUTES:
        by_value = torch.stack([p[:, m].sum(1) for m in _members(written, attr, classes[attr])], 1)  # (n, C)
        predicted = by_value.argmax(dim=1).tolist()  # (n,): the value whose prompts hold the most probability
        truth = [classes[attr].index(records[i]["objects"][0][attr]) for i in rows]
        confusion = np.zeros((len(classes[attr]),) * 2, dtype=int)  # (C true, C predicted)
        np.add.at(confusion, (truth, predicted), 1)
        result[attr] = {
            "accuracy": float(np.trace(confusion) / len(rows)),
            "chance": 1 / len(classes[attr]),
            "classes": classes[attr],
            "confusion": confusion.tolist(),
        }
    return result


def class_vectors(
    text: torch.Tensor, written: Sequence[tuple[dict, str]], attr: str, values: Sequence[str]
) -> torch.Tensor:
    """CLIP's prompt ensemble: (C, E), per value of attr the mean of the unit vectors (P, E) of the prompts
    naming it, normalised again; an image's class is the nearest row."""
    return F.normalize(torch.stack([text[m].mean(0) for m in _members(written, attr, values)]), dim=-1)


def _members(written: Sequence[tuple[dict, str]], attr: str, values: Sequence[str]) -> list[list[int]]:
    """Per value of attr, the indices of the prompts that name it."""
    return [[k for k, (v, _) in enumerate(written) if v[attr] == value] for value in values]


# ----------------------------------------------------------------------------- swapped captions


def _name(obj: dict) -> str:
    """An object as the canonical caption names it in its relation sentence: 'small red circle'."""
    return f"{scenes.SIZE_WORDS[obj['size']][0]} {obj['color']} {scenes.SHAPE_WORDS[obj['shape']][0]}"


def _relation_sentence(a: dict, relation: str, b: dict) -> str:
    return f"The {_name(a)} is {scenes.RELATION_WORDS[relation][0]} the {_name(b)}."


def swapped_captions(objects: list[dict], image_size: int, control_color: str, control_object: int) -> dict[str, str]:
    """The canonical caption of a two-object scene ("true") and its variants that are false for the image.

    binding: the canonical caption of the scene with the two colours exchanged (objects keep their places);
    control: that of the scene with object `control_object` painted `control_color` (absent from it);
    relation, converse (only when the caption states a relation): its last sentence "The A is REL the B."
    as "The B is REL the A." and as "The A is CONVERSE(REL) the B.". No scene has the same places and the
    relation turned round, so these two are the one edit made on the text, word for word.
    """
    true = scenes.canonical_caption(objects, image_size)
    swapped = [{**o, "color": other["color"]} for o, other in zip(objects, objects[::-1], strict=True)]
    painted = [{**o, "color": control_color} if k == control_object else o for k, o in enumerate(objects)]
    out = {
        "true": true,
        "binding": scenes.canonical_caption(swapped, image_size),
        "control": scenes.canonical_caption(painted, image_size),
    }
    stated = [
        (a, relation, b)
        for a, b in permutations(objects, 2)
        for relation in scenes.RELATIONS
        if scenes.relation_holds(a, relation, b) and true.endswith(" " + _relation_sentence(a, relation, b))
    ]
    if stated:
        a, relation, b = stated[0]
        stem = true[: -len(_relation_sentence(a, relation, b))]
        out["relation"] = stem + _relation_sentence(b, relation, a)
        out["converse"] = stem + _relation_sentence(a, scenes.CONVERSE[relation], b)
    return out


def drawn_size(split: PackedSplit, rows: Sequence[int]) -> int:
    """An image size at which the scene records of `rows` re-render to their stored canonical captions.

    Places ("at the top left") depend on the size the scenes were drawn at, and a split may be packed at
    another one. The size found is the drawn one, or one that puts every object of `rows` in the same place.
    """
    records = _records(split, "drawn_size")
    corner = max((max(o["bbox"]) for i in rows for o in records[i]["objects"]), default=1)  # objects lie inside
    for size in (split.image_size, *range(max(16, math.ceil(corner)), 4097)):
        if all(scenes.canonical_caption(records[i]["objects"], size) == split.captions[i][0] for i in rows):
            return size
    raise ValueError(
        f"the scene records of {split.dir} do not re-render to its stored canonical captions at any image "
        "size; the records and captions do not belong together: generate the scenes again"
    )


def swaps(model: CLIP, tokenizer: Tokenizer, split: PackedSplit, limit: int | None = None) -> dict:
    """How often the true caption of a two-object scene beats each swapped one, among the first `limit` images.

    Scenes with exactly two objects of different colours and different shapes take part. A hit is
    sim(image, true) > sim(image, swapped), strictly: a model that cannot tell the two captions apart
    scores 0, not the chance level of 0.5 that a coin would.
    """
    records = _records(split, "swaps")[: _count(split, limit)]
    rows = [i for i, r in enumerate(records) if _two_distinct(r["objects"])]
    if not rows:
        raise ValueError(
            f"swaps needs scenes of two objects of different colours and shapes; the first {len(records)} "
            f"of {split.dir} have none"
        )
    size, colors = drawn_size(split, rows), vocabulary(split.scenes)["color"]
    pairs = [_variants(records[i], size, colors) for i in rows]
    texts = sorted({t for p in pairs for t in p.values()})
    index = {t: k for k, t in enumerate(texts)}
    sim = (embed_images(model, split.images[rows]) @ embed_texts(model, tokenizer, texts).T).numpy()  # (n, n_texts)
    result = {"task": "swaps", "n": len(rows), "chance": 0.5, "n_cut": count_cut(model, tokenizer, texts)}
    for kind in SWAPS:
        wins = [sim[r, index[p["true"]]] > sim[r, index[p[kind]]] for r, p in enumerate(pairs) if kind in p]
        result[kind] = {"accuracy": float(np.mean(wins)) if wins else math.nan, "n": len(wins)}
    result["example"] = pairs[0]
    return result


def _two_distinct(objects: list[dict]) -> bool:
    return len(objects) == 2 and all(objects[0][a] != objects[1][a] for a in ("color", "shape"))


def _variants(record: dict, image_size: int, colors: list[str]) -> dict[str, str]:
    """swapped_captions of a record, with a control colour and object drawn from its image id (reproducible)."""
    rng = random.Random(f"control-{record['image_id']}")
    present = {o["color"] for o in record["objects"]}
    absent = [c for c in colors if c not in present] or [c for c in scenes.COLORS if c not in present]
    return swapped_captions(record["objects"], image_size, rng.choice(absent), rng.randrange(2))


# ----------------------------------------------------------------------------- all tasks, and the report

TASKS = {"retrieval": retrieval, "zeroshot": zero_shot, "swaps": swaps}


def evaluate_clip(model: CLIP, tokenizer: Tokenizer, split: PackedSplit, limit: int | None = None) -> dict:
    """Every task above on one split: {"retrieval": ..., "zeroshot": ..., "swaps": ...}; retrieval alone on a split
    without scene records (COCO), since the other two read the exact objects of each image."""
    names = TASKS if split.scenes is not None else ("retrieval",)
    return {name: TASKS[name](model, tokenizer, split, limit=limit) for name in names}


def format_clip_report(summary: dict) -> str:
    """A readable table of a retrieval, zero_shot or swaps summary."""
    formats = {"retrieval": _retrieval_table, "zeroshot": _zero_shot_table, "swaps": _swaps_table}
    if summary.get("task") not in formats:
        raise ValueError(f"format_clip_report: summary of task {summary.get('task')!r}; pass one of {list(formats)}")
    return formats[summary["task"]](summary)


def _retrieval_table(s: dict) -> str:
    lines = [f"{'direction':<15}" + "".join(f"{key:>8}" for key in s["chance"])]
    for key in ("text_to_image", "image_to_text", "chance"):
        lines.append(f"{key.replace('_to_', ' -> '):<15}" + "".join(f"{v:>8.3f}" for v in s[key].values()))
    lines.append(
        f"{s['n']} images; {s['n_duplicate_captions']} share their canonical caption with another image, "
        "and any image with the query's caption counts as a hit"
    )
    return "\n".join(lines + _cut_note(s))


def _zero_shot_table(s: dict) -> str:
    lines = [f"{'attribute':<10}{'accuracy':>9}{'chance':>8}  classes"]
    for attr in ATTRIBUTES:
        a = s[attr]
        lines.append(f"{attr:<10}{a['accuracy']:>9.3f}{a['chance']:>8.3f}  {', '.join(a['classes'])}")
    lines.append(f"{s['n']} one-object images, {s['n_prompts']} prompts; confusion (rows: truth, columns: predicted):")
    for attr in ATTRIBUTES:
        width = max(map(len, s[attr]["classes"])) + 1
        lines.append(f"  {attr}")
        for name, row in zip(s[attr]["classes"], s[attr]["confusion"], strict=True):
            lines.append(f"    {name:<{width}}" + "".join(f"{v:>6d}" for v in row))
    return "\n".join(lines)


def _swaps_table(s: dict) -> str:
    lines = [f"{'swap':<10}{'accuracy':>9}{'n':>6}  what the false caption changes"]
    for kind, what in SWAPS.items():
        accuracy = "nan" if math.isnan(s[kind]["accuracy"]) else f"{s[kind]['accuracy']:.3f}"
        lines.append(f"{kind:<10}{accuracy:>9}{s[kind]['n']:>6d}  {what}")
    lines.append(f"{s['n']} two-object images; accuracy = true caption more similar than the false one (chance 0.5)")
    lines += [f"  {kind + ':':<10}{text}" for kind, text in s["example"].items()]
    return "\n".join(lines + _cut_note(s))


def _cut_note(s: dict) -> list[str]:
    if not s["n_cut"]:
        return []
    return [
        f"warning: {s['n_cut']} captions are longer than the text encoder's max_seq_len and were cut; "
        "what they say after the cut (a swapped relation sentence, say) is not read"
    ]
