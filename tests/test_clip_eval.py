"""Behaviour of the CLIP evaluation: retrieval, zero-shot attributes and swapped captions, scored with stand-in
models whose right answers are known, the swapped captions checked against the scene records, and the CLI."""

import json
import re
import shutil
from collections import Counter
from types import SimpleNamespace

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nanovlm import clip_eval, metrics, scenes, viz
from nanovlm.__main__ import main
from nanovlm.clip import CLIP, CLIPConfig
from nanovlm.data import PackedSplit, prepare, to_tensor
from nanovlm.decoder import DecoderConfig
from nanovlm.loader import Loader
from nanovlm.projector import ProjectorConfig
from nanovlm.tokenizer import Tokenizer
from nanovlm.vit import ViTConfig
from nanovlm.vlm import VLM, VLMConfig


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def train(tiny_scenes) -> PackedSplit:
    return PackedSplit(tiny_scenes / "prepared" / "train_32")


@pytest.fixture(scope="module")
def val(tiny_scenes) -> PackedSplit:
    return PackedSplit(tiny_scenes / "prepared" / "val_32")


@pytest.fixture(scope="module")
def tokenizer(train) -> Tokenizer:
    return Tokenizer.train([c for refs in train.captions for c in refs], vocab_size=300)


class StandIn(nn.Module):
    """The two encoders of a CLIP, reading texts back through the tokenizer; subclasses say what they see."""

    def __init__(self, tokenizer: Tokenizer, max_seq_len: int = 512):
        super().__init__()
        self.tokenizer = tokenizer
        self.cfg = SimpleNamespace(text=SimpleNamespace(max_seq_len=max_seq_len))
        self.anchor = nn.Parameter(torch.zeros(0))  # tells embed_* the device

    def scale(self) -> torch.Tensor:
        return torch.tensor(100.0)

    def text_of(self, ids: torch.Tensor) -> list[str]:
        return [self.tokenizer.decode([t for t in row if t < self.tokenizer.eot]) for row in ids.tolist()]


class LookupModel(StandIn):
    """A perfect model of one split: image i is the one-hot of row i, a caption that of the first row it names."""

    def __init__(self, tokenizer: Tokenizer, split: PackedSplit):
        super().__init__(tokenizer)
        self.pixels = to_tensor(split.images)  # (N, 3, H, W)
        self.first_row = {}
        for row, refs in enumerate(split.captions):
            self.first_row.setdefault(refs[0], row)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        rows = [int((self.pixels == image).flatten(1).all(1).nonzero()[0]) for image in images]
        return F.one_hot(torch.tensor(rows), len(self.pixels)).float()

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        rows = [self.first_row[text] for text in self.text_of(ids)]
        return F.one_hot(torch.tensor(rows), len(self.pixels)).float()


PALETTE = torch.tensor(list(scenes.COLORS.values()), dtype=torch.float32) / 255  # (6, 3)


class ColourModel(StandIn):
    """Sees colour only: an image is its share of pixels near each scenes colour, a text its colour words."""

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        pixels = images.permute(0, 2, 3, 1).flatten(1, 2)  # (B, H*W, 3)
        distance = torch.cdist(pixels, PALETTE.expand(len(images), -1, -1))  # (B, H*W, 6)
        nearest = F.one_hot(distance.argmin(-1), len(PALETTE)).float() * (distance.min(-1).values < 0.2)[..., None]
        return F.normalize(nearest.sum(1), dim=-1)  # (B, 6)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        counts = [[text.lower().split().count(c) for c in scenes.COLORS] for text in self.text_of(ids)]
        return F.normalize(torch.tensor(counts, dtype=torch.float32), dim=-1)  # (B, 6)


class Recorder(StandIn):
    """Keeps the token rows it is given."""

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        self.ids = ids
        return torch.ones(len(ids), 1)


# ----------------------------------------------------------------------------- embeddings and retrieval


def test_embed_texts_tokenizes_as_training_does_and_pads_with_eot(tokenizer):
    model = Recorder(tokenizer, max_seq_len=6)
    clip_eval.embed_texts(model, tokenizer, ["A red circle.", "A small blue square at the top left."])
    short = [tokenizer.image, *tokenizer.encode("A red circle."), tokenizer.eot]
    assert model.ids[0, : len(short)].tolist() == short[:6]
    assert set(model.ids[0, len(short) :].tolist()) <= {tokenizer.eot}
    long = [tokenizer.image, *tokenizer.encode("A small blue square at the top left.")]
    assert model.ids.shape == (2, 6) and model.ids[1].tolist() == long[:6]  # cut to max_seq_len, as training cuts
    assert clip_eval.count_cut(model, tokenizer, ["A", "A small blue square at the top left."]) == 1


