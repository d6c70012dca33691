"""COCO captions 2017: download the official zips (resumable, verified) and unzip them into ROOT.

After `fetch(root, parts=("val2017", "annotations"))` ROOT holds the official layout, which data.py reads:

    ROOT/annotations/captions_train2017.json, captions_val2017.json   (5 captions per image, CC BY 4.0)
    ROOT/train2017/000000xxxxxx.jpg, ROOT/val2017/...                  (each image under its Flickr license)

then `data.prepare(root, "val2017", image_size)` packs a split for training. Only urllib is used, so
this works wherever Python does; without internet, download the zips by hand into ROOT and re-run.
"""

import hashlib
import http.client
import json
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from tqdm import tqdm

from .data import report
from .files import write_file_atomically


@dataclass(frozen=True)
class Archive:
    """One downloadable zip and the paths (relative to ROOT) that exist once it is unpacked."""

    url: str
    size: int | None  # bytes; None: trust the server's Content-Length
    sha256: str | None  # None: rely on the size and the zip's own CRC-32 checks while unpacking
    contents: tuple[str, ...]


# COCO publishes no checksums. These sizes and SHA-256 digests are the ones that several independent
# projects recorded for the official files; the server's Content-Length agrees with the sizes.
ARCHIVES = {
    "train2017": Archive(
        "http://images.cocodataset.org/zips/train2017.zip",
        19_336_861_798,
        "69a8bb58ea5f8f99d24875f21416de2e9ded3178e903f1f7603e283b9e06d929",
        ("train2017",),
    ),
    "val2017": Archive(
        "http://images.cocodataset.org/zips/val2017.zip",
        815_585_330,
        "4f7e2ccb2866ec5041993c9cf2a952bbed69647b115d0f74da7ce8f4bef82f05",
        ("val2017",),
    ),
    "annotations": Archive(
        "http://images.cocodataset.org/annotations/annotations_trainval2017.zip",
        252_907_541,
        "113a836d90195ee1f884e704da6304dfaaecff1f023f49b6ca93c4aaae470268",
        ("annotations/captions_train2017.json", "annotations/captions_val2017.json"),
    ),
}


