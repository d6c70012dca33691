"""Data: read captions in the COCO layout, pack the images once into a uint8 array, serve batches.

One loader serves both datasets, because the scenes generator writes the same layout as COCO:

    ROOT/annotations/captions_{split}.json   {"images": [{"id", "file_name", ...}],
                                              "annotations": [{"id", "image_id", "caption"}]}
    ROOT/annotations/scenes_{split}.json     scenes only: ground-truth records of every image
    ROOT/annotations/*{split}_questions.json questions in the VQA v2 layout (vqa.py), optional, with
    ROOT/annotations/*{split}_annotations.json  their human answers
    ROOT/{split}/{file_name}                 the image files

Decoding JPEGs is far slower than training a tiny model on them, so `prepare` decodes every image once,
resizes it, and packs all of them into ROOT/prepared/{split}_{size}/images.npy (N, size, size, 3 uint8).
`PackedSplit` maps that file into memory; `loader.Loader` builds batches from it with numpy indexing alone.
"""

import contextlib
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from . import vqa
from .files import replace_dir

MIN_SIDE = 8  # pixels; smaller images carry nothing to caption (and 1x1 files are usually broken)
PAD_COLOR = (0, 0, 0)  # resize="pad" letterboxes with black bars
EXIF_ORIENTATION = 0x0112  # the EXIF tag a camera writes when the photo should be shown rotated
PACKED_FORMAT_VERSION = 2  # bump when the packed layout changes, so old prepared folders are rebuilt


def report(message: str) -> None:
    """A progress note for the person at the terminal: to stderr, so stdout stays for results.

    Every note of the data modules (this one and coco.py) goes out here; tqdm.write keeps progress bars intact.
    """
    tqdm.write(message, file=sys.stderr)


# ----------------------------------------------------------------------------- reading captions


