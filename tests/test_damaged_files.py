"""Every file nanovlm reads, damaged: a one-line error that names the file, never a traceback or pickled code.

The files: a checkpoint (model.safetensors, config.json, tokenizer.tiktoken, trainer.pt), the dataset's
tokenizer cache and `done` marker, the annotation JSONs, the image files and the prepared folder
(images.npy, captions.json, scenes.json, manifest.json). Each is cut short, emptied, overwritten with
random bytes, replaced by a pickle whose loading would create a file, and given the right format with
the wrong content. `python -m nanovlm` prints these errors as one "error: ..." line (see main()).
"""

import base64
import errno
import io
import json
import os
import pickle
import random
import resource
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import safetensors.torch
import torch
from test_trainer import TINY_FLAGS, make_trainer

from nanovlm.config import DataConfig
from nanovlm.data import PackedSplit, load_image, prepare, read_captions
from nanovlm.files import write_dir_atomically
from nanovlm.pipeline import load_tokenizer, prepare_splits
from nanovlm.trainer import load_trainer_state
from nanovlm.vlm import VLM

CLI_ERRORS = (ValueError, OSError, FloatingPointError, RuntimeError)  # what main() turns into one line
UNSAFE_ADVICE = ("weights_only=False", "allow_pickle", "pickle.load")  # would run the pickled code
IMAGE = "val/000128.png"  # the first val image of the tiny scenes (ids run on from the 128 train ones)