class _Interrupted(Exception):
    """The transfer stopped part-way; what arrived is kept in the .part file."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    bar = tqdm(total=path.stat().st_size, desc=f"sha256 {path.name}", unit="B", unit_scale=True, disable=None)
    with open(path, "rb") as f, bar:
        while block := f.read(1 << 20):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def _verify(path: Path, expected_size: int | None, sha256: str | None, delete: bool) -> None:
    """Raise ValueError if `path` has the wrong size or digest (deleting it first if `delete`)."""
    size = path.stat().st_size
    problem = None
    if expected_size is not None and size != expected_size:
        problem = f"{path} has {size} bytes, expected {expected_size}"
    elif sha256 is not None and (actual := _sha256(path)) != sha256.lower():
        problem = f"{path} has SHA-256 {actual}, expected {sha256}"
    if problem is None:
        return
    if delete:
        path.unlink()
        raise ValueError(f"{problem}; deleted it, re-run to download it again")
    raise ValueError(f"{problem}; delete it (or put a good copy there) and re-run")


def _content_range(header: str | None) -> tuple[int | None, int | None]:
    """(first byte, total size) from a "bytes START-END/TOTAL" Content-Range header; None if absent."""
    try:
        span, total = header.split()[1].split("/")
        return int(span.split("-")[0]), None if total == "*" else int(total)
    except (AttributeError, IndexError, ValueError):
        return None, None


def _transfer(url: str, part: Path, expected_size: int | None, timeout: float, chunk_size: int) -> None:
    """Append the rest of `url` to `part` (or start over if the server ignores Range)."""
    offset = part.stat().st_size if part.exists() else 0
    if expected_size is not None and offset >= expected_size:
        if offset == expected_size:
            return
        part.unlink()  # longer than the file can be: not ours to resume
        offset = 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    host = urlparse(url).netloc
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # our offset is at or past the end of the server's file
            if (e.headers["Content-Range"] or "").endswith(f"/{offset}"):
                return  # the part already holds the whole file
            part.unlink()
            raise _Interrupted("the server refused to resume; starting over") from e
        raise ConnectionError(f"{url}: HTTP {e.code} {e.reason}") from e
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise ConnectionError(
            f"could not reach {host}: {reason}; download the zips by hand into {part.parent} and re-run"
        ) from e
    with response:
        if response.status == 206:
            start, total = _content_range(response.headers["Content-Range"])
            if start != offset:
                part.unlink()
                raise _Interrupted(f"asked for bytes from {offset}, the server sent from {start}; starting over")
            mode = "ab"
        else:
            if offset:
                report(f"{host} ignored the request to resume; downloading {part.name} from the start")
            length = response.headers["Content-Length"]
            mode, offset, total = "wb", 0, int(length) if length else None
        if expected_size is not None and total is not None and total != expected_size:
            raise ValueError(f"{url} is {total} bytes on the server, expected {expected_size}; is it the right URL?")
        name = part.name.removesuffix(".part")
        bar = tqdm(total=total, initial=offset, desc=name, unit="B", unit_scale=True, disable=None)
        with open(part, mode) as f, bar:
            while True:
                try:
                    chunk = response.read(chunk_size)
                except (OSError, http.client.HTTPException) as e:  # reset, timeout, IncompleteRead
                    raise _Interrupted(f"{type(e).__name__}: {e}") from e
                if not chunk:
                    break
                f.write(chunk)
                bar.update(len(chunk))
    if total is not None and part.stat().st_size < total:
        raise _Interrupted(f"the connection closed after {part.stat().st_size} of {total} bytes")


def download(
    url: str,
    dest: str | Path,
    expected_size: int | None = None,
    sha256: str | None = None,
    timeout: float = 60.0,
    retries: int = 5,
    chunk_size: int = 1 << 20,
) -> Path:
    """Download `url` to `dest`, resuming from dest.part, and rename it into place only once verified.

    An existing `dest` is checked (size, sha256) and kept. A transfer that breaks off is resumed with an
    HTTP Range request up to `retries` times (and again by the next call); a server that ignores Range
    is restarted from byte 0. `timeout` (seconds) bounds connecting and every read.
    """
    dest = Path(dest)
    if dest.is_file():
        _verify(dest, expected_size, sha256, delete=False)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    for attempt in range(retries + 1):
        before = part.stat().st_size if part.exists() else 0
        try:
            _transfer(url, part, expected_size, timeout, chunk_size)
            break
        except _Interrupted as e:
            have = part.stat().st_size if part.exists() else 0
            if attempt == retries:
                raise ConnectionError(
                    f"download of {url} stopped ({e}); {part} keeps {have} bytes, re-run to resume"
                ) from e
            report(f"download of {dest.name} interrupted ({e}); resuming at byte {have}")
            if have <= before:  # no progress: give the server a moment
                time.sleep(attempt + 1)
    _verify(part, expected_size, sha256, delete=True)
    os.replace(part, dest)
    return dest


def _move_into(src: Path, dst: Path) -> None:
    """Move `src` to `dst`, merging folders; files already at the destination are kept."""
    if not dst.exists():
        os.replace(src, dst)
    elif src.is_dir() and dst.is_dir():
        for child in src.iterdir():
            _move_into(child, dst / child.name)


def unzip(zip_path: str | Path, root: str | Path) -> None:
    """Unpack a zip into a temporary folder inside `root`, then move its top-level entries into place.

    Reading every member checks its CRC-32 (what ZipFile.testzip does), so a damaged archive fails
    here and nothing of it reaches `root`.
    """
    zip_path, root = Path(zip_path), Path(root)
    tmp = Path(tempfile.mkdtemp(prefix=f".{zip_path.stem}.unzip-", dir=root))
    try:
        with zipfile.ZipFile(zip_path) as z:
            for member in tqdm(z.infolist(), desc=f"unzip {zip_path.name}", unit="file", disable=None):
                z.extract(member, tmp)  # refuses absolute paths and "..": members stay inside tmp
        for entry in tmp.iterdir():
            _move_into(entry, root / entry.name)
    except zipfile.BadZipFile as e:
        raise ValueError(f"{zip_path} is damaged ({e}); delete it and re-run to download it again") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fetch(
    root: str | Path,
    parts: tuple[str, ...] = ("val2017", "annotations"),
    archives: dict[str, Archive] | None = None,
    keep_zips: bool = False,
) -> Path:
    """Download and unpack COCO parts ("train2017", "val2017", "annotations") into ROOT; skip those present.

    Each zip lands in ROOT (put one there by hand to skip its download) and is deleted once unpacked
    unless keep_zips. `archives` replaces ARCHIVES (tests use a local server).
    """
    root = Path(root)
    archives = ARCHIVES if archives is None else archives
    unknown = [p for p in parts if p not in archives]
    if unknown:
        raise ValueError(f"unknown COCO part(s) {unknown}; choose from {sorted(archives)}")
    root.mkdir(parents=True, exist_ok=True)
    for name in parts:
        archive = archives[name]
        if all((root / c).exists() for c in archive.contents):
            report(f"{name}: already unpacked in {root}")
            continue
        zip_path = root / Path(urlparse(archive.url).path).name
        download(archive.url, zip_path, archive.size, archive.sha256)
        unzip(zip_path, root)
        missing = [c for c in archive.contents if not (root / c).exists()]
        if missing:
            raise ValueError(f"{zip_path} did not contain {missing}; is it the right archive?")
        if not keep_zips:
            zip_path.unlink()
        report(f"{name}: unpacked into {root}" + ("" if keep_zips else f" (deleted {zip_path.name})"))
    return root


# ---------------------------------------------------------------------------------------------------------
# The laptop split: train, validate and test on val2017 alone (1 GB instead of 19)
# ---------------------------------------------------------------------------------------------------------

LAPTOP_SIZES = {"laptop-train": 4000, "laptop-val": 500, "laptop-test": 500}


def laptop_order(image_ids: list) -> list:
    """val2017's ids in the laptop split's fixed order: by the SHA-256 of the id's decimal text.

    A hash, not a seeded shuffle, so that the order is the same on every machine and every Python: the
    split depends on nothing but COCO's own ids.
    """
    return sorted(image_ids, key=lambda i: hashlib.sha256(str(i).encode()).hexdigest())


def make_laptop_split(root: str | Path, source: str = "val2017", sizes: dict[str, int] | None = None) -> dict:
    """Cut SOURCE (val2017) into the splits of `sizes` (LAPTOP_SIZES: 4,000 / 500 / 500), in laptop_order.

    For each split NAME it writes ROOT/annotations/captions_NAME.json (and instances_NAME.json when the source
    has instance annotations, for CHAIR) holding that split's images, and fills ROOT/NAME/ with hard links to
    the source's image files (copies where the file system has no links), so `data.prepare(root, NAME, ...)`
    reads it like any COCO split. ROOT/annotations/laptop_split.json records the ids. Only captioned images
    that are on disk are used; the ones left out are counted and named. Returns {name: number of images}.
    """
    root, sizes = Path(root), sizes or LAPTOP_SIZES
    ann = root / "annotations"
    captions_path = ann / f"captions_{source}.json"
    try:
        captions = json.loads(captions_path.read_text(encoding="utf-8"))
        images = {im["id"]: im for im in captions["images"]}
        captioned = {a["image_id"] for a in captions["annotations"]}
    except FileNotFoundError:
        raise FileNotFoundError(f"{captions_path} not found; run `python -m nanovlm data coco` first") from None
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{captions_path}: not a COCO captions file ({type(e).__name__}: {e})") from None
    missing = [i for i in images if i in captioned and not (root / source / images[i]["file_name"]).is_file()]
    if missing:
        report(f"laptop split: {len(missing)} captioned image(s) of {source} are not on disk and are left out, "
               f"e.g. {images[missing[0]]['file_name']}")  # fmt: skip
    left_out = set(missing)
    usable = laptop_order([i for i in images if i in captioned and i not in left_out])
    if len(usable) < sum(sizes.values()):
        raise ValueError(f"{source} has {len(usable)} usable images; the laptop split needs {sum(sizes.values())}")
    chosen, start = {}, 0
    for name, n in sizes.items():
        chosen[name], start = usable[start : start + n], start + n
    write_subsets(root, source, chosen)
    record = {"source": source, "order": "sha256 of each image id's decimal text", **chosen}
    write_file_atomically(ann / "laptop_split.json", json.dumps(record))
    return {name: len(ids) for name, ids in chosen.items()}


def write_subsets(root: str | Path, source: str, subsets: dict[str, list]) -> None:
    """Make each ROOT/NAME of `subsets` (name -> image ids of split SOURCE) a COCO split of its own.

    Writes annotations/captions_NAME.json (and instances_NAME.json when SOURCE has instance annotations)
    with only those images, and links their files into ROOT/NAME/ (hard links; copies where the file system
    has none), so `data.prepare(root, NAME, ...)` reads it like any COCO split. SOURCE's files are read once.
    """
    root, ann = Path(root), Path(root) / "annotations"
    captions = json.loads((ann / f"captions_{source}.json").read_text(encoding="utf-8"))
    images = {im["id"]: im for im in captions["images"]}
    unknown = [i for ids in subsets.values() for i in ids if i not in images]
    if unknown:
        raise ValueError(f"{ann / f'captions_{source}.json'}: no image with id {unknown[0]!r}")
    instances_path = ann / f"instances_{source}.json"
    instances = json.loads(instances_path.read_text(encoding="utf-8")) if instances_path.is_file() else None
    for name, image_ids in subsets.items():
        keep = set(image_ids)
        for kind, data in (("captions", captions), ("instances", instances)):
            if data is not None:
                part = {**data, "images": [images[i] for i in image_ids]}
                part["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep]
                write_file_atomically(ann / f"{kind}_{name}.json", json.dumps(part))
        folder = root / name
        folder.mkdir(exist_ok=True)
        for i in image_ids:
            src, dst = root / source / images[i]["file_name"], folder / images[i]["file_name"]
            if not dst.exists():
                try:
                    os.link(src, dst)
                except OSError:  # no hard links here (another file system, some network drives): copy
                    shutil.copyfile(src, dst)