def test_perfect_model_retrieves_every_image_and_caption_first(tokenizer, val):
    result = clip_eval.retrieval(LookupModel(tokenizer, val), tokenizer, val)
    assert result["n"] == len(val) and result["n_duplicate_captions"] == result["n_cut"] == 0
    assert result["text_to_image"] == result["image_to_text"] == {"r@1": 1.0, "r@5": 1.0, "r@10": 1.0}
    assert result["chance"] == {f"r@{k}": k / len(val) for k in (1, 5, 10)}


def test_an_image_with_the_query_caption_counts_as_a_hit(tokenizer, val, tmp_path):
    copy = tmp_path / "val_32"
    shutil.copytree(val.dir, copy)
    index = json.loads((copy / "captions.json").read_text())
    index["captions"][1] = index["captions"][0]  # images 0 and 1 now share every caption
    (copy / "captions.json").write_text(json.dumps(index))
    split = PackedSplit(copy)
    model = LookupModel(tokenizer, split)
    sim = (
        clip_eval.embed_texts(model, tokenizer, [split.captions[1][0]])
        @ clip_eval.embed_images(model, split.images[:2]).T
    )
    assert sim.tolist() == [[1.0, 0.0]]  # caption 1 ranks image 0 above its own image 1
    result = clip_eval.retrieval(model, tokenizer, split)
    assert result["n_duplicate_captions"] == 2
    assert result["text_to_image"]["r@1"] == result["image_to_text"]["r@1"] == 1.0


# ----------------------------------------------------------------------------- zero-shot


def test_colour_only_model_reads_colour_perfectly_and_shape_and_size_at_chance(tokenizer, train):
    result = clip_eval.zero_shot(ColourModel(tokenizer), tokenizer, train)
    single = [s for s in train.scenes if len(s["objects"]) == 1]
    assert result["n"] == len(single) > 10
    assert result["color"]["accuracy"] == 1.0
    for attr in ("shape", "size"):
        truth = Counter(s["objects"][0][attr] for s in single)
        assert result[attr]["accuracy"] <= max(truth.values()) / len(single)  # no better than always guessing one
        assert result[attr]["chance"] == 1 / len(result[attr]["classes"])
        confusion = np.array(result[attr]["confusion"])
        assert confusion.sum(axis=1).tolist() == [truth[c] for c in result[attr]["classes"]]
    assert result["shape"]["classes"] == ["circle", "square", "triangle"]  # the split's shapes, no diamond


def test_prompts_name_every_value_and_average_over_the_others():
    classes = {"color": ["red", "blue"], "shape": ["circle", "square"], "size": ["small", "large"]}
    written = clip_eval.prompts(classes, ("A {size} {color} {shape} {where}.", "There is a {size} {color} {shape}."))
    assert len(written) == 8 * (9 + 1)
    assert ({"color": "red", "shape": "square", "size": "large"}, "A large red square at the top left.") in written
    assert Counter(v["color"] for v, _ in written) == {"red": 40, "blue": 40}


# ----------------------------------------------------------------------------- swapped captions


def _obj(shape: str, color: str, size: str, cx: float, cy: float, extent: float) -> dict:
    box = [cx - extent / 2, cy - extent / 2, cx + extent / 2, cy + extent / 2]
    return {"shape": shape, "color": color, "size": size, "cx": cx, "cy": cy, "bbox": box}


def test_swapped_captions_of_a_hand_made_scene_are_exactly_the_intended_ones():
    objects = [_obj("circle", "red", "small", 10, 30, 10), _obj("square", "blue", "large", 50, 32, 18)]
    out = clip_eval.swapped_captions(objects, 64, control_color="green", control_object=1)
    places = "on the left and a large blue square on the right."
    assert out == {
        "true": f"A small red circle {places} The small red circle is to the left of the large blue square.",
        "binding": "A large red square on the right and a small blue circle on the left. "
        "The large red square is to the right of the small blue circle.",
        "control": "A small red circle on the left and a large green square on the right. "
        "The small red circle is to the left of the large green square.",
        "relation": f"A small red circle {places} The large blue square is to the left of the small red circle.",
        "converse": f"A small red circle {places} The small red circle is to the right of the large blue square.",
    }


