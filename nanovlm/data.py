"""Data: read captions in the COCO layout, pack the images once into a uint8 array, serve batches.

One loader serves both datasets, because the scenes generator writes the same layout as COCO:

    ROOT/annotations/captions_{split}.json   {"images": [{"id", "file_name", ...}],
                                              "annotations": [{"id", "image_id", "caption"}]}
    ROOT/annotations/scenes_{split}.json     scenes only: ground-truth records and question/answer pairs
    ROOT/{split}/{file_name}                 the image files

Decoding JPEGs is far slower than training a tiny model on them, so `prepare` decodes every image once,
resizes it, and packs all of them into ROOT/prepared/{split}_{size}/images.npy (N, size, size, 3 uint8).
`PackedSplit` maps that file into memory and `Loader` builds batches from it with numpy indexing alone.
"""

import contextlib
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from .files import replace_dir

MIN_SIDE = 8  # pixels; smaller images carry nothing to caption (and 1x1 files are usually broken)
PAD_COLOR = (0, 0, 0)  # resize="pad" letterboxes with black bars
PACKED_FORMAT_VERSION = 1  # bump when the packed layout changes, so old prepared folders are rebuilt
TASKS = ("caption", "qa", "text")


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
    annotators saw the stored pixel orientation.
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
            return to_rgb(img)
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
    """Worker: (pixels, "", "") for a good image, (None, reason, message) for a bad one."""
    path, size, resize = job
    try:
        return resize_image(load_image(path, draft_size=size), size, resize), "", ""
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
    for name in (f"captions_{split}.json", f"scenes_{split}.json"):
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
    """Scene records in packed order and the QA pairs of packed images, or None without a scenes file."""
    path = root / "annotations" / f"scenes_{split}.json"
    if not path.is_file():
        return None
    data = _read_json(path, "")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected an object with 'scenes' and 'qa' lists")
    scenes = _check_records(data.get("scenes", []), ("image_id", "objects"), path, "scenes")
    qa = _check_records(data.get("qa", []), ("image_id", "question", "answer"), path, "qa")
    by_id = {s["image_id"]: s for s in scenes}
    missing = [i for i in image_ids if i not in by_id]
    if missing:
        raise ValueError(f"{path} has no scene record for image id {missing[0]!r} ({len(missing)} missing)")
    kept = set(image_ids)
    return {"scenes": [by_id[i] for i in image_ids], "qa": [q for q in qa if q["image_id"] in kept]}


def _write_packed(tmp: Path, results, n: int, size: int) -> tuple[list[int], dict[str, str]]:
    """Stream decoded images into tmp/images.npy; return the kept indices and {file: why} for the rest."""
    full = np.lib.format.open_memmap(tmp / "images.all.npy", mode="w+", dtype=np.uint8, shape=(n, size, size, 3))
    kept, bad = [], {}
    for i, (pixels, reason, message) in enumerate(results):
        if pixels is None:
            report(f"warning: skipped {message}")
            bad[message] = reason
            continue
        full[len(kept)] = pixels
        kept.append(i)
    full.flush()
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
    images, captions = read_captions(root, split)
    manifest = _manifest(root, split, images, image_size, resize)
    if _is_up_to_date(out, manifest):
        report(f"{out} is up to date")
        return out

    uncaptioned = [im for im in images if not captions[im["id"]]]
    images = [im for im in images if captions[im["id"]]]
    if not images:
        raise ValueError(f"no image of {root / split} has a caption; check {root}/annotations/captions_{split}.json")
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
        reasons = Counter(bad.values()) + Counter({"no caption": len(uncaptioned)})
        manifest["result"] = {"prepared": len(kept), "skipped": dict(bad), "no_caption": len(uncaptioned)}
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
        self.qa: list[dict] | None = scenes["qa"] if scenes else None
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
    """A prepared scenes.json: one scene record per packed image, in order, and QA pairs of those images."""
    if not isinstance(scenes, dict):
        raise ValueError(f"{path}: expected an object with 'scenes' and 'qa' lists")
    records = _check_records(scenes.get("scenes"), ("image_id", "objects"), path, "scenes")
    qa = _check_records(scenes.get("qa"), ("image_id", "question", "answer"), path, "qa")
    if [s["image_id"] for s in records] != index["image_ids"]:
        raise ValueError(f"{path} does not hold one scene per packed image, in the order of captions.json")
    known = set(index["image_ids"])
    stray = [q["image_id"] for q in qa if q["image_id"] not in known]
    if stray:
        raise ValueError(f"{path} has questions about image {stray[0]!r}, which is not packed")
    return scenes


# ----------------------------------------------------------------------------- batches


