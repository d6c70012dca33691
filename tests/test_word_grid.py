"""A text stage whose 'image' is a grid of words: the loader's map, the model's reading of it, the refusals, a run."""

import json

import pytest
import torch
from test_data import _row_of
from test_fusion import tiny_config
from test_pipeline import SMALL_MODEL, cli

from nanovlm.config import DataConfig, RunConfig, TrainConfig
from nanovlm.data import PackedSplit
from nanovlm.loader import Loader
from nanovlm.pipeline import load_tokenizer, make_loaders
from nanovlm.vlm import VLM


@pytest.fixture(scope="module")
def split(tiny_scenes) -> PackedSplit:
    return PackedSplit(tiny_scenes / "prepared" / "train_32")


@pytest.fixture(scope="module")
def tok(tiny_scenes, split):
    return load_tokenizer(DataConfig(root=str(tiny_scenes), vocab_size=300), split)


def test_each_object_s_words_sit_in_the_cell_of_its_centre_and_the_caption_is_the_canonical_one(split, tok):
    side, n = 4, len(split)
    batch = Loader(split, tok, batch_size=n, max_len=400, task="text", grid=side, first_caption_prob=1.0).batch(0)
    assert batch["words"].shape[:2] == (n, side * side)
    seen = set()
    for image, ids, words in zip(batch["images"], batch["input_ids"].tolist(), batch["words"], strict=True):
        row = _row_of(split, image)
        seen.add(row)
        expected = {}
        for obj in split.scenes[row]["objects"]:
            cell = int(obj["cy"] * side / 32) * side + int(obj["cx"] * side / 32)
            expected.setdefault(cell, []).extend(tok.encode(f" {obj['size']} {obj['color']} {obj['shape']}"))
        for cell in range(side * side):
            assert [i for i in words[cell].tolist() if i >= 0] == expected.get(cell, []), (row, cell)
        text = tok.decode([i for i in ids[1 : ids.index(tok.eot)]])
        assert text == split.captions[row][0]
    assert seen == set(range(n)), "one epoch is every image once"


def test_the_model_reads_the_grid_as_the_sum_of_each_cell_s_word_embeddings():
    model = VLM(tiny_config("prefix")).eval()  # 4 image tokens
    words = torch.tensor([[[5, 9], [-1, -1], [7, -1], [3, 3]]])  # (1, 4, 2)
    ids = torch.tensor([[1, 2, 3]])
    embed = model.decoder.embed
    by_hand = torch.stack([embed(torch.tensor(5)) + embed(torch.tensor(9)), torch.zeros(48), embed(torch.tensor(7)),
                           2 * embed(torch.tensor(3))])[None]  # fmt: skip
    x = torch.cat([by_hand, embed(ids)], dim=1)
    expected = model.decoder.head(model.decoder.hidden(x)[:, -3:])
    logits, _ = model(None, ids, words=words)
    torch.testing.assert_close(logits, expected)
    with pytest.raises(ValueError, match=r"words of shape \(1, 3, 2\) stand in for the image tokens.*has 4 of them"):
        model(None, ids, words=words[:, :3])
    with pytest.raises(ValueError, match="a model with cross fusion has 0 of them"):
        VLM(tiny_config("cross"))(None, ids, words=words)


def test_a_grid_is_refused_where_it_means_nothing(tiny_scenes, split, tok, tmp_path):
    with pytest.raises(ValueError, match="grid=4 lays words out for the text stage"):
        Loader(split, tok, batch_size=2, max_len=40, task="caption", grid=4)
    with pytest.raises(ValueError, match="text_grid shapes the text stage's samples; stage 'align'"):
        TrainConfig(stage="align", text_grid=True)
    with pytest.raises(ValueError, match="text_grid and text_pairs are two ways"):
        TrainConfig(stage="text", text_grid=True, text_pairs=True)
    run = RunConfig(train=TrainConfig(stage="text", text_grid=True))
    run.model.fusion = "cross"
    run.finalize(vocab_size=tok.vocab_size)
    with pytest.raises(ValueError, match=r"--text-grid lays words out .* \(cross fusion, 0 image tokens\) has none"):
        make_loaders(run, tok, {"train": split, "val": split}, rank=0, world=1)
    no_scenes = tmp_path / "plain"
    no_scenes.mkdir()
    for name in ("images.npy", "captions.json"):
        (no_scenes / name).write_bytes((split.dir / name).read_bytes())
    with pytest.raises(ValueError, match=r"plain has no scene records \(scenes.json\)"):
        Loader(PackedSplit(no_scenes), tok, batch_size=2, max_len=40, task="text", grid=4)
    gridded = Loader(split, tok, batch_size=4, max_len=40, task="text", grid=4)
    plain = Loader(split, tok, batch_size=4, max_len=40, task="text", first_caption_prob=1.0)
    with pytest.raises(ValueError, match="loader state has grid=None but this loader has 4"):
        gridded.load_state_dict(plain.state_dict() | {"n_items": gridded.n_items})


def test_the_text_stage_trains_on_the_grid_and_alignment_starts_from_it(tiny_scenes, tmp_path):
    text, aligned = tmp_path / "text", tmp_path / "aligned"
    common = ["--data", tiny_scenes, "--batch-size", 8, "--eval-every", 10, "--first-caption-prob", 1, *SMALL_MODEL]
    cli("train", "--stage", "text", "--text-grid", "true", "--max-steps", 30, "--lr", 3e-3, "--no-report",
        "--out", text, *common)  # fmt: skip
    val = [json.loads(line)["val_loss"] for line in open(text / "metrics.jsonl") if "val_loss" in line]
    assert len(val) == 3 and val[-1] < val[0] - 0.5, val
    cli("train", "--stage", "align", "--init-from", text / "best", "--max-steps", 2, "--no-report",
        "--out", aligned, *common)  # fmt: skip
    assert (aligned / "best" / "model.safetensors").is_file()