def _kinds(caption: str) -> Counter:
    parsed = scenes.parse_caption(caption)
    assert parsed["parsed"], caption
    return Counter((o["size"], o["color"], o["shape"]) for o in parsed["objects"] for _ in range(o["count"]))


def _grounded(scene: dict, caption: str) -> dict:
    return metrics.grounded_scores([scene], [scenes.parse_caption(caption)], scenes.relation_holds)


def test_swapped_captions_of_the_split_say_what_the_scene_records_predict(train):
    rows = [i for i, s in enumerate(train.scenes) if clip_eval._two_distinct(s["objects"])]
    size = clip_eval.drawn_size(train, rows)
    assert len(rows) >= 5 and size == 32
    with_relation = 0
    for i in rows:
        scene, (a, b) = train.scenes[i], train.scenes[i]["objects"]
        out = clip_eval.swapped_captions(scene["objects"], size, control_color="orange", control_object=0)
        assert out["true"] == train.captions[i][0]
        exchanged = {(a["size"], b["color"], a["shape"]), (b["size"], a["color"], b["shape"])}
        assert set(_kinds(out["binding"])) == exchanged != set(_kinds(out["true"]))
        assert _grounded(scene, out["binding"])["binding_errors"] == 2
        assert (a["size"], "orange", a["shape"]) in _kinds(out["control"]) or a["color"] == "orange"
        if "relation" in out:
            with_relation += 1
            assert _grounded(scene, out["true"])["relation_acc"] == 1.0
            for kind in ("relation", "converse"):
                assert out[kind].split(". ")[0] == out["true"].split(". ")[0]  # the objects and places are kept
                assert _kinds(out[kind]) == _kinds(out["true"])
                assert _grounded(scene, out[kind])["relation_acc"] == 0.0  # read back, the relation is false
            same_words = sorted(re.findall(r"\w+", out["relation"])) == sorted(re.findall(r"\w+", out["true"]))
            assert same_words  # the two objects exchanged, not a word changed
    assert with_relation >= 3


def test_swaps_on_a_split_packed_smaller_than_drawn_name_the_same_places(tiny_scenes, tmp_path):
    root = tmp_path / "scenes"
    shutil.copytree(tiny_scenes, root, ignore=shutil.ignore_patterns("prepared", "train", "test", "novel"))
    split = PackedSplit(prepare(root, "val", 16))  # the scenes were drawn at 32 px
    rows = [i for i, s in enumerate(split.scenes) if clip_eval._two_distinct(s["objects"])]
    size = clip_eval.drawn_size(split, rows)
    assert rows and size != 16
    for i in rows:
        objects = split.scenes[i]["objects"]
        assert clip_eval.swapped_captions(objects, size, "orange", 0) == clip_eval.swapped_captions(
            objects, 32, "orange", 0
        )


def test_colour_only_model_wins_the_control_and_cannot_tell_the_swaps(tokenizer, train):
    result = clip_eval.swaps(ColourModel(tokenizer), tokenizer, train)
    n = sum(clip_eval._two_distinct(s["objects"]) for s in train.scenes)
    assert result["n"] == result["binding"]["n"] == result["control"]["n"] == n
    assert 0 < result["relation"]["n"] == result["converse"]["n"] <= n
    assert result["control"]["accuracy"] == 1.0 and result["n_cut"] == 0
    for kind in ("binding", "relation", "converse"):  # the same colour words: equal similarity is no win
        assert result[kind]["accuracy"] == 0.0
    assert "swap" in clip_eval.format_clip_report(result)


# ----------------------------------------------------------------------------- a real (random) CLIP and the CLI


def small_clip_config(tokenizer: Tokenizer, patch_size: int) -> CLIPConfig:
    """A one-layer CLIP for the tiny 32 px scenes."""
    return CLIPConfig(
        vit=ViTConfig(image_size=32, patch_size=patch_size, dim=32, n_layers=1, n_heads=2),
        text=DecoderConfig(vocab_size=tokenizer.vocab_size, max_seq_len=96, dim=32, n_layers=1, n_heads=2),
        embed_dim=16,
        eot_id=tokenizer.eot,
    )


@pytest.fixture(scope="module")
def clip_dir(tokenizer, tmp_path_factory):
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("clip")
    CLIP(small_clip_config(tokenizer, patch_size=8)).save(directory, tokenizer)
    return directory


def _rates(summary: dict) -> list[float]:
    if summary["task"] == "retrieval":
        return [v for key in ("text_to_image", "image_to_text", "chance") for v in summary[key].values()]
    if summary["task"] == "zeroshot":
        return [summary[a][key] for a in clip_eval.ATTRIBUTES for key in ("accuracy", "chance")]
    return [summary[kind]["accuracy"] for kind in clip_eval.SWAPS]


