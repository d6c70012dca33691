"""`generate`: the splits written to disk as PNG images, captions in the COCO captions layout, scene records,
questions in the VQA v2 layout (vqa.py), and a `done` marker that says which config and format version drew
them."""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.pool
import os
import random
from contextlib import nullcontext
from dataclasses import asdict
from functools import partial
from pathlib import Path

from tqdm import tqdm

from .. import vqa
from ..files import write_file_atomically
from .config import SceneConfig, check_config
from .drawing import png_bytes, render
from .language import captions
from .layout import sample_scene
from .qa import questions

SPLITS = ("train", "val", "test", "novel")  # image ids run on across the splits in this order
SCENES_FORMAT_VERSION = 4  # bump when the output for a given config changes, so old datasets are regenerated


def split_sizes(cfg: SceneConfig) -> dict[str, int]:
    """Images per split, in the order their image ids are assigned."""
    return {"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test, "novel": cfg.n_novel}


def first_id(cfg: SceneConfig, split: str) -> int:
    """The image id of a split's first image: ids run on across splits, so no two images share one."""
    sizes = split_sizes(cfg)
    return sum(sizes[s] for s in SPLITS[: SPLITS.index(split)])


def make_example(cfg: SceneConfig, split: str, image_id: int) -> tuple[dict, list[str], list[dict]]:
    """One image's scene record, captions and questions; it depends only on (seed, image_id)."""
    rng = random.Random(f"{cfg.seed}-{image_id}")
    scene = sample_scene(rng, cfg, image_id, novel=split == "novel")
    qa = [{"image_id": image_id, **q} for q in questions(scene, rng, cfg)]
    return scene, captions(scene, rng, cfg.image_size, cfg.captions_per_image), qa


def build_split(cfg: SceneConfig, split: str) -> tuple[list[dict], list[list[str]], list[dict]]:
    """Scene records, their captions and their questions for one split (no pixels)."""
    start = first_id(cfg, split)
    examples = [make_example(cfg, split, i) for i in range(start, start + split_sizes(cfg)[split])]
    return [e[0] for e in examples], [e[1] for e in examples], [q for e in examples for q in e[2]]


def generate(
    root: str | Path, cfg: SceneConfig | None = None, progress: bool = True, workers: int | None = None
) -> Path:
    """Write the scenes dataset under root (skipped when a finished one with this config is there).

    workers: processes that draw images (default: the CPU count, at most 8); 1 draws in this process.
    """
    cfg = cfg or SceneConfig()
    root = Path(root)
    marker = root / "done"
    stamp = json.dumps({"version": SCENES_FORMAT_VERSION, "config": asdict(cfg)}, sort_keys=True)
    if marker.exists() and marker.read_text() == stamp:
        return root
    check_config(cfg)
    marker.unlink(missing_ok=True)
    for tokenizer in root.glob("tokenizer-*.tiktoken"):  # trained on the captions about to be replaced
        tokenizer.unlink()
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    workers = workers or min(os.cpu_count() or 1, 8)
    bar = tqdm(total=sum(split_sizes(cfg).values()), desc="scenes", unit="img", disable=not progress)
    # images are independent (each has its own seed), so worker processes give the very same bytes
    with multiprocessing.Pool(workers) if workers > 1 else nullcontext() as pool:
        for split in SPLITS:
            _clear_split(root, split)
            if split_sizes(cfg)[split]:
                _write_split(root, cfg, split, pool, bar)
    bar.close()
    write_file_atomically(marker, stamp)  # last: an interrupted run leaves no marker and is redone
    return root


def _clear_split(root: Path, split: str) -> None:
    """Remove what an earlier (maybe interrupted or differently configured) run wrote for a split."""
    for png in (root / split).glob("[0-9][0-9][0-9][0-9][0-9][0-9].png"):
        png.unlink()
    for name in (f"captions_{split}.json", f"scenes_{split}.json", *vqa_files(split)):
        (root / "annotations" / name).unlink(missing_ok=True)


def vqa_files(split: str) -> tuple[str, str]:
    """Names of a split's questions and annotations files, in the VQA v2 layout."""
    return f"vqa_{split}_questions.json", f"vqa_{split}_annotations.json"


def vqa_records(qa: list[dict]) -> list[dict]:
    """Scene questions as VQA v2 records. The one exact answer stands in for all ten human answers, so the
    official VQA accuracy of an answer is 1 when it is that answer and 0 otherwise."""
    records, asked = [], {}
    for q in qa:
        k = asked[q["image_id"]] = asked.get(q["image_id"], -1) + 1
        kind = "yes/no" if q["answer"] in ("yes", "no") else "number" if q["type"] == "count" else "other"
        records.append(
            {
                "question_id": q["image_id"] * 10 + k,  # an image has at most six questions
                "image_id": q["image_id"],
                "question": q["question"],
                "answers": [q["answer"]] * 10,
                "answer": q["answer"],
                "answer_type": kind,
                "question_type": q["type"],
            }
        )
    return records


def _write_example(cfg: SceneConfig, split: str, folder: Path, image_id: int) -> tuple[dict, list[str], list[dict]]:
    """make_example, plus the image written to folder/{image_id:06d}.png."""
    scene, texts, qa = make_example(cfg, split, image_id)
    (folder / f"{image_id:06d}.png").write_bytes(png_bytes(render(scene, cfg)))
    return scene, texts, qa


def _write_split(root: Path, cfg: SceneConfig, split: str, pool: multiprocessing.pool.Pool | None, bar: tqdm) -> None:
    (root / split).mkdir(exist_ok=True)
    ids = range(first_id(cfg, split), first_id(cfg, split) + split_sizes(cfg)[split])
    work = partial(_write_example, cfg, split, root / split)
    scenes, images, annotations, qa = [], [], [], []
    for scene, texts, asked in pool.imap(work, ids, chunksize=64) if pool else map(work, ids):
        image_id = scene["image_id"]
        scenes.append(scene)
        qa += asked
        size = cfg.image_size
        images.append({"id": image_id, "file_name": f"{image_id:06d}.png", "width": size, "height": size})
        annotations += [
            {"id": image_id * cfg.captions_per_image + k, "image_id": image_id, "caption": c}
            for k, c in enumerate(texts)
        ]
        bar.update()
    coco = {"info": {"description": f"nanovlm scenes, split {split}"}, "licenses": [], "images": images}
    folder = root / "annotations"
    write_file_atomically(folder / f"captions_{split}.json", json.dumps({**coco, "annotations": annotations}))
    write_file_atomically(folder / f"scenes_{split}.json", json.dumps({"scenes": scenes}))
    vqa.write_vqa(vqa_records(qa), *(folder / name for name in vqa_files(split)))
