"""Tests for nanovlm/data.py: reading captions, preparing packed images, and the batch Loader."""

import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from nanovlm import data, vqa
from nanovlm.config import RunConfig, TrainConfig
from nanovlm.data import BadImageError, PackedSplit, load_image, prepare, read_captions, to_rgb
from nanovlm.loader import Loader, loader_benchmark
from nanovlm.pipeline import make_loaders
from nanovlm.tokenizer import Tokenizer

SPLIT = "val"
COLORS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (200, 30, 200)]


def write_split(root, files: dict, captions: dict, split: str = SPLIT, listed_only: tuple = ()) -> None:
    """Write a COCO-layout split: files maps name -> PIL image or raw bytes, captions name -> list."""
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    for name, content in files.items():
        if isinstance(content, bytes):
            (root / split / name).write_bytes(content)
        else:
            content.save(root / split / name)
    names = list(files) + list(listed_only)
    images = [{"id": i + 1, "file_name": name, "width": 0, "height": 0} for i, name in enumerate(names)]
    ids = {name: i + 1 for i, name in enumerate(names)}
    pairs = [(ids[name], c) for name, caps in captions.items() for c in caps]
    annotations = [{"id": 100 + i, "image_id": image_id, "caption": c} for i, (image_id, c) in enumerate(pairs)]
    doc = {"info": {}, "licenses": [], "images": images, "annotations": annotations}
    (root / "annotations" / f"captions_{split}.json").write_text(json.dumps(doc))


def solid(color, size=(30, 20), mode="RGB") -> Image.Image:
    return Image.new(mode, size, color)


def jpeg_bytes(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


@pytest.fixture
def root(tmp_path):
    """Six solid-colour images (PNG and JPEG, landscape and portrait) with two or three captions each."""
    files, captions = {}, {}
    for i, color in enumerate(COLORS):
        name = f"{i:06d}.png" if i % 2 else f"{i:06d}.jpg"
        files[name] = solid(color, (30, 20) if i % 3 else (20, 30))
        captions[name] = [f"picture {i} is here", f"number {i} again"] + ([f"third caption {i}"] if i % 2 else [])
    write_split(tmp_path, files, captions)
    return tmp_path


@pytest.fixture(scope="module")
def tok():
    texts = [f"picture {i} is here number {i} again third caption {i}" for i in range(10)]
    return Tokenizer.train(texts + ["what colour is the shape? red green blue yes no"], vocab_size=300)


# ----------------------------------------------------------------------------- read_captions


def test_read_captions_returns_images_and_their_captions(root):
    images, captions = read_captions(root, SPLIT)
    assert [im["file_name"] for im in images] == [f"{i:06d}.{'png' if i % 2 else 'jpg'}" for i in range(6)]
    assert captions[2] == ["picture 1 is here", "number 1 again", "third caption 1"]


def test_malformed_json_error_names_file_line_and_column(root):
    path = root / "annotations" / f"captions_{SPLIT}.json"
    path.write_text('{"images": [\n  {"id": 1,, }\n]}')
    with pytest.raises(ValueError, match=r"captions_val\.json is not valid JSON: .* line 2, column 12"):
        read_captions(root, SPLIT)


def test_missing_key_is_reported_with_its_place(root):
    path = root / "annotations" / f"captions_{SPLIT}.json"
    doc = json.loads(path.read_text())
    del doc["annotations"][3]["caption"]
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"annotations\[3\] lacks key\(s\) \['caption'\]"):
        read_captions(root, SPLIT)


@pytest.mark.parametrize("field", ["images", "annotations"])
def test_duplicate_ids_are_an_error_naming_the_id(root, field):
    path = root / "annotations" / f"captions_{SPLIT}.json"
    doc = json.loads(path.read_text())
    doc[field][2]["id"] = doc[field][1]["id"]
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=f"id {doc[field][1]['id']} occurs more than once"):
        read_captions(root, SPLIT)