def _read_json(path: Path, hint: str) -> Any:
    """Parse a JSON file; errors name the file and, for bad JSON, the line and column."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; {hint}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e}): it is damaged or in another encoding") from e
    if not text.strip():
        raise ValueError(f"{path} is empty: it was cut short or never written")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e.msg}: line {e.lineno}, column {e.colno}") from e


def _check_records(records: Any, keys: tuple[str, ...], path: Path, field: str) -> list[dict]:
    """Check that `records` is a list of dicts that all have `keys` with int/str ids."""
    if not isinstance(records, list):
        raise ValueError(f"{path}: '{field}' must be a list, got {type(records).__name__}")
    for i, record in enumerate(records):
        missing = [k for k in keys if not isinstance(record, dict) or k not in record]
        if missing:
            raise ValueError(f"{path}: {field}[{i}] lacks key(s) {missing}; every entry needs {list(keys)}")
        for k in keys:
            if k.endswith("id") and (isinstance(record[k], bool) or not isinstance(record[k], int | str)):
                raise ValueError(f"{path}: {field}[{i}]['{k}'] is {record[k]!r}; ids must be integers or strings")
    return records


def _first_duplicate(ids: list) -> Any:
    """The first id that occurs twice, or None."""
    seen = set()
    for i in ids:
        if i in seen:
            return i
        seen.add(i)
    return None


def read_captions(root: str | Path, split: str) -> tuple[list[dict], dict[Any, list[str]]]:
    """Images present on disk and their captions, from ROOT/annotations/captions_{split}.json.

    Captions are stripped of surrounding whitespace; empty ones are skipped (and counted). Long and
    non-ASCII captions are kept as they are (the Loader truncates tokens at max_len). Annotations whose
    image_id is not among the images are skipped with a warning: a user may have cut the image list
    down. Images missing on disk are left out with a report; only if none is there is it an error.
    """
    root = Path(root)
    path = root / "annotations" / f"captions_{split}.json"
    data = _read_json(path, "run `python -m nanovlm data …` first (or put the COCO annotations there)")
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise ValueError(f"{path}: expected an object with 'images' and 'annotations' lists (COCO layout)")
    images = _check_records(data["images"], ("id", "file_name"), path, "images")
    annotations = _check_records(data["annotations"], ("id", "image_id", "caption"), path, "annotations")
    unnamed = [im for im in images if not isinstance(im["file_name"], str)]
    if unnamed:
        image = unnamed[0]
        raise ValueError(f"{path}: image {image['id']!r} has file_name {image['file_name']!r}; names are text")
    for field, ids in (
        ("image", [im["id"] for im in images]),
        ("annotation", [a["id"] for a in annotations]),
    ):
        duplicate = _first_duplicate(ids)
        if duplicate is not None:
            raise ValueError(f"{path}: {field} id {duplicate!r} occurs more than once; ids must be unique")

    captions: dict[Any, list[str]] = {im["id"]: [] for im in images}
    empty, unknown = 0, []
    for a in annotations:
        if not isinstance(a["caption"], str):
            raise ValueError(f"{path}: annotation {a['id']!r} has caption {a['caption']!r}; captions are text")
        text = a["caption"].strip()
        if a["image_id"] not in captions:
            unknown.append(a["image_id"])
        elif not text:
            empty += 1
        else:
            captions[a["image_id"]].append(text)
    if empty:
        report(f"{path.name}: skipped {empty} empty caption(s)")
    if unknown:
        report(
            f"{path.name}: skipped {len(unknown)} annotation(s) whose image_id is not listed under "
            f"'images' (e.g. {unknown[0]!r})"
        )

    folder = root / split
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} not found; put the {split} images there")
    names = set(os.listdir(folder))
    present = [im for im in images if im["file_name"] in names or (folder / im["file_name"]).is_file()]
    if not present:
        raise FileNotFoundError(f"none of the {len(images)} images listed in {path} is under {folder}")
    if len(present) < len(images):
        report(f"{len(images) - len(present)} of {len(images)} images missing under {folder}, using the rest")
    return present, {im["id"]: captions[im["id"]] for im in present}


# ----------------------------------------------------------------------------- decoding images


class BadImageError(ValueError):
    """An image file that cannot be used; `reason` is a short category for summaries."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB: transparency onto white, 16-bit grey scaled (not clipped)."""
    if img.mode == "RGB":
        return img
    if img.mode == "I" or img.mode.startswith("I;16"):
        # PIL's own convert() clips 16-bit samples at 255, turning a photo white. "I" is what 16-bit
        # PNG/TIFF grey decodes to in some versions, so it is read as 0..65535 too.
        grey = np.clip(np.asarray(img, dtype=np.float64), 0, 65535) / 257.0
        return Image.fromarray(np.rint(grey).astype(np.uint8), "L").convert("RGB")
    if img.has_transparency_data:  # RGBA, LA, PA, or a palette/grey image with a transparent colour
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img.convert("RGBA")).convert("RGB")
    try:
        return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, ...
    except ValueError as e:
        raise BadImageError("unsupported mode", f"cannot convert image mode {img.mode} to RGB ({e})") from e