def test_every_task_runs_on_a_random_clip(clip_dir, train):
    model, tok = CLIP.load(clip_dir)
    for task, evaluate in clip_eval.TASKS.items():
        summary = evaluate(model, tok, train)
        assert summary["task"] == task and summary["n"] > 0
        assert all(0 <= r <= 1 for r in _rates(summary)), summary
        assert clip_eval.format_clip_report(summary).count("\n") >= 3
    assert clip_eval.embed_images(model, train.images[:3]).shape == (3, 16)
    assert torch.allclose(clip_eval.embed_texts(model, tok, ["A red circle."]).norm(dim=-1), torch.ones(1))


def test_sheets_draw_the_similarity_matrix_and_the_nearest_images(clip_dir, val, tmp_path):
    model, tok = CLIP.load(clip_dir)
    fig = viz.similarity_sheet(model, tok, val, n=4)
    assert fig.axes[0].get_title() and len(fig.axes[0].get_yticklabels()) == 4
    viz.retrieve_sheet(model, tok, val, "A large red circle.", k=3, path=tmp_path / "nearest.png")
    assert (tmp_path / "nearest.png").read_bytes().startswith(b"\x89PNG")


def test_eval_cli_retrieval_prints_json_and_writes_both_sheets(clip_dir, tiny_scenes, tmp_path, capsys):
    sheet = tmp_path / "sim.png"
    args = ["eval", "--task", "retrieval", "--ckpt", str(clip_dir), "--data", str(tiny_scenes), "--limit", "12"]
    main([*args, "--json", "--sheet", str(sheet), "--query", "A small blue square."])
    summary = json.loads(capsys.readouterr().out)
    assert summary["n"] == 12 and set(summary["text_to_image"]) == {"r@1", "r@5", "r@10"}
    assert sheet.is_file() and (tmp_path / "sim_query.png").is_file()


@pytest.mark.parametrize("task", ["zeroshot", "swaps"])
def test_eval_cli_prints_a_table_for_the_clip_tasks(task, clip_dir, tiny_scenes, capsys):
    main(["eval", "--task", task, "--ckpt", str(clip_dir), "--data", str(tiny_scenes), "--split", "train"])
    out = capsys.readouterr().out
    assert out.startswith(f"CLIP {task} on the first 128 'train' images")
    assert "accuracy" in out and "chance" in out


@pytest.fixture(scope="module")
def captioner_dir(tokenizer, tmp_path_factory):
    cfg = VLMConfig(
        vit=ViTConfig(image_size=32, patch_size=8, dim=32, n_layers=1, n_heads=2),
        projector=ProjectorConfig(in_dim=32, out_dim=32, pixel_shuffle=2),
        decoder=DecoderConfig(vocab_size=tokenizer.vocab_size, max_seq_len=24, dim=32, n_layers=1, n_heads=2),
    )
    directory = tmp_path_factory.mktemp("captioner")
    VLM(cfg).save(directory, tokenizer)
    return directory


def test_a_captioner_checkpoint_with_a_clip_task_is_a_one_line_error(captioner_dir, tiny_scenes, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--task", "zeroshot", "--ckpt", str(captioner_dir), "--data", str(tiny_scenes)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert err.startswith("error: eval --task zeroshot") and str(captioner_dir) in err


def test_query_without_retrieval_and_sheet_is_refused(clip_dir, tiny_scenes, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--task", "swaps", "--ckpt", str(clip_dir), "--data", str(tiny_scenes), "--query", "A circle."])
    assert exit_info.value.code == 2 and "--query" in capsys.readouterr().err


def test_a_briefly_trained_clip_reads_colour_zero_shot_far_above_chance(tokenizer, train):
    torch.manual_seed(0)
    model = CLIP(small_clip_config(tokenizer, patch_size=4)).train()
    loader = Loader(train, tokenizer, batch_size=32, max_len=96, first_caption_prob=1.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for k in range(150):  # enough for every seed tried to read colour; shape takes far longer
        batch = loader.batch(k)
        _, loss = model(batch["images"], batch["input_ids"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    result = clip_eval.zero_shot(model, tokenizer, train)
    assert result["color"]["accuracy"] >= 3 * result["color"]["chance"], result["color"]
    assert result["size"]["accuracy"] >= 1.3 * result["size"]["chance"], result["size"]