def to_tensor(pixels: np.ndarray, device: str | torch.device = "cpu") -> torch.Tensor:
    """(N, H, W, 3) uint8 images -> (N, 3, H, W) float in [0, 1] on device, as the model reads them.

    The pixels are copied first (prepared images are a read-only memory map), moved as uint8 (a quarter of
    the bytes of float32) and converted on the device.
    """
    return torch.from_numpy(np.array(pixels)).to(device).permute(0, 3, 1, 2).float().div(255.0)


def _pack_tokens(seqs: list[list[int]], width: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Sequences cut to `width` in a (n, width) table padded with `pad`, and their kept lengths."""
    table = np.full((len(seqs), width), pad, dtype=np.int32)
    lengths = np.empty(len(seqs), dtype=np.int64)
    for row, seq in enumerate(seqs):
        seq = seq[:width]
        table[row, : len(seq)] = seq
        lengths[row] = len(seq)
    return table, lengths


class Loader:
    """Deterministic, resumable batches from a PackedSplit, forever (epoch after epoch).

    An item is an image ("caption": one of its captions drawn at random, anew each epoch), a caption
    ("text": every caption once per epoch; the batch carries its image too, which the model ignores),
    or a question/answer pair ("qa"). Epoch e visits the items in the order of a permutation drawn from
    np.random.default_rng((seed, e)); the stream of all epochs is cut into global batches of
    batch_size * world_size items that run across epoch boundaries (nothing is dropped), and rank r
    gets the r-th slice. Batch k is therefore a pure function of (seed, k).

    Token layout: the sequence is <|image|> caption <|endoftext|> (or <|image|><|user|> question
    <|assistant|> answer <|endoftext|>); input_ids are its first T tokens, targets the next T, with -100
    on padding and on the question part. first_caption_prob, if set, is the chance of drawing caption 0
    (scenes put the canonical caption first); the others share the rest evenly.
    """

    def __init__(
        self,
        split: PackedSplit,
        tokenizer,
        batch_size: int,
        max_len: int,
        task: str = "caption",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        first_caption_prob: float | None = None,
    ):
        if task not in TASKS:
            raise ValueError(f"task={task!r}; use one of {TASKS}")
        if not 0 <= rank < world_size or batch_size < 1 or max_len < 2:
            raise ValueError(
                f"need 0 <= rank < world_size, batch_size >= 1, max_len >= 2 (got rank={rank}, "
                f"world_size={world_size}, batch_size={batch_size}, max_len={max_len})"
            )
        if first_caption_prob is not None and not 0.0 <= first_caption_prob <= 1.0:
            raise ValueError(f"first_caption_prob={first_caption_prob} must be in [0, 1] (or None: uniform)")
        self.split, self.task, self.seed = split, task, seed
        self.batch_size, self.max_len, self.rank, self.world_size = batch_size, max_len, rank, world_size
        self.first_caption_prob = first_caption_prob
        self.step = 0
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        if task == "qa":
            self._tokenize_qa(tokenizer)
        else:
            self._tokenize_captions(tokenizer)
        self.n_items = len(self.item_rows)
        if self.n_items == 0:
            raise ValueError(f"{split.dir} has nothing to load for task={task!r}")

    def _tokenize_captions(self, tok) -> None:
        """One token row per caption: <|image|> caption <|endoftext|>."""
        counts = np.array([len(c) for c in self.split.captions], dtype=np.int64)
        if (counts == 0).any():
            raise ValueError(f"{self.split.dir}: image {self.split.image_ids[int(np.argmin(counts))]!r} has no caption")
        flat = [c for caps in self.split.captions for c in caps]
        seqs = [[tok.image, *ids, tok.eot] for ids in tok.encode_batch(flat)]
        self.tokens, self.lengths = _pack_tokens(seqs, self.max_len + 1, tok.eot)
        self.prompt_lengths = np.ones(len(seqs), dtype=np.int64)  # just <|image|>
        self.first_caption = np.cumsum(counts) - counts  # token row of each image's caption 0
        self.caption_counts = counts
        if self.task == "caption":  # items are images; their caption is drawn per epoch
            self.item_rows = np.arange(len(counts))
        else:  # items are captions
            self.item_rows = np.repeat(np.arange(len(counts)), counts)

    def _tokenize_qa(self, tok) -> None:
        """One token row per QA pair: <|image|><|user|> question <|assistant|> answer <|endoftext|>."""
        qa = self.split.qa
        if not qa:
            raise ValueError(f"{self.split.dir} has no question/answer pairs (scenes_*.json); use task='caption'")
        questions = tok.encode_batch([q["question"] for q in qa])
        answers = tok.encode_batch([str(q["answer"]) for q in qa])
        seqs = [[tok.image, tok.user, *q, tok.assistant, *a, tok.eot] for q, a in zip(questions, answers, strict=True)]
        self.tokens, self.lengths = _pack_tokens(seqs, self.max_len + 1, tok.eot)
        self.prompt_lengths = np.array([3 + len(q) for q in questions], dtype=np.int64)
        self.item_rows = np.array([self.split.row_of_id[q["image_id"]] for q in qa], dtype=np.int64)

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(order of items, token row of each item) for one epoch; the last two epochs are cached."""
        if epoch not in self._epochs:
            rng = np.random.default_rng((self.seed, epoch))
            order = rng.permutation(self.n_items)
            if self.task == "caption":
                self._epochs[epoch] = (
                    order,
                    self.first_caption + self._draw_captions(rng.random(self.n_items)),
                )
            else:
                self._epochs[epoch] = (order, np.arange(self.n_items))
            if len(self._epochs) > 2:  # forget the epoch computed longest ago
                del self._epochs[next(iter(self._epochs))]
        return self._epochs[epoch]

    def _draw_captions(self, u: np.ndarray) -> np.ndarray:
        """Caption index per image from uniforms u in [0, 1): uniform, or 0 with first_caption_prob."""
        n = self.caption_counts
        p = self.first_caption_prob
        if p is None:
            return np.minimum((u * n).astype(np.int64), n - 1)
        if p >= 1.0:
            return np.zeros_like(n)
        rest = 1 + ((u - p) / (1 - p) * (n - 1)).astype(np.int64)  # uniform over captions 1..n-1
        return np.where((u < p) | (n == 1), 0, np.minimum(rest, n - 1))

    def batch(self, k: int) -> dict[str, torch.Tensor]:
        """This rank's slice of global batch k."""
        start = k * self.batch_size * self.world_size + self.rank * self.batch_size
        epochs, offsets = np.divmod(np.arange(start, start + self.batch_size), self.n_items)
        token_rows = np.empty(self.batch_size, dtype=np.int64)
        image_rows = np.empty(self.batch_size, dtype=np.int64)
        for epoch in np.unique(epochs):
            order, rows = self._epoch(int(epoch))
            here = epochs == epoch
            items = order[offsets[here]]
            token_rows[here], image_rows[here] = rows[items], self.item_rows[items]

        seq = self.tokens[token_rows].astype(np.int64)  # (B, T+1)
        positions = np.arange(self.max_len)  # target position t predicts seq[t + 1]
        targets = seq[:, 1:].copy()  # (B, T)
        length, prompt = self.lengths[token_rows, None], self.prompt_lengths[token_rows, None]  # (B, 1)
        targets[(positions >= length - 1) | (positions < prompt - 1)] = -100  # padding | question part
        pixels = self.split.images[image_rows]  # (B, H, W, 3) uint8, read from the memory map
        # to_tensor's conversion, written in numpy because every training step waits on it: numpy transposes
        # and casts in one pass into a contiguous array, then divides in place, where torch takes separate passes
        images = np.ascontiguousarray(pixels.transpose(0, 3, 1, 2), dtype=np.float32)  # (B, 3, H, W)
        images /= 255.0
        return {
            "images": torch.from_numpy(images),  # (B, 3, H, W) in [0, 1]
            "input_ids": torch.from_numpy(np.ascontiguousarray(seq[:, :-1])),  # (B, T)
            "targets": torch.from_numpy(targets),  # (B, T)
        }

    def __iter__(self):
        while True:
            batch = self.batch(self.step)
            self.step += 1  # counted before yielding, so state_dict() taken after a batch resumes after it
            yield batch

    def state_dict(self) -> dict:
        """Where the stream is, plus what must match for a resume to continue the same stream."""
        return {
            "step": self.step,
            "seed": self.seed,
            "task": self.task,
            "n_items": self.n_items,
            "global_batch_size": self.batch_size * self.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue at batch state["step"] of the same stream; refuse if the stream would differ."""
        for key, value in self.state_dict().items():
            if key != "step" and state.get(key) != value:
                raise ValueError(
                    f"loader state has {key}={state.get(key)!r} but this loader has {value!r}; "
                    "resuming would not continue the same batches"
                )
        self.step = int(state["step"])


def loader_benchmark(
    split: PackedSplit,
    tokenizer,
    batch_size: int = 128,
    max_len: int = 32,
    task: str = "caption",
    batches: int = 50,
) -> float:
    """Samples per second of Loader iteration on a prepared split (tokenizing once is not counted)."""
    loader = Loader(split, tokenizer, batch_size, max_len, task=task)
    stream = iter(loader)
    next(stream)  # warm-up: first epoch permutation, first pages of the memory map
    start = time.perf_counter()
    for _ in range(batches):
        next(stream)
    return batches * batch_size / (time.perf_counter() - start)