def load_image(path: str | Path, draft_size: int | None = None) -> Image.Image:
    """Open an image file as RGB; BadImageError says what is wrong with a missing/corrupt/tiny/huge file.

    draft_size lets JPEG decode at a reduced scale (1/2, 1/4, 1/8) that still covers draft_size pixels on
    both sides: much faster for the small sizes we train at. No EXIF rotation is applied: COCO's
    annotators saw the stored pixel orientation. A photo that asks for one (an EXIF orientation other than 1)
    says so in the returned image's info["exif_orientation"], so that prepare can count them.
    """
    path = Path(path)
    if not path.is_file():
        raise BadImageError("missing", f"image {path} {'is not a file' if path.exists() else 'does not exist'}")
    try:
        with warnings.catch_warnings():  # between MAX_IMAGE_PIXELS and twice that, PIL only warns
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImageError("too large", f"image {path} is too large to decode safely: {e}") from e
    except UnidentifiedImageError as e:
        raise BadImageError("not an image", f"{path} is not an image file that PIL can read") from e
    except OSError as e:
        raise BadImageError("unreadable", f"cannot read image {path}: {e}") from e
    with img:
        w, h = img.size
        if min(w, h) < MIN_SIDE:
            raise BadImageError("too small", f"image {path} is {w}x{h} pixels; need {MIN_SIDE}+ per side")
        if draft_size and img.format == "JPEG":
            img.draft("RGB", (draft_size, draft_size))
        try:
            img.load()
            orientation = img.getexif().get(EXIF_ORIENTATION, 1)
            rgb = to_rgb(img)
            if orientation != 1:
                rgb = rgb.copy() if rgb is img else rgb  # never mark the file's own image object
                rgb.info["exif_orientation"] = orientation
            return rgb
        except BadImageError:
            raise
        except Exception as e:  # damaged files surface as OSError, SyntaxError, ValueError, ... in PIL
            raise BadImageError("corrupt", f"image {path} is corrupt or truncated: {e}") from e


