"""Behaviour of the pictures: each is a titled Figure, saves a PNG, and shows exactly what the model computes."""

import json
import random

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from nanovlm import scenes, viz
from nanovlm.decoder import DecoderConfig
from nanovlm.evaluate import generate_captions
from nanovlm.projector import ProjectorConfig
from nanovlm.tokenizer import Tokenizer
from nanovlm.vit import ViTConfig, patchify
from nanovlm.vlm import VLM, VLMConfig

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    cfg = scenes.SceneConfig(image_size=32)
    return scenes.render(scenes.sample_scene(random.Random(0), cfg, 0), cfg)  # (32, 32, 3) uint8


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    rng = random.Random(0)
    cfg = scenes.SceneConfig(image_size=32)
    texts = [c for i in range(20) for c in scenes.captions(scenes.sample_scene(rng, cfg, i), rng, cfg.image_size)]
    return Tokenizer.train(texts, vocab_size=300)


@pytest.fixture(scope="module")
def model(tokenizer) -> VLM:
    torch.manual_seed(0)
    cfg = VLMConfig(
        vit=ViTConfig(image_size=32, patch_size=8, dim=32, n_layers=1, n_heads=2),
        projector=ProjectorConfig(in_dim=32, out_dim=32, pixel_shuffle=2),  # 4x4 patches -> 2x2 image tokens
        decoder=DecoderConfig(vocab_size=tokenizer.vocab_size, max_seq_len=24, dim=32, n_layers=2, n_heads=2),
    )
    return VLM(cfg).eval()


def assert_titled_png(fig, path) -> None:
    titles = [fig.get_suptitle()] + [ax.get_title() for ax in fig.axes]
    assert any(titles), "the figure has no title"
    assert path.read_bytes()[:8] == PNG_SIGNATURE


def test_show_patches_numbers_every_patch_and_saves_png(image, tmp_path):
    fig = viz.show_patches(image, 8, path=tmp_path / "patches.png")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.texts] == [str(i) for i in range(16)]
    assert ax.get_xlabel() and ax.get_ylabel()
    assert_titled_png(fig, tmp_path / "patches.png")


def test_show_patches_rejects_a_patch_size_that_does_not_divide_the_image(image):
    with pytest.raises(ValueError, match="does not cut into 5x5 patches"):
        viz.show_patches(image, 5)


def test_patch_grid_shows_exactly_the_patches_patchify_cuts(image, tmp_path):
    fig = viz.patch_grid(image, 8, path=tmp_path / "grid.png")
    pixels = torch.from_numpy(image).permute(2, 0, 1).float()[None] / 255  # as data.to_tensor reads it
    patches = patchify(pixels, 8)[0]  # (16, 8*8*3)
    shown = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title() for ax in shown] == [str(i) for i in range(16)]
    for ax, patch in zip(shown, patches, strict=True):
        np.testing.assert_allclose(ax.images[0].get_array(), patch.view(8, 8, 3).numpy(), atol=1e-6)
    assert_titled_png(fig, tmp_path / "grid.png")


def test_images_may_be_uint8_arrays_or_float_tensors(image):
    as_tensor = torch.from_numpy(image).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(viz.as_pixels(image), as_tensor)
    with pytest.raises(TypeError, match=r"\(H, W, 3\) uint8 array"):
        viz.as_pixels(image.astype(np.float32))


def test_attention_matrix_labels_queries_and_keys(tmp_path):
    weights = torch.rand(3, 5).softmax(dim=-1)
    fig = viz.attention_matrix(weights, list("abc"), list("vwxyz"), title="layer 0", path=tmp_path / "attn.png")
    ax = fig.axes[0]
    assert ax.get_title() == "layer 0" and ax.get_xlabel() and ax.get_ylabel()
    assert [t.get_text() for t in ax.get_xticklabels()] == list("vwxyz")
    assert_titled_png(fig, tmp_path / "attn.png")
    with pytest.raises(ValueError, match="labels_k has 2 labels for 5"):
        viz.attention_matrix(weights, labels_k=["a", "b"])
    with pytest.raises(ValueError, match="one \\(Tq, Tk\\) matrix"):
        viz.attention_matrix(torch.rand(2, 3, 5))


def test_word_attention_gives_one_map_per_layer_and_word_over_the_image_tokens(model, tokenizer, image):
    words, maps = viz.word_attention(model, tokenizer, image, max_new_tokens=6)
    assert 0 < len(words) <= 6
    assert "".join(words).strip() == generate_captions(model, tokenizer, image[None], max_new_tokens=6)[0]
    assert maps.shape == (2, len(words), 2, 2)  # (layers, words, g, g): 4 image tokens on a 2x2 grid
    assert (maps >= 0).all()
    assert (maps.sum(axis=(2, 3)) <= 1 + 1e-5).all()  # the rest of the attention went to the text
    assert all(not block.attn.keep_weights for block in model.decoder.blocks)


def test_plot_word_attention_titles_each_panel_with_its_word(model, tokenizer, image, tmp_path):
    words, maps = viz.word_attention(model, tokenizer, image, max_new_tokens=4)
    fig = viz.plot_word_attention(image, words, maps, layer=1, path=tmp_path / "words.png")
    titles = [ax.get_title() for ax in fig.axes if ax.images]
    assert titles == [repr(w.strip() or w) for w in words]
    assert "layer 1" in fig.get_suptitle()
    assert_titled_png(fig, tmp_path / "words.png")
    with pytest.raises(ValueError, match="pass word_attention's output"):
        viz.plot_word_attention(image, words[:-1], maps)


def test_caption_sheet_writes_caption_and_reference_under_each_image(image, tmp_path):
    images = np.stack([image] * 5)
    captions = [f"caption {i}" for i in range(5)]
    fig = viz.caption_sheet(images, captions, [f"truth {i}" for i in range(5)], path=tmp_path / "s.png", n=3)
    shown = [ax for ax in fig.axes if ax.images]
    assert len(shown) == 3
    assert [t.get_text() for t in shown[2].texts] == ["caption 2", "truth: truth 2"]
    assert_titled_png(fig, tmp_path / "s.png")
    with pytest.raises(ValueError, match="5 images, 4 captions"):
        viz.caption_sheet(images, captions[:4])


def test_plot_losses_draws_train_and_validation_curves(tmp_path):
    records = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0, "val_loss": 2.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    fig = viz.plot_losses(tmp_path / "metrics.jsonl", tmp_path / "loss.png")
    assert fig.axes[0].get_xlabel() == "step"
    assert_titled_png(fig, tmp_path / "loss.png")