def test_annotations_for_unknown_images_are_skipped_and_reported(root, capsys):
    path = root / "annotations" / f"captions_{SPLIT}.json"
    doc = json.loads(path.read_text())
    doc["annotations"].append({"id": 999, "image_id": 4242, "caption": "orphan"})
    path.write_text(json.dumps(doc))
    _, captions = read_captions(root, SPLIT)
    assert "skipped 1 annotation(s) whose image_id is not listed" in capsys.readouterr().err
    assert all("orphan" not in caps for caps in captions.values())


def test_empty_long_and_non_ascii_captions(tmp_path, capsys):
    long = "a very long caption " * 200
    caps = {"a.png": ["  ", "", "ein Hund läuft über die Straße ☀"], "b.png": [long, "short\n"]}
    write_split(tmp_path, {"a.png": solid(COLORS[0]), "b.png": solid(COLORS[1])}, caps)
    _, captions = read_captions(tmp_path, SPLIT)
    assert "skipped 2 empty caption(s)" in capsys.readouterr().err
    assert captions == {1: ["ein Hund läuft über die Straße ☀"], 2: [long.strip(), "short"]}
    packed = PackedSplit(prepare(tmp_path, SPLIT, 16))
    assert packed.captions == [["ein Hund läuft über die Straße ☀"], [long.strip(), "short"]]


def test_missing_image_files_are_counted_and_the_rest_used(root, capsys):
    os.remove(root / SPLIT / "000003.png")
    images, captions = read_captions(root, SPLIT)
    assert "1 of 6 images missing under" in capsys.readouterr().err
    assert len(images) == 5 and 4 not in captions
    for name in os.listdir(root / SPLIT):
        os.remove(root / SPLIT / name)
    with pytest.raises(FileNotFoundError, match="none of the 6 images"):
        read_captions(root, SPLIT)


# ----------------------------------------------------------------------------- prepare + PackedSplit


def test_prepare_round_trip(root):
    packed = PackedSplit(prepare(root, SPLIT, 16, workers=1))
    assert packed.images.shape == (6, 16, 16, 3) and packed.images.dtype == np.uint8
    assert packed.image_ids == [1, 2, 3, 4, 5, 6] and len(packed) == 6
    assert packed.captions[0] == ["picture 0 is here", "number 0 again"]
    assert packed.scenes is None and packed.qa is None
    for row, color in enumerate(COLORS):  # solid images stay solid (JPEG within a few levels)
        assert np.abs(packed.images[row].astype(int) - color).max() <= 6


def test_prepare_with_worker_processes_gives_the_same_pixels(root):
    """The pool path: 70 images so it is used; results come back in input order."""
    files = {f"{i:03d}.png": solid((i * 3, 255 - i * 3, 7)) for i in range(70)}
    write_split(root, files, {name: ["a caption"] for name in files}, split="many")
    packed = PackedSplit(prepare(root, "many", 8, workers=2))
    assert packed.images[:, 4, 4, 0].tolist() == [i * 3 for i in range(70)]


def test_crop_keeps_the_centre_and_pad_letterboxes(tmp_path):
    """40x20 image: red, green, blue vertical bands of 10, 20, 10 pixels."""
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :10] = (255, 0, 0)
    pixels[:, 10:30] = (0, 255, 0)
    pixels[:, 30:] = (0, 0, 255)
    write_split(tmp_path, {"bands.png": Image.fromarray(pixels)}, {"bands.png": ["bands"]})
    crop = PackedSplit(prepare(tmp_path, SPLIT, 16, resize="crop")).images[0].astype(int)
    assert np.abs(crop[:, 1:-1] - (0, 255, 0)).max() <= 2  # the centre 20x20 is green (edges: bicubic)
    pad = PackedSplit(prepare(tmp_path, SPLIT, 16, resize="pad")).images[0].astype(int)
    assert (pad[:3] == 0).all() and (pad[-3:] == 0).all()  # 16x8 picture centred: black bars of 4 rows
    assert np.abs(pad[6:10, 1] - (255, 0, 0)).max() <= 2
    assert np.abs(pad[6:10, 8] - (0, 255, 0)).max() <= 2
    assert np.abs(pad[6:10, 14] - (0, 0, 255)).max() <= 2