def resize_image(img: Image.Image, size: int, resize: str = "crop") -> np.ndarray:
    """Square (size, size, 3) uint8 array keeping aspect: centre crop ("crop") or letterbox ("pad")."""
    w, h = img.size
    bicubic = Image.Resampling.BICUBIC
    if resize not in ("crop", "pad"):
        raise ValueError(f"resize={resize!r}; use 'crop' (centre crop) or 'pad' (letterbox)")
    if (w, h) == (size, size):  # already the right size (the scenes): both ways would copy it unchanged
        return np.asarray(img, dtype=np.uint8)
    if resize == "crop":  # scale the shorter side to `size`, cut the middle of the longer one
        side = min(w, h)
        left, top = (w - side) / 2, (h - side) / 2
        out = img.resize((size, size), bicubic, box=(left, top, left + side, top + side), reducing_gap=3.0)
    else:  # "pad": scale the longer side to `size`, centre on PAD_COLOR
        scale = size / max(w, h)
        small = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), bicubic, reducing_gap=3.0)
        out = Image.new("RGB", (size, size), PAD_COLOR)
        out.paste(small, ((size - small.width) // 2, (size - small.height) // 2))
    return np.asarray(out, dtype=np.uint8)


def _decode_job(job: tuple[str, int, str]) -> tuple[np.ndarray | None, str, str]:
    """Worker: (pixels, "", "") for a good image, (pixels, "rotated", path) for a good one whose EXIF asks for
    a rotation it did not get, (None, reason, message) for a bad one."""
    path, size, resize = job
    try:
        img = load_image(path, draft_size=size)
        rotated = ("rotated", path) if "exif_orientation" in img.info else ("", "")
        return resize_image(img, size, resize), *rotated
    except BadImageError as e:
        return None, e.reason, str(e)


# ----------------------------------------------------------------------------- prepare: pack once


def _manifest(root: Path, split: str, images: list[dict], image_size: int, resize: str) -> dict:
    """What the prepared folder was made from: settings, annotation files and every image's size/mtime."""
    listing = hashlib.sha256()
    for im in images:
        st = (root / split / im["file_name"]).stat()
        listing.update(f"{im['file_name']}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    files = {}
    questions = [p.name for p in vqa.split_files(root, split) or () if p is not None]
    for name in (f"captions_{split}.json", f"scenes_{split}.json", *questions):
        p = root / "annotations" / name
        files[name] = [p.stat().st_size, p.stat().st_mtime_ns] if p.is_file() else None
    return {
        "format_version": PACKED_FORMAT_VERSION,
        "settings": {"split": split, "image_size": image_size, "resize": resize},
        "annotation_files": files,
        "images": {"count": len(images), "sha256_of_names_sizes_mtimes": listing.hexdigest()},
    }


def _decode_all(jobs: list[tuple[str, int, str]], workers: int, desc: str):
    """Yield _decode_job results in order, from a process pool when that is worth starting."""
    bar = tqdm(total=len(jobs), desc=desc, unit="img", disable=None)
    if workers <= 1 or len(jobs) < 64:
        results = map(_decode_job, jobs)
        pool = None
    else:
        pool = multiprocessing.Pool(workers)
        results = pool.imap(_decode_job, jobs, chunksize=16)
    try:
        for result in results:
            bar.update()
            yield result
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()


def _aligned_scenes(root: Path, split: str, image_ids: list) -> dict | None:
    """Scene records in packed order, or None without a scenes file."""
    path = root / "annotations" / f"scenes_{split}.json"
    if not path.is_file():
        return None
    data = _read_json(path, "")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected an object with a 'scenes' list")
    scenes = _check_records(data.get("scenes", []), ("image_id", "objects"), path, "scenes")
    by_id = {s["image_id"]: s for s in scenes}
    missing = [i for i in image_ids if i not in by_id]
    if missing:
        raise ValueError(f"{path} has no scene record for image id {missing[0]!r} ({len(missing)} missing)")
    return {"scenes": [by_id[i] for i in image_ids]}


def _write_packed(tmp: Path, results, n: int, size: int) -> tuple[list[int], dict[str, str]]:
    """Stream decoded images into tmp/images.npy; return the kept indices and {file: why} for the rest."""
    full = np.lib.format.open_memmap(tmp / "images.all.npy", mode="w+", dtype=np.uint8, shape=(n, size, size, 3))
    kept, bad, rotated = [], {}, []
    for i, (pixels, reason, message) in enumerate(results):
        if pixels is None:
            report(f"warning: skipped {message}")
            bad[message] = reason
            continue
        if reason == "rotated":
            rotated.append(message)
        full[len(kept)] = pixels
        kept.append(i)
    full.flush()
    if rotated:
        report(
            f"note: {len(rotated)} photo(s) carry an EXIF orientation and were packed as stored, unrotated (the "
            f"annotations describe the stored pixels), e.g. {rotated[0]}"
        )
    if len(kept) == n:
        del full
        os.replace(tmp / "images.all.npy", tmp / "images.npy")
        return kept, bad
    packed = np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np.uint8, shape=(len(kept), size, size, 3))
    for start in range(0, len(kept), 1024):  # copy in chunks: the array may not fit in memory
        stop = min(start + 1024, len(kept))
        packed[start:stop] = full[start:stop]
    packed.flush()
    del full, packed
    (tmp / "images.all.npy").unlink()
    return kept, bad


def read_questions(root: Path, split: str) -> tuple[list[dict] | None, list[str]]:
    """A split's questions in the VQA v2 layout, or those of a scenes file that still holds them; None if none.

    Each record gains "type", its question_type (the scenes' colour, shape, count, existence, relation).
    Also returns one message per question skipped (vqa.read_vqa says which and why).
    """
    files = vqa.split_files(root, split)
    if files is not None:
        records, skipped = vqa.read_vqa(*files)
        return [r | {"type": r["question_type"]} for r in records], skipped
    scenes_file = root / "annotations" / f"scenes_{split}.json"
    if scenes_file.is_file():  # the layout of datasets drawn before the scenes wrote VQA v2 files
        data = _read_json(scenes_file, "")
        if isinstance(data, dict) and "qa" in data:
            qa = _check_records(data["qa"], ("image_id", "question", "answer", "type"), scenes_file, "qa")
            return [q | {"question_type": q["type"]} for q in qa], []
    return None, []


def _images_and_captions(root: Path, split: str, qa: list[dict] | None) -> tuple[list[dict], dict[Any, list[str]]]:
    """read_captions; or, for a VQA dataset without a captions file, the images its questions ask about.

    Those are found by the id that ends their file names, as COCO names them.
    """
    if qa is None:  # prepare passes no questions when the split has a captions file
        return read_captions(root, split)
    asked = list(dict.fromkeys(q["image_id"] for q in qa))
    names = vqa.image_files(root / split, asked)
    if not names:
        raise FileNotFoundError(f"none of the {len(asked)} images the questions ask about is under {root / split}")
    if len(names) < len(asked):
        report(f"{len(asked) - len(names)} of {len(asked)} images asked about are missing under {root / split}")
    return [{"id": i, "file_name": names[i]} for i in asked if i in names], {i: [] for i in names}


def prepare(
    root: str | Path,
    split: str,
    image_size: int,
    resize: str = "crop",
    workers: int | None = None,
    max_bad_fraction: float = 0.05,
) -> Path:
    """Decode, resize (centre crop by default, or "pad") and pack a split into ROOT/prepared/{split}_{size}.

    Skips the work when the folder's manifest matches the current inputs and settings. The folder is
    built under a temporary name and renamed into place at the end, so an interrupted run leaves nothing
    that looks done. Bad image files are skipped with a warning naming each; more than max_bad_fraction
    of them is an error. Images without any caption are left out. Returns the prepared folder.
    """
    root = Path(root)
    if resize not in ("crop", "pad"):
        raise ValueError(f"resize={resize!r}; use 'crop' (centre crop) or 'pad' (letterbox)")
    if image_size < MIN_SIDE:
        raise ValueError(f"image_size={image_size} is too small; use at least {MIN_SIDE}")
    out = root / "prepared" / f"{split}_{image_size}"
    # with a captions file the questions are only read when there is packing to do: parsing them is most of
    # the time an up-to-date check would take
    captioned = (root / "annotations" / f"captions_{split}.json").is_file()
    qa, skipped_qa = (None, []) if captioned else read_questions(root, split)
    images, captions = _images_and_captions(root, split, qa)
    manifest = _manifest(root, split, images, image_size, resize)
    if _is_up_to_date(out, manifest):
        report(f"{out} is up to date")
        return out
    if captioned:
        qa, skipped_qa = read_questions(root, split)

    asked = {q["image_id"] for q in qa or ()}
    uncaptioned = [im for im in images if not captions[im["id"]] and im["id"] not in asked]
    images = [im for im in images if captions[im["id"]] or im["id"] in asked]
    if not images:
        raise ValueError(
            f"no image of {root / split} has a caption or a question; check {root}/annotations/captions_{split}.json"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.*"):  # left by an interrupted run
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        jobs = [(str(root / split / im["file_name"]), image_size, resize) for im in images]
        workers = min(8, os.cpu_count() or 1) if workers is None else workers
        with contextlib.closing(_decode_all(jobs, workers, desc=f"prepare {split} {image_size}px")) as results:
            kept, bad = _write_packed(tmp, results, len(jobs), image_size)
        if len(bad) > max_bad_fraction * len(jobs):
            listing = "\n  ".join(list(bad)[:20]) + ("\n  ..." if len(bad) > 20 else "")
            raise ValueError(
                f"{len(bad)} of {len(jobs)} images of {root / split} could not be used "
                f"(more than {max_bad_fraction:.0%}); fix or remove them:\n  {listing}"
            )
        kept_images = [images[i] for i in kept]
        ids = [im["id"] for im in kept_images]
        index = {
            "image_ids": ids,
            "file_names": [im["file_name"] for im in kept_images],
            "captions": [captions[i] for i in ids],
        }
        (tmp / "captions.json").write_text(json.dumps(index, ensure_ascii=False))
        scenes = _aligned_scenes(root, split, ids)
        if scenes is not None:
            (tmp / "scenes.json").write_text(json.dumps(scenes, ensure_ascii=False))
        if qa is not None:
            packed = set(ids)
            unseen = [q for q in qa if q["image_id"] not in packed]
            for q in unseen:
                skipped_qa.append(
                    f"question {q.get('question_id', q['question'])!r}: its image {q['image_id']!r} is not packed "
                    f"from {root / split}"
                )
            (tmp / "questions.json").write_text(
                json.dumps([q for q in qa if q["image_id"] in packed], ensure_ascii=False)
            )
        for message in skipped_qa[:5]:
            report(f"skipped {message}")
        if len(skipped_qa) > 5:
            report(f"... {len(skipped_qa) - 5} more questions skipped; all are listed in {out / 'manifest.json'}")
        reasons = Counter(bad.values()) + Counter({"no caption": len(uncaptioned), "question": len(skipped_qa)})
        manifest["result"] = {
            "prepared": len(kept),
            "skipped": dict(bad),
            "no_caption": len(uncaptioned),
            "skipped_questions": skipped_qa,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False))
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    why = ", ".join(f"{reason}: {n}" for reason, n in sorted(reasons.items()))
    report(f"prepared {len(kept)} images into {out}, skipped {sum(reasons.values())}" + (f" ({why})" if why else ""))
    return out


def _is_up_to_date(out: Path, manifest: dict) -> bool:
    """Whether out holds a whole packing made from these inputs and settings; ValueError names a damaged file."""
    path = out / "manifest.json"
    if not path.is_file():
        return False
    repack = f"delete {out} to pack it again"
    try:
        stored = _read_json(path, "")
    except ValueError as e:
        raise ValueError(f"{e}; {repack}") from e
    if not isinstance(stored, dict):
        raise ValueError(f"{path} holds a JSON {type(stored).__name__}, not prepare()'s manifest object; {repack}")
    if {k: v for k, v in stored.items() if k != "result"} != manifest:
        return False
    result = stored.get("result")
    if not isinstance(result, dict) or not isinstance(result.get("prepared"), int):
        raise ValueError(f"{path} lacks the count of images packed ('result': {{'prepared': N}}); {repack}")
    split = PackedSplit(out)  # checks images.npy and the index files against each other
    size = manifest["settings"]["image_size"]
    if (len(split), split.image_size) != (result["prepared"], size):
        raise ValueError(
            f"{out / 'images.npy'} holds {len(split)} images of {split.image_size}px but {path} says "
            f"{result['prepared']} of {size}px; {repack}"
        )
    return True


# ----------------------------------------------------------------------------- the packed split


class PackedSplit:
    """A prepared folder: images (N, H, W, 3) uint8 memory-mapped, with ids, captions and scenes."""

    def __init__(self, prepared_dir: str | Path):
        self.dir = Path(prepared_dir)
        needed = [self.dir / "images.npy", self.dir / "captions.json"]
        missing = [p.name for p in needed if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"prepared data {self.dir} is missing or incomplete (no {', '.join(missing)}); "
                "run `python -m nanovlm data …` first"
            )
        captions, scenes_path = self.dir / "captions.json", self.dir / "scenes.json"
        try:  # each file is checked against the others, so a damaged one fails here, by name
            index = _check_index(_read_json(captions, ""), captions)
            self.images = _open_images(self.dir / "images.npy", len(index["image_ids"]))  # (N, H, W, 3) uint8
            scenes = _check_scenes(_read_json(scenes_path, ""), scenes_path, index) if scenes_path.is_file() else None
        except ValueError as e:
            raise ValueError(f"{e}; delete {self.dir} to pack it again") from e
        self.image_ids: list = index["image_ids"]
        self.file_names: list[str] = index["file_names"]
        self.captions: list[list[str]] = index["captions"]
        self.scenes: list[dict] | None = scenes["scenes"] if scenes else None
        questions = self.dir / "questions.json"
        self.qa: list[dict] | None = None  # question/answer records (data.read_questions), None if none
        if questions.is_file():
            try:
                self.qa = _check_questions(_read_json(questions, ""), questions, index)
            except ValueError as e:
                raise ValueError(f"{e}; delete {self.dir} to pack it again") from e
        self.row_of_id = {image_id: row for row, image_id in enumerate(self.image_ids)}

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def image_size(self) -> int:
        return self.images.shape[1]


def _check_index(index: Any, path: Path) -> dict:
    """A prepared captions.json: equally long lists of unique ids, file names and lists of captions."""
    keys = ("image_ids", "file_names", "captions")
    if not isinstance(index, dict) or not all(isinstance(index.get(k), list) for k in keys):
        raise ValueError(f"{path} is not a packed index: expected an object with lists {list(keys)}")
    lengths = [len(index[k]) for k in keys]
    if len(set(lengths)) > 1:
        raise ValueError(f"{path} has {lengths} entries in {list(keys)}; they must be equally long")
    if not all(isinstance(i, int | str) and not isinstance(i, bool) for i in index["image_ids"]):
        raise ValueError(f"{path}: 'image_ids' must be integers or strings")
    duplicate = _first_duplicate(index["image_ids"])
    if duplicate is not None:
        raise ValueError(f"{path}: image id {duplicate!r} occurs more than once")
    if not all(isinstance(caps, list) and all(isinstance(c, str) for c in caps) for caps in index["captions"]):
        raise ValueError(f"{path}: every entry of 'captions' must be a list of texts")
    return index


def _open_images(path: Path, count: int) -> np.ndarray:
    """Map a prepared images.npy into memory, checking it holds `count` square uint8 RGB images."""
    with open(path, "rb") as f:
        magic = f.read(len(np.lib.format.MAGIC_PREFIX))
    if magic != np.lib.format.MAGIC_PREFIX:
        raise ValueError(f"{path} is not a .npy array file (it does not start with numpy's header)")
    try:
        images = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, EOFError) as e:  # a header or pixels cut short, or objects instead of numbers
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{path} is cut short or damaged ({reason})") from e
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3 or images.shape[1] != images.shape[2]:
        raise ValueError(f"{path} holds {images.dtype} {images.shape}, not (N, H, H, 3) uint8 pixels")
    if len(images) != count:
        raise ValueError(f"{path} holds {len(images)} images but captions.json lists {count}")
    return images


def _check_scenes(scenes: Any, path: Path, index: dict) -> dict:
    """A prepared scenes.json: one scene record per packed image, in order."""
    if not isinstance(scenes, dict):
        raise ValueError(f"{path}: expected an object with a 'scenes' list")
    records = _check_records(scenes.get("scenes"), ("image_id", "objects"), path, "scenes")
    if [s["image_id"] for s in records] != index["image_ids"]:
        raise ValueError(f"{path} does not hold one scene per packed image, in the order of captions.json")
    return scenes


def _check_questions(qa: Any, path: Path, index: dict) -> list[dict]:
    """A prepared questions.json: question/answer records about packed images."""
    qa = _check_records(qa, ("image_id", "question", "answer"), path, "questions")
    known = set(index["image_ids"])
    stray = [q["image_id"] for q in qa if q["image_id"] not in known]
    if stray:
        raise ValueError(f"{path} has questions about image {stray[0]!r}, which is not packed")
    return qa


# ----------------------------------------------------------------------------- batches


def to_tensor(pixels: np.ndarray, device: str | torch.device = "cpu") -> torch.Tensor:
    """(N, H, W, 3) uint8 images -> (N, 3, H, W) float in [0, 1] on device, as the model reads them.

    The pixels are copied first (prepared images are a read-only memory map), moved as uint8 (a quarter of
    the bytes of float32) and converted on the device.
    """
    return torch.from_numpy(np.array(pixels)).to(device).permute(0, 3, 1, 2).float().div(255.0)
