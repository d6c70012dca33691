"""Scenes: the embedded default dataset, rendered shapes with exact ground truth.

Every image is drawn from a scene record (shape, colour, size and box of each object), so its captions,
its questions and the checks on a model's captions are all exact, and nothing has to be downloaded.
Each part reads alone, in the order the data is made:

- `config.py`: the colours, sizes and shapes a scene may hold, and `SceneConfig`;
- `layout.py`: sampling a scene record (which objects, and where) and the one relation rule;
- `drawing.py`: a record drawn as pixels, and the PNG encoder;
- `language.py`: the caption grammar, and the parser that reads a caption back into objects;
- `qa.py`: question/answer pairs about a scene;
- `dataset.py`: `generate`, which writes the splits to disk in the COCO captions layout.

Use it through the package: `from nanovlm import scenes; scenes.generate(root, scenes.SceneConfig())`.
"""

from .config import ASPECT, COLORS, SHAPES, SIZES, SceneConfig, check_config
from .dataset import SCENES_FORMAT_VERSION, SPLITS, build_split, first_id, generate, make_example, split_sizes
from .drawing import SUPERSAMPLE, outline, png_bytes, render, to_image
from .language import (
    DESCRIPTIONS,
    NUMBER_WORDS,
    RELATION_WORDS,
    SHAPE_WORDS,
    SIZE_WORDS,
    WHERE,
    canonical_caption,
    captions,
    parse_caption,
    where,
)
from .layout import CONVERSE, RELATION_MARGIN, RELATIONS, box_iou, relation_holds, relation_pairs, sample_scene
from .qa import questions

__all__ = [
    "ASPECT",
    "COLORS",
    "CONVERSE",
    "DESCRIPTIONS",
    "NUMBER_WORDS",
    "RELATIONS",
    "RELATION_MARGIN",
    "RELATION_WORDS",
    "SCENES_FORMAT_VERSION",
    "SHAPES",
    "SHAPE_WORDS",
    "SIZES",
    "SIZE_WORDS",
    "SPLITS",
    "SUPERSAMPLE",
    "WHERE",
    "SceneConfig",
    "box_iou",
    "build_split",
    "canonical_caption",
    "captions",
    "check_config",
    "first_id",
    "generate",
    "make_example",
    "outline",
    "parse_caption",
    "png_bytes",
    "questions",
    "relation_holds",
    "relation_pairs",
    "render",
    "sample_scene",
    "split_sizes",
    "to_image",
    "where",
]