def test_rerun_skips_work_until_an_input_or_setting_changes(root, capsys):
    out = prepare(root, SPLIT, 16)
    made = (out / "images.npy").stat().st_mtime_ns
    assert prepare(root, SPLIT, 16) == out
    assert (out / "images.npy").stat().st_mtime_ns == made
    assert "is up to date" in capsys.readouterr().err
    prepare(root, SPLIT, 16, resize="pad")
    assert "prepared 6 images" in capsys.readouterr().err
    os.utime(root / SPLIT / "000000.jpg", ns=(1, 1))
    prepare(root, SPLIT, 16, resize="pad")
    assert "prepared 6 images" in capsys.readouterr().err


def test_interrupted_prepare_leaves_nothing_that_looks_done(root, monkeypatch):
    def crash(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(data, "_aligned_scenes", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare(root, SPLIT, 16)
    assert list((root / "prepared").iterdir()) == []  # no final folder, no temporary one
    with pytest.raises(FileNotFoundError, match="run `python -m nanovlm data"):
        PackedSplit(root / "prepared" / f"{SPLIT}_16")


def test_packed_split_reports_missing_or_incomplete_folder(root):
    with pytest.raises(FileNotFoundError, match="missing or incomplete .*run `python -m nanovlm data"):
        PackedSplit(root / "prepared" / "nowhere")
    out = prepare(root, SPLIT, 16)
    (out / "captions.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"no captions\.json"):
        PackedSplit(out)


def tiny_png() -> bytes:
    buffer = io.BytesIO()
    solid(COLORS[0], (1, 1)).save(buffer, "PNG")
    return buffer.getvalue()


def truncated_jpeg() -> bytes:
    noise = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    whole = jpeg_bytes(Image.fromarray(noise))
    return whole[: len(whole) // 2]


def corrupt_png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(buffer, "PNG")
    broken = bytearray(buffer.getvalue())
    broken[len(broken) // 2 : len(broken) // 2 + 64] = bytes(64)
    return bytes(broken)


@pytest.mark.parametrize(
    "content, reason",
    [
        (truncated_jpeg(), "corrupt"),
        (corrupt_png(), "corrupt"),
        (b"\x00\x01 this is not an image at all", "not an image"),
        (tiny_png(), "too small"),
    ],
    ids=["truncated-jpeg", "corrupt-png", "not-an-image", "1x1"],
)
def test_bad_images_are_skipped_counted_and_named(root, capsys, content, reason):
    (root / SPLIT / "000002.jpg").write_bytes(content)
    packed = PackedSplit(prepare(root, SPLIT, 16, max_bad_fraction=0.5))
    out = capsys.readouterr().err
    assert "warning: skipped" in out and "000002.jpg" in out
    assert f"prepared 5 images into {root / 'prepared' / 'val_16'}, skipped 1 ({reason}: 1)" in out
    assert packed.image_ids == [1, 2, 4, 5, 6] and packed.images.shape == (5, 16, 16, 3)
    assert np.abs(packed.images[2].astype(int) - COLORS[3]).max() <= 6  # rows after the gap shifted up


def test_decompression_bomb_is_skipped_with_reason(root, capsys, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # the good images have 600 pixels
    solid(COLORS[2], (100, 100)).save(root / SPLIT / "000002.jpg")
    PackedSplit(prepare(root, SPLIT, 16, max_bad_fraction=0.5, workers=1))
    assert "skipped 1 (too large: 1)" in capsys.readouterr().err
    solid(COLORS[2], (40, 40)).save(root / SPLIT / "000002.jpg")  # between the limit and twice it: PIL warns
    with pytest.raises(BadImageError, match="too large to decode safely") as error:
        load_image(root / SPLIT / "000002.jpg")
    assert error.value.reason == "too large"


def test_too_many_bad_images_raise_with_the_list_and_leave_nothing(root):
    for name in ("000001.png", "000002.jpg"):
        (root / SPLIT / name).write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"2 of 6 images .* could not be used(.|\n)*000001\.png(.|\n)*000002"):
        prepare(root, SPLIT, 16)
    assert list((root / "prepared").iterdir()) == []


def test_load_image_errors_name_the_file(tmp_path):
    with pytest.raises(BadImageError, match="does not exist"):
        load_image(tmp_path / "nope.jpg")
    (tmp_path / "text.jpg").write_text("hello")
    with pytest.raises(BadImageError, match=r"text\.jpg is not an image"):
        load_image(tmp_path / "text.jpg")
    (tmp_path / "half.jpg").write_bytes(truncated_jpeg())
    with pytest.raises(BadImageError, match=r"half\.jpg is corrupt or truncated"):
        load_image(tmp_path / "half.jpg")


def test_jpeg_draft_decodes_smaller_but_still_covers_the_size(tmp_path):
    solid(COLORS[0], (400, 300)).save(tmp_path / "big.jpg")
    assert load_image(tmp_path / "big.jpg", draft_size=64).size == (100, 75)  # 1/4 scale: 75 >= 64
    assert load_image(tmp_path / "big.jpg").size == (400, 300)


def palette_image(transparent: bool) -> Image.Image:
    img = Image.new("P", (10, 10), 1)
    img.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    if transparent:
        img.info["transparency"] = 1
    return img


@pytest.mark.parametrize(
    "img, suffix, expected",
    [
        (solid(100, mode="L"), "png", (100, 100, 100)),
        (solid((255, 0, 0, 0), mode="RGBA"), "png", (255, 255, 255)),  # fully transparent: white
        (solid((0, 0, 255, 255), mode="RGBA"), "png", (0, 0, 255)),
        (solid((0, 0, 0, 128), mode="RGBA"), "png", (127, 127, 127)),  # half black over white
        (solid((50, 255), mode="LA"), "png", (50, 50, 50)),
        (solid((0, 255, 255, 0), mode="CMYK"), "jpg", (255, 0, 0)),
        (palette_image(transparent=False), "png", (10, 20, 30)),
        (palette_image(transparent=True), "png", (255, 255, 255)),
        (Image.fromarray(np.full((10, 10), 30000, np.uint16)), "png", (117, 117, 117)),  # I;16: 30000/257
        (Image.fromarray(np.full((10, 10), 65535, np.int32)), "tiff", (255, 255, 255)),  # mode I
    ],
    ids=["L", "RGBA-clear", "RGBA-opaque", "RGBA-half", "LA", "CMYK", "P", "P-transparent", "I;16", "I"],
)
def test_image_modes_convert_to_the_right_rgb(tmp_path, img, suffix, expected):
    path = tmp_path / f"image.{suffix}"
    img.save(path)
    rgb = load_image(path)
    assert rgb.mode == "RGB"
    assert np.abs(np.asarray(rgb, dtype=int)[5, 5] - expected).max() <= 3
    assert to_rgb(img).mode == "RGB"


def test_a_photo_with_an_exif_rotation_is_packed_as_stored_and_counted(tmp_path, capsys):
    top = Image.new("RGB", (40, 20), (200, 30, 30))
    top.paste(Image.new("RGB", (40, 10), (30, 30, 200)), (0, 10))  # red above blue, as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "show me turned 90 degrees clockwise"
    buffer = io.BytesIO()
    top.save(buffer, "JPEG", exif=exif)
    write_split(tmp_path, {"000000.jpg": buffer.getvalue(), "000001.png": solid((9, 9, 9), (20, 20))},
                {"000000.jpg": ["turned"], "000001.png": ["plain"]})  # fmt: skip
    packed = PackedSplit(prepare(tmp_path, SPLIT, 16))
    err = capsys.readouterr().err
    assert "note: 1 photo(s) carry an EXIF orientation and were packed as stored, unrotated" in err
    assert "000000.jpg" in err and "000001.png" not in err.split("note:")[1]
    pixels = packed.images[0].astype(int)  # centre crop of the stored pixels: red on top, blue below
    assert pixels[1, 8, 0] > 150 and pixels[-2, 8, 2] > 150


def test_scene_records_and_qa_are_copied_in_packed_order(root):
    os.remove(root / SPLIT / "000004.jpg")  # image id 5 is not packed
    scenes = [{"image_id": i, "objects": [{"shape": "circle", "n": i}]} for i in range(6, 0, -1)]
    qa = [{"image_id": i, "question": "how many?", "answer": str(i), "type": "count"} for i in (5, 3, 1)]
    (root / "annotations" / f"scenes_{SPLIT}.json").write_text(json.dumps({"scenes": scenes, "qa": qa}))
    packed = PackedSplit(prepare(root, SPLIT, 16))
    assert [s["image_id"] for s in packed.scenes] == packed.image_ids == [1, 2, 3, 4, 6]
    assert [q["image_id"] for q in packed.qa] == [3, 1]


# ----------------------------------------------------------------------------- Loader


@pytest.fixture
def packed(root):
    return PackedSplit(prepare(root, SPLIT, 16))


def _row_of(packed, image) -> int:
    """The packed row whose pixels a batch image (3, H, W) in [0, 1] holds."""
    pixels = (image.permute(1, 2, 0) * 255).round().numpy().astype(np.uint8)
    return next(r for r in range(len(packed)) if (packed.images[r] == pixels).all())


def test_batches_have_the_contract_shapes_and_matching_image_and_text(packed, tok):
    batch = next(iter(Loader(packed, tok, batch_size=4, max_len=12)))
    assert batch["images"].shape == (4, 3, 16, 16) and batch["images"].dtype == torch.float32
    assert batch["input_ids"].shape == batch["targets"].shape == (4, 12)
    assert batch["input_ids"].dtype == batch["targets"].dtype == torch.int64
    assert 0.0 <= batch["images"].min() and batch["images"].max() <= 1.0
    assert (batch["input_ids"][:, 0] == tok.image).all()
    for image, ids in zip(batch["images"], batch["input_ids"], strict=True):
        text = tok.decode([i for i in ids.tolist() if i != tok.eot][1:])
        assert text in packed.captions[_row_of(packed, image)]


def test_targets_are_next_tokens_and_ignore_exactly_the_padding(packed, tok):
    batch = Loader(packed, tok, batch_size=6, max_len=12).batch(0)
    for ids, targets in zip(batch["input_ids"].tolist(), batch["targets"].tolist(), strict=True):
        n = ids.index(tok.eot)  # <|image|> + caption tokens
        assert targets[: n - 1] == ids[1:n] and targets[n - 1] == tok.eot  # loss on caption + eot
        assert targets[n:] == [-100] * (12 - n) and ids[n:] == [tok.eot] * (12 - n)


def test_long_captions_are_truncated_at_max_len(packed, tok):
    batch = Loader(packed, tok, batch_size=6, max_len=3).batch(0)
    assert batch["input_ids"].shape == (6, 3)
    assert (batch["targets"] != -100).all()  # every position has a caption token to predict


def test_qa_loss_is_on_the_answer_and_eot_only(root, tok):
    scenes = [{"image_id": i, "objects": []} for i in range(1, 7)]
    qa = [{"image_id": i, "question": "what colour is the shape?", "answer": "red", "type": "color"} for i in (2, 4)]
    (root / "annotations" / f"scenes_{SPLIT}.json").write_text(json.dumps({"scenes": scenes, "qa": qa}))
    batch = Loader(PackedSplit(prepare(root, SPLIT, 16)), tok, batch_size=2, max_len=40, task="qa").batch(0)
    question, answer = tok.encode("what colour is the shape?"), tok.encode(" red")  # answers follow a space
    prompt = [tok.image, tok.user, *question, tok.assistant]
    for ids, targets in zip(batch["input_ids"].tolist(), batch["targets"].tolist(), strict=True):
        assert ids[: len(prompt) + len(answer)] == prompt + answer
        kept = [t for t in targets if t != -100]
        assert kept == answer + [tok.eot]
        assert targets.index(answer[0]) == len(prompt) - 1  # the <|assistant|> position predicts the answer


def vqa_records(pairs: list[tuple[int, str, str]]) -> list[dict]:
    """VQA v2 records for (image_id, question, answer) triples, ten agreeing humans each."""
    return [
        {
            "question_id": 1000 + k,
            "image_id": image_id,
            "question": question,
            "answers": [answer] * 10,
            "answer": answer,
            "answer_type": "other",
            "question_type": "colour",
        }
        for k, (image_id, question, answer) in enumerate(pairs)
    ]


ASKED = [(i, f"what colour is shape {i}?", c) for i in (1, 2, 3) for c in ("red", "blue")] + [(5, "what is it?", "a")]


@pytest.fixture
def chats(root):
    """The root split with VQA v2 question and annotation files beside its captions."""
    files = (
        root / "annotations" / f"vqa_{SPLIT}_questions.json",
        root / "annotations" / f"vqa_{SPLIT}_annotations.json",
    )
    vqa.write_vqa(vqa_records(ASKED), *files)
    return PackedSplit(prepare(root, SPLIT, 16))


def test_questions_in_the_vqa_layout_are_packed_with_their_images(chats):
    assert [(q["image_id"], q["question"], q["answer"]) for q in chats.qa] == ASKED
    assert all(q["type"] == "colour" and len(q["answers"]) == 10 for q in chats.qa)


def test_chat_rows_hold_whole_turns_with_loss_on_answers_only(chats, tok):
    loader = Loader(chats, tok, batch_size=6, max_len=30, task="chat", caption_prob=0.0)
    turns = {tuple(tok.encode(q) + [tok.assistant] + tok.encode(" " + a) + [tok.eot]): a for _, q, a in ASKED}
    for k in range(4):
        batch = loader.batch(k)
        for ids, targets in zip(batch["input_ids"].tolist(), batch["targets"].tolist(), strict=True):
            row = ids + [targets[-1] if targets[-1] != -100 else tok.eot]
            if row[1] != tok.user:  # an image without questions is shown with a caption
                continue
            assert row[0] == tok.image
            cut = [i for i, t in enumerate(row) if t == tok.user] + [len(row)]
            said = []
            for start, end in zip(cut, cut[1:], strict=False):
                turn = tuple(row[start + 1 : end])
                turn = turn[: turn.index(tok.eot) + 1]  # padding after the last turn
                assert turn in turns, "every turn is whole"
                said += tok.encode(" " + turns[turn]) + [tok.eot]
            assert [t for t in targets if t != -100] == said


def test_chats_mix_captions_by_caption_prob_and_equal_captions_at_one(chats, tok):
    captions = Loader(chats, tok, batch_size=4, max_len=30, task="caption", seed=2)
    only_captions = Loader(chats, tok, batch_size=4, max_len=30, task="chat", seed=2, caption_prob=1.0)
    for k in range(3):
        for key, value in captions.batch(k).items():
            assert torch.equal(only_captions.batch(k)[key], value)
    mixed = Loader(chats, tok, batch_size=4, max_len=30, task="chat", seed=2, caption_prob=0.5)
    starts = [int(mixed.batch(k)["input_ids"][i, 1]) for k in range(30) for i in range(4)]
    assert 0.2 < starts.count(tok.user) / len(starts) < 0.8
    assert mixed.state_dict()["caption_prob"] == 0.5
    with pytest.raises(ValueError, match="caption_prob=0.5 but this loader has 1.0"):
        only_captions.load_state_dict(mixed.state_dict())


def test_vqa_data_without_captions_finds_images_by_id_and_names_what_it_skips(tmp_path, tok):
    (tmp_path / "train").mkdir()
    for image_id in (7, 42):
        solid(COLORS[image_id % 6]).save(tmp_path / "train" / f"COCO_train2014_{image_id:012d}.jpg")
    (tmp_path / "annotations").mkdir()
    asked = [(7, "what colour?", "red"), (42, "what colour?", "blue"), (99, "is it there?", "no")]
    files = (tmp_path / "annotations" / "v2_OpenEnded_mscoco_train2014_questions.json",)  # the official names
    files += (tmp_path / "annotations" / "v2_mscoco_train2014_annotations.json",)
    vqa.write_vqa(vqa_records(asked), *(p.with_name(p.name.replace("train2014", "train")) for p in files))
    packed = PackedSplit(prepare(tmp_path, "train", 16))
    assert packed.image_ids == [7, 42] and packed.captions == [[], []]
    assert [q["image_id"] for q in packed.qa] == [7, 42]
    manifest = json.loads((packed.dir / "manifest.json").read_text())
    assert manifest["result"]["skipped_questions"] == [
        f"question 1002: its image 99 is not packed from {tmp_path / 'train'}"
    ]
    batch = Loader(packed, tok, batch_size=2, max_len=20, task="chat").batch(0)
    assert (batch["input_ids"][:, 1] == tok.user).all()  # no captions: every image is shown with a chat
    with pytest.raises(ValueError, match="no caption"):
        Loader(packed, tok, batch_size=2, max_len=20, task="caption")


def test_batch_k_depends_only_on_seed_and_k_and_resumes_from_state(packed, tok):
    a = Loader(packed, tok, batch_size=4, max_len=12, seed=3)
    stream = iter(a)
    first = [next(stream) for _ in range(3)]
    state = a.state_dict()
    fourth = next(stream)
    b = Loader(packed, tok, batch_size=4, max_len=12, seed=3)
    b.load_state_dict(state)
    resumed = next(iter(b))
    for key in fourth:
        assert torch.equal(resumed[key], fourth[key])
        assert torch.equal(b.batch(1)[key], first[1][key])
    other = Loader(packed, tok, batch_size=4, max_len=12, seed=4)
    assert any(not torch.equal(other.batch(k)["input_ids"], a.batch(k)["input_ids"]) for k in range(3))
    with pytest.raises(ValueError, match="seed=3 but this loader has 4"):
        other.load_state_dict(state)


def test_ranks_slice_the_single_process_global_batch(packed, tok):
    single = Loader(packed, tok, batch_size=4, max_len=12, seed=1)
    ranks = [Loader(packed, tok, batch_size=2, max_len=12, seed=1, rank=r, world_size=2) for r in range(2)]
    for k in range(4):  # 6 images, global batch 4: batches 1 and 2 run across epoch boundaries
        for key in ("images", "input_ids", "targets"):
            assert torch.equal(torch.cat([r.batch(k)[key] for r in ranks]), single.batch(k)[key])


def test_each_epoch_visits_every_image_once_with_captions_changing(packed, tok):
    loader = Loader(packed, tok, batch_size=6, max_len=12)
    epochs = [loader.batch(k) for k in range(8)]  # one batch is exactly one epoch here
    for batch in epochs:
        assert len({tuple(img[:, 0, 0].tolist()) for img in batch["images"]}) == 6
    texts = [sorted(tok.decode(ids) for ids in batch["input_ids"].tolist()) for batch in epochs]
    assert len({tuple(t) for t in texts}) > 1


def test_first_caption_prob_one_always_picks_caption_zero(packed, tok):
    loader = Loader(packed, tok, batch_size=6, max_len=12, first_caption_prob=1.0)
    firsts = {c[0] for c in packed.captions}
    for k in range(3):
        for ids in loader.batch(k)["input_ids"].tolist():
            assert tok.decode([i for i in ids if i != tok.eot][1:]) in firsts


def test_text_task_visits_every_caption_once_per_epoch(packed, tok):
    n = sum(len(c) for c in packed.captions)
    loader = Loader(packed, tok, batch_size=n, max_len=12, task="text")
    ids = loader.batch(0)["input_ids"].tolist()
    texts = sorted(tok.decode([i for i in row if i != tok.eot][1:]) for row in ids)
    assert texts == sorted(c for caps in packed.captions for c in caps)


def test_text_pairs_read_another_caption_of_the_image_before_its_own(packed, tok):
    loader = Loader(packed, tok, batch_size=6, max_len=30, task="text", pairs=True, first_caption_prob=1.0)
    seen = set()
    for k in range(6):  # one batch is one epoch of the six images
        batch = loader.batch(k)
        rows = zip(batch["images"], batch["input_ids"].tolist(), batch["targets"].tolist(), strict=True)
        for image, ids, targets in rows:
            captions = packed.captions[_row_of(packed, image)]
            n = ids.index(tok.eot)
            firsts = [c for c in captions[1:] if tok.encode(c) + tok.encode(captions[0]) == ids[1:n]]
            assert len(firsts) == 1, "another caption of the same image, then its canonical one"
            seen.add(firsts[0])
            assert targets[:n] == ids[1:n] + [tok.eot] and set(targets[n:]) <= {-100}  # loss on both captions
    assert seen == {c for caps in packed.captions for c in caps[1:]}
    short = Loader(packed, tok, batch_size=6, max_len=8, task="text", pairs=True, first_caption_prob=1.0).batch(0)
    for image, ids, targets in zip(
        short["images"], short["input_ids"].tolist(), short["targets"].tolist(), strict=True
    ):
        whole = ids[:1] + [t for t in targets if t != -100]
        own = tok.encode(packed.captions[_row_of(packed, image)][0]) + [tok.eot]
        assert whole[-len(own) :] == own and len(whole) > len(own) + 1, "the first caption is cut, the caption kept"


def test_text_pairs_are_refused_outside_the_text_stage_and_on_resume_into_plain_text(packed, tok):
    with pytest.raises(ValueError, match="pairs=True puts one caption before another in task 'text'"):
        Loader(packed, tok, batch_size=2, max_len=12, task="caption", pairs=True)
    with pytest.raises(ValueError, match="text_pairs shapes the text stage's samples; stage 'full'"):
        TrainConfig(stage="full", text_pairs=True)
    paired = Loader(packed, tok, batch_size=6, max_len=12, task="text", pairs=True)
    plain = Loader(packed, tok, batch_size=6, max_len=12, task="text")
    with pytest.raises(ValueError, match="pairs=True but this loader has None"):  # all else the same
        plain.load_state_dict(paired.state_dict() | {"n_items": plain.n_items})
    with pytest.raises(ValueError, match="pairs=None but this loader has True"):
        paired.load_state_dict(plain.state_dict() | {"n_items": paired.n_items})


def test_the_text_stage_with_text_pairs_trains_on_pairs(packed, tok):
    run = RunConfig(train=TrainConfig(stage="text", text_pairs=True))
    loaders = make_loaders(run, tok, {run.data.train_split: packed, run.data.val_split: packed}, rank=0, world=1)
    assert all(loader.task == "text" and loader.pairs for loader in loaders)


def test_loader_benchmark_reports_samples_per_second(packed, tok):
    assert loader_benchmark(packed, tok, batch_size=4, max_len=12, batches=3) > 0


def test_data_vqa_cli_packs_each_split_and_says_what_it_skipped(tmp_path, capsys):
    from nanovlm.__main__ import main

    for split, ids in (("train2014", (1, 2)), ("val2014", (3,))):
        (tmp_path / split).mkdir()
        for image_id in ids:
            solid(COLORS[image_id]).save(tmp_path / split / f"COCO_{split}_{image_id:012d}.jpg")
        asked = [(i, "what colour?", "red") for i in ids] + [(40, "is it there?", "no")]  # image 40 is missing
        folder = tmp_path / "annotations"
        folder.mkdir(exist_ok=True)
        records = [r | {"question_id": r["question_id"] + 100 * len(ids)} for r in vqa_records(asked)]
        vqa.write_vqa(records, folder / f"v2_{split}_questions.json", folder / f"v2_{split}_annotations.json")
    main(["data", "vqa", "--root", str(tmp_path), "--image-size", "16"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["train2014", "val2014"]
    assert "2 images of 16px, 2 questions (2 with answers), 1 skipped" in lines[0]
    assert "1 images of 16px, 1 questions (1 with answers), 1 skipped" in lines[1]
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "vqa", "--root", str(tmp_path), "--splits", "test2015"])
    assert exit_info.value.code == 2
    assert "no test2015_questions.json" in capsys.readouterr().err