class CreatesMarker:
    """Unpickling this creates the file `path`: proof that a loader ran code from the file."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@dataclass
class World:
    ckpt: Path  # a saved checkpoint (last/ of a short run)
    data: Path  # a copy of the tiny scenes dataset, prepared
    out: Path  # a run folder for trainers made here
    marker: Path  # created if any loader unpickles CreatesMarker


@pytest.fixture(scope="module")
def checkpoint(tiny_scenes, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    make_trainer(tiny_scenes, out, max_steps=2, eval_every=2).fit()
    return out / "last"


@pytest.fixture
def world(checkpoint, tiny_scenes, tmp_path) -> World:
    shutil.copytree(checkpoint, tmp_path / "ckpt")
    shutil.copytree(tiny_scenes, tmp_path / "data")  # copy2 keeps mtimes, so the prepared folders stay up to date
    return World(tmp_path / "ckpt", tmp_path / "data", tmp_path / "run", tmp_path / "MARKER")


# ----------------------------------------------------------------------------- damage


def truncated(data: bytes, world: World) -> bytes:
    return data[: len(data) // 2]


def pickled(data: bytes, world: World) -> bytes:
    return pickle.dumps(CreatesMarker(world.marker))


def json_list(data: bytes, world: World) -> bytes:
    return b"[1, 2, 3]"


def edited_json(edit):
    """Damage that keeps the file valid JSON but changes what it holds."""

    def damage(data: bytes, world: World) -> bytes:
        doc = json.loads(data)
        edit(doc)
        return json.dumps(doc).encode()

    return damage


def edited_lines(edit):
    """Damage to a tiktoken file that keeps it text."""

    def damage(data: bytes, world: World) -> bytes:
        return "".join(f"{line}\n" for line in edit(data.decode().splitlines())).encode()

    return damage


def reranked(lines: list[str]) -> list[str]:
    token, _ = lines[-1].split()
    return [*lines[:-1], f"{token} {len(lines) + 5}"]


def without_byte_a(lines: list[str]) -> list[str]:
    a, other = base64.b64encode(b"a").decode(), base64.b64encode(bytes([0, 1])).decode()
    return [f"{other} 97" if line.startswith(f"{a} ") else line for line in lines]


def torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def safetensors_with_wrong_shape(data: bytes, world: World) -> bytes:
    weights = safetensors.torch.load(data)
    weights["vit.pos_embed"] = torch.zeros(1, 3, 7)
    return safetensors.torch.save(weights)


def npy_like(change):
    """A well-formed .npy file holding the packed images changed by `change`."""

    def damage(data: bytes, world: World) -> bytes:
        buffer = io.BytesIO()
        np.save(buffer, change(np.load(io.BytesIO(data))))
        return buffer.getvalue()

    return damage


def npz(data: bytes, world: World) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, images=np.load(io.BytesIO(data)))
    return buffer.getvalue()


GENERIC = {
    "truncated": truncated,
    "empty": lambda data, world: b"",
    "garbage": lambda data, world: random.Random(0).randbytes(3000),
    "pickled": pickled,
}

# ----------------------------------------------------------------------------- what reads each file


def load_checkpoint(world: World) -> None:
    VLM.load(world.ckpt)


def resume(world: World) -> None:
    make_trainer(world.data, world.out, max_steps=2, eval_every=2).resume(world.ckpt)


def load_cached_tokenizer(world: World) -> None:
    load_tokenizer(DataConfig(root=str(world.data), vocab_size=300), PackedSplit(world.data / "prepared" / "train_32"))


def prepare_scenes(world: World) -> None:
    prepare_splits(DataConfig(root=str(world.data), image_size=32, vocab_size=300, n_train=128))


def prepare_val(world: World) -> None:
    PackedSplit(prepare(world.data, "val", 32))


def open_val(world: World) -> None:
    PackedSplit(world.data / "prepared" / "val_32")


def read_val_captions(world: World) -> None:
    read_captions(world.data, "val")


def open_image(world: World) -> None:
    load_image(world.data / IMAGE)


# file, what reads it, and the damage beyond the generic four that keeps the format but not the content
FILES = {
    "model.safetensors": ("ckpt", load_checkpoint, {"wrong-shape": safetensors_with_wrong_shape}),
    "config.json": (
        "ckpt",
        load_checkpoint,
        {
            "not-utf8": lambda data, world: b'{"vit": "\xe9t\xe9"}',
            "json-list": json_list,
            "part-not-object": edited_json(lambda doc: doc.update(vit=[32])),
            "field-wrong-type": edited_json(lambda doc: doc["decoder"].update(dim=32.5)),
            "unknown-field": edited_json(lambda doc: doc["vit"].update(colour="red")),
        },
    ),
    "tokenizer.tiktoken": (
        "ckpt",
        load_checkpoint,
        {
            "cut-at-a-line": edited_lines(lambda lines: lines[:280]),
            "rank-gap": edited_lines(reranked),
            "duplicate-token": edited_lines(lambda lines: [*lines, lines[0].split()[0] + f" {len(lines)}"]),
            "missing-byte": edited_lines(without_byte_a),
            "bad-line": edited_lines(lambda lines: [*lines[:100], "not a rank line", *lines[100:]]),
        },
    ),
    "trainer.pt": (
        "ckpt",
        resume,
        {
            "torch-saved-code": lambda data, world: torch_bytes(CreatesMarker(world.marker)),
            "not-a-dict": lambda data, world: torch_bytes([1, 2, 3]),
            "missing-keys": lambda data, world: torch_bytes({"step": 3}),
        },
    ),
    "tokenizer-300.tiktoken": (
        "data",
        load_cached_tokenizer,
        {"cut-at-a-line": edited_lines(lambda lines: lines[:280]), "rank-gap": edited_lines(reranked)},
    ),
    "done": (
        "data",
        prepare_scenes,
        {
            "json-list": json_list,
            "no-config": edited_json(lambda doc: doc.pop("config")),
            "unknown-field": edited_json(lambda doc: doc["config"].update(colour="red")),
        },
    ),
    "annotations/captions_val.json": (
        "data",
        read_val_captions,
        {"json-list": json_list, "file-name-not-text": edited_json(lambda doc: doc["images"][0].update(file_name=7))},
    ),
    "annotations/scenes_val.json": ("data", prepare_val, {"json-list": json_list}),
    "annotations/vqa_val_questions.json": (
        "data",
        prepare_val,
        {"json-list": json_list, "id-repeated": edited_json(lambda doc: doc["questions"].append(doc["questions"][0]))},
    ),
    "annotations/vqa_val_annotations.json": (
        "data",
        prepare_val,
        {
            "json-list": json_list,
            "answer-not-text": edited_json(lambda doc: doc["annotations"][0]["answers"][0].update(answer=3)),
            "other-image": edited_json(lambda doc: doc["annotations"][0].update(image_id=-1)),
        },
    ),
    "prepared/val_32/images.npy": (
        "data",
        prepare_val,
        {
            "float32": npy_like(lambda images: images.astype(np.float32)),
            "one-image-short": npy_like(lambda images: images[:-1]),
            "flat": npy_like(lambda images: images.reshape(-1)),
            "npz": npz,
        },
    ),
    "prepared/val_32/manifest.json": (
        "data",
        prepare_val,
        {
            "json-list": json_list,
            "no-result": edited_json(lambda doc: doc.pop("result")),
            "count-off": edited_json(lambda doc: doc["result"].update(prepared=5)),
        },
    ),
    "prepared/val_32/captions.json": (
        "data",
        open_val,
        {
            "json-list": json_list,
            "lists-differ": edited_json(lambda doc: doc["file_names"].pop()),
            "caption-not-list": edited_json(lambda doc: doc["captions"].__setitem__(0, "a caption")),
        },
    ),
    "prepared/val_32/scenes.json": (
        "data",
        open_val,
        {
            "json-list": json_list,
            "scene-missing": edited_json(lambda doc: doc["scenes"].pop()),
        },
    ),
    "prepared/val_32/questions.json": (
        "data",
        open_val,
        {
            "json-object": lambda data, world: b'{"questions": []}',
            "question-of-unknown-image": edited_json(lambda doc: doc[0].update(image_id=-1)),
        },
    ),
    IMAGE: ("data", open_image, {"json-text": lambda data, world: b'{"not": "an image"}'}),
}

CASES = [(name, kind) for name, (_, _, extra) in FILES.items() for kind in [*GENERIC, *extra]]


def assert_one_line_error_naming(error: BaseException, path: Path) -> None:
    message = str(error)
    assert isinstance(error, CLI_ERRORS), f"{type(error).__name__}: {message}"
    assert str(path) in message, message
    assert "\n" not in message, message
    assert not any(advice in message for advice in UNSAFE_ADVICE), message


@pytest.mark.parametrize(("name", "kind"), CASES, ids=[f"{name}-{kind}" for name, kind in CASES])
def test_damaged_file_gives_a_one_line_error_naming_it(world, name, kind):
    where, read, extra = FILES[name]
    path = getattr(world, where) / name
    damage = {**GENERIC, **extra}[kind]
    path.write_bytes(damage(path.read_bytes(), world))
    with pytest.raises(Exception) as caught:
        read(world)
    assert_one_line_error_naming(caught.value, path)
    assert not world.marker.exists(), "a loader ran code from a pickled file"


def test_intact_files_load(world):
    """The matrix above fails for the damage, not for the way the files are read."""
    for _, read, _ in FILES.values():
        read(world)


def test_packed_folder_error_says_how_to_repack(world):
    path = world.data / "prepared" / "val_32" / "images.npy"
    path.write_bytes(truncated(path.read_bytes(), world))
    with pytest.raises(ValueError, match=f"delete {world.data / 'prepared' / 'val_32'}"):
        prepare(world.data, "val", 32)


def test_a_tokenizer_cache_shorter_than_asked_is_fine_when_no_merge_was_left(tmp_path):
    """A small corpus runs out of pairs before the vocabulary is full: that cache is whole, not cut short."""
    train = SimpleNamespace(captions=[["a red cube", "a blue ball"]], qa=None)
    data = DataConfig(root=str(tmp_path), vocab_size=1000)
    first = load_tokenizer(data, train)
    assert first.vocab_size < 1000
    assert load_tokenizer(data, train).vocab_size == first.vocab_size
    path = tmp_path / "tokenizer-1000.tiktoken"
    path.write_text("".join(f"{line}\n" for line in path.read_text().splitlines()[:-1]))
    with pytest.raises(ValueError, match=f"{path}.*delete it"):
        load_tokenizer(data, train)


# ----------------------------------------------------------------------------- writing a checkpoint


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_failed_checkpoint_write_leaves_the_previous_one_and_no_tmp(tmp_path):
    target = tmp_path / "last"
    write_dir_atomically(target, lambda d: (d / "trainer.pt").write_text("previous"))

    def disk_fills(d):
        (d / "model.safetensors").write_text("half of it")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OSError) as caught:
        write_dir_atomically(target, disk_fills)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"could not write checkpoint {target}")
    assert "nothing was lost" in message and "No space left on device" in message
    assert snapshot(target) == {"trainer.pt": b"previous"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]


# ----------------------------------------------------------------------------- through the command line


def run_cli(args: list[str], preexec_fn=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "nanovlm", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, preexec_fn=preexec_fn)


def assert_cli_error_naming(result: subprocess.CompletedProcess, path: Path) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0], result.stderr


@pytest.mark.parametrize(("name", "kind"), [("model.safetensors", "truncated"), ("config.json", "garbage")])
def test_cli_caption_with_a_damaged_checkpoint_prints_one_line(world, name, kind):
    path = world.ckpt / name
    path.write_bytes(GENERIC[kind](path.read_bytes(), world))
    assert_cli_error_naming(run_cli(["caption", str(world.data / IMAGE), "--ckpt", str(world.ckpt)]), path)


def test_cli_caption_with_a_tokenizer_cut_at_a_line_fails_at_load_not_at_decode(world):
    path = world.ckpt / "tokenizer.tiktoken"
    path.write_text("".join(f"{line}\n" for line in path.read_text().splitlines()[:260]))
    result = run_cli(["caption", str(world.data / IMAGE), "--ckpt", str(world.ckpt)])
    assert_cli_error_naming(result, path)
    assert "vocab" in result.stderr


def test_cli_caption_of_a_damaged_image_prints_one_line(world):
    path = world.data / IMAGE
    path.write_bytes(truncated(path.read_bytes(), world))
    assert_cli_error_naming(run_cli(["caption", str(path), "--ckpt", str(world.ckpt)]), path)


def test_cli_eval_on_a_damaged_packed_array_prints_one_line(world):
    path = world.data / "prepared" / "val_32" / "images.npy"
    path.write_bytes(truncated(path.read_bytes(), world))
    result = run_cli(["eval", "--ckpt", str(world.ckpt), "--data", str(world.data), "--split", "val", "--limit", "4"])
    assert_cli_error_naming(result, path)


@pytest.mark.slow
def test_cli_train_on_a_full_disk_keeps_the_last_checkpoint(tiny_scenes, tmp_path):
    out = tmp_path / "run"
    common = ["train", "--data", str(tiny_scenes), "--out", str(out), "--eval-every", "2", "--no-report", *TINY_FLAGS]
    first = run_cli([*common, "--max-steps", "2"])
    assert first.returncode == 0, first.stderr
    before = {name: snapshot(out / name) for name in ("last", "best")}
    limit = len(before["last"]["model.safetensors"]) // 2

    def small_files_only():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = run_cli([*common, "--max-steps", "4"], preexec_fn=small_files_only)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    # Trainer.fit leaves its progress bar open when a save fails, so the error follows the bar on its line
    (error,) = [line[line.index("error: ") :] for line in result.stderr.splitlines() if "error: " in line]
    assert error.startswith(f"error: could not write checkpoint {out}") and "nothing was lost" in error, error
    assert {name: snapshot(out / name) for name in ("last", "best")} == before
    assert not list(out.glob("*.tmp"))
    VLM.load(out / "last")
    assert load_trainer_state(out / "last" / "trainer.pt", "cpu")["step"] == 2
