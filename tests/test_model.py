"""Behaviour of the model components: shapes, masks, KV cache, loss, gradients, save/load, copyability."""

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from nanovlm.decoder import Decoder, DecoderConfig, KVCache
from nanovlm.projector import ProjectorConfig, pixel_shuffle
from nanovlm.vit import ViT, ViTConfig, patchify
from nanovlm.vlm import IGNORE, VLM, VLMConfig, sample_next

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(vocab_size: int = 97, pixel_shuffle: int = 2) -> VLMConfig:
    return VLMConfig(
        vit=ViTConfig(image_size=32, patch_size=8, dim=32, n_layers=2, n_heads=4),
        projector=ProjectorConfig(in_dim=32, out_dim=48, pixel_shuffle=pixel_shuffle),
        decoder=DecoderConfig(vocab_size=vocab_size, max_seq_len=40, dim=48, n_layers=2, n_heads=4),
    )


@pytest.fixture
def model() -> VLM:
    torch.manual_seed(0)
    return VLM(tiny_config()).eval()


def test_patchify_orders_patches_row_by_row():
    img = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    patches = patchify(img, 4)  # (2, 4, 48)
    assert patches.shape == (2, 4, 48)
    # patch 1 is the top-right 4x4 square; its first value is pixel (0, 4) of channel 0
    assert patches[0, 1, 0] == img[0, 0, 0, 4]
    # within a patch the channels vary fastest: (p1 p2 c)
    assert patches[0, 0, 1] == img[0, 1, 0, 0]


def test_pixel_shuffle_merges_neighbouring_squares():
    x = torch.arange(16, dtype=torch.float32).view(1, 16, 1)  # a 4x4 grid of 1-wide tokens
    y = pixel_shuffle(x, 2)
    assert y.shape == (1, 4, 4)
    assert y[0, 0].tolist() == [0, 1, 4, 5]  # the top-left 2x2 square
    assert y[0, 1].tolist() == [2, 3, 6, 7]
    with pytest.raises(ValueError, match="square grid"):
        pixel_shuffle(torch.zeros(1, 12, 1), 2)


def test_shapes_through_every_component(model):
    cfg = model.cfg
    images = torch.rand(3, 3, 32, 32)
    feats = model.vit(images)
    assert feats.shape == (3, 16, 32)
    tokens = model.projector(feats)
    assert tokens.shape == (3, 4, 48) and cfg.n_image_tokens == 4
    ids = torch.randint(0, 97, (3, 11))
    logits, loss = model(images, ids)
    assert logits.shape == (3, 11, 97) and loss is None
    assert model.decoder(ids).shape == (3, 11, 97)


def test_bad_image_shape_is_named():
    vit = ViT(ViTConfig(image_size=32, patch_size=8, dim=32, n_layers=1, n_heads=4))
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, 32, 32\)"):
        vit(torch.rand(1, 3, 28, 28))


def test_mismatched_configs_are_rejected():
    with pytest.raises(ValueError, match="projector maps"):
        VLMConfig(vit=ViTConfig(dim=64), projector=ProjectorConfig(in_dim=128, out_dim=128))
    with pytest.raises(ValueError, match="not a multiple"):
        ViTConfig(image_size=60, patch_size=8)


def test_causal_mask_blocks_the_future(model):
    torch.manual_seed(0)
    images = torch.rand(1, 3, 32, 32)
    ids = torch.randint(0, 97, (1, 12))
    logits, _ = model(images, ids)
    for t in (0, 5, 10):
        changed = ids.clone()
        changed[0, t + 1] = (changed[0, t + 1] + 1) % 97
        logits2, _ = model(images, changed)
        torch.testing.assert_close(logits2[:, : t + 1], logits[:, : t + 1])
        assert not torch.allclose(logits2[:, t + 1 :], logits[:, t + 1 :])


def test_image_changes_the_text_logits(model):
    ids = torch.randint(0, 97, (2, 5))
    a, _ = model(torch.zeros(2, 3, 32, 32), ids)
    b, _ = model(torch.ones(2, 3, 32, 32), ids)
    assert not torch.allclose(a, b)


def test_decoder_kv_cache_matches_full_forward_in_chunks():
    torch.manual_seed(0)
    cfg = DecoderConfig(vocab_size=50, max_seq_len=32, dim=32, n_layers=2, n_heads=4)
    dec = Decoder(cfg).eval()
    ids = torch.randint(0, 50, (2, 20))
    full = dec(ids)
    cache = KVCache(cfg.n_layers, cfg.max_seq_len)
    parts = [dec(ids[:, :7], cache), dec(ids[:, 7:12], cache)] + [dec(ids[:, t : t + 1], cache) for t in range(12, 20)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.pos == 20  # the cache moved itself on after each call
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        dec(torch.zeros(2, 13, dtype=torch.long), cache)


def test_kv_cache_decoding_matches_full_recomputation(model):
    torch.manual_seed(1)
    images = torch.rand(3, 3, 32, 32)
    prompt = torch.tensor([[5, 6], [7, 8], [9, 10]])
    eot = 96
    cached = model.generate(images, prompt, max_new_tokens=20, eot=eot)
    recomputed = model.generate(images, prompt, max_new_tokens=20, eot=eot, use_cache=False)
    assert cached == recomputed
    assert all(len(row) > 0 for row in cached)
    # logits of the cached path equal those of one full forward over the generated sequence
    seq = torch.cat([prompt[:1], torch.tensor([cached[0]])], dim=1)
    full_logits, _ = model(images[:1], seq)
    cache = KVCache(model.cfg.decoder.n_layers, model.cfg.decoder.max_seq_len)
    h = model.decoder.hidden(torch.cat([model.image_tokens(images[:1]), model.decoder.embed(prompt[:1])], 1), cache)
    step_logits = [model.decoder.head(h[:, -1])]
    for tok in cached[0][:-1]:
        h = model.decoder.hidden(model.decoder.embed(torch.tensor([[tok]])), cache)
        step_logits.append(model.decoder.head(h[:, -1]))
    torch.testing.assert_close(
        torch.stack(step_logits, 1), full_logits[:, 1 : 1 + len(cached[0])], atol=1e-5, rtol=1e-5
    )


def test_generation_stops_at_eot(model):
    # make eot the most likely token everywhere by biasing the head
    with torch.no_grad():
        model.decoder.tok_embed.weight[3] = model.decoder.ln_f.weight * 0 + 5.0
        model.decoder.ln_f.bias.fill_(1.0)
    out = model.generate(torch.rand(2, 3, 32, 32), torch.tensor([[1], [2]]), 10, eot=3)
    assert out == [[], []]


def test_loss_ignores_padding_and_prompt(model):
    torch.manual_seed(0)
    images = torch.rand(2, 3, 32, 32)
    ids = torch.randint(0, 97, (2, 10))
    targets = torch.randint(0, 97, (2, 10))
    targets[0, 6:] = IGNORE  # padding
    targets[1, :3] = IGNORE  # prompt
    logits, loss = model(images, ids, targets)
    keep = targets != IGNORE
    expected = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(loss, expected)
    # changing an ignored target does not change the loss
    targets2 = targets.clone()
    targets2[0, 7] = IGNORE
    assert torch.equal(model(images, ids, targets2)[1], loss)


def test_gradients_reach_every_parameter(model):
    model.train()
    images = torch.rand(2, 3, 32, 32)
    ids = torch.randint(0, 97, (2, 8))
    _, loss = model(images, ids, torch.randint(0, 97, (2, 8)))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_text_only_forward_skips_the_image(model):
    ids = torch.randint(0, 97, (2, 8))
    logits, _ = model(None, ids)
    torch.testing.assert_close(logits, model.decoder(ids))


def test_sampling_strategies():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert sample_next(logits[:1]).item() == 1
    top_k = sample_next(logits, temperature=1.0, top_k=2, generator=g)
    assert set(top_k.tolist()) == {1, 3}
    # softmax([0,3,1,2]) = [.03, .64, .09, .24]: top_p=0.7 keeps tokens 1 and 3
    top_p = sample_next(logits, temperature=1.0, top_p=0.7, generator=g)
    assert set(top_p.tolist()) == {1, 3}
    hot = sample_next(logits, temperature=100.0, generator=g)
    assert set(hot.tolist()) == {0, 1, 2, 3}


def test_save_load_gives_identical_outputs(tmp_path):
    from nanovlm.tokenizer import Tokenizer

    tok = Tokenizer.train(["a red circle", "two blue squares"] * 5, vocab_size=270)
    model = VLM(tiny_config(vocab_size=tok.vocab_size)).eval()  # load() checks the two agree
    model.save(tmp_path / "m", tok)
    loaded, tok2 = VLM.load(tmp_path / "m")
    images = torch.rand(2, 3, 32, 32)
    ids = torch.randint(0, 97, (2, 6))
    assert torch.equal(model(images, ids)[0], loaded(images, ids)[0])
    assert tok2.encode("a red circle") == tok.encode("a red circle")
    assert not any(p.suffix in (".pt", ".pkl", ".bin") for p in (tmp_path / "m").iterdir())
    (tmp_path / "m" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        VLM.load(tmp_path / "m")


def test_loading_weights_that_do_not_fit_says_why(model, tmp_path):
    from safetensors.torch import load_file, save_file

    from nanovlm.tokenizer import Tokenizer

    model.save(tmp_path / "m", Tokenizer.train(["a red circle"] * 5, vocab_size=260))
    weights = load_file(tmp_path / "m" / "model.safetensors")
    extra = {**weights, "vit.patch_embed.bias": torch.zeros(model.cfg.vit.dim)}  # a tensor the model has no place for
    save_file(extra, tmp_path / "m" / "model.safetensors")
    with pytest.raises(ValueError, match=r"config.json: missing \[\], unexpected \['vit.patch_embed.bias'\]"):
        VLM.load(tmp_path / "m")
    save_file({k: v for k, v in weights.items() if k != "vit.pos_embed"}, tmp_path / "m" / "model.safetensors")
    with pytest.raises(ValueError, match=r"does not fit its config.json: missing \['vit.pos_embed'\]"):
        VLM.load(tmp_path / "m")


COPY_CHECKS = {
    "attention.py": "m = attention.MultiHeadAttention(16, 2); "
    "print(m(torch.randn(1, 5, 16), causal=True, cache=attention.KVCache(1, 8)).shape)",
    "vit.py": "m = vit.ViT(vit.ViTConfig(image_size=16, patch_size=4, dim=16, n_layers=1, n_heads=2)); "
    "print(m(torch.rand(1, 3, 16, 16)).shape)",
    "projector.py": "m = projector.Projector(projector.ProjectorConfig(16, 8, pixel_shuffle=2)); "
    "print(m(torch.randn(1, 16, 16)).shape)",
    "decoder.py": "m = decoder.Decoder(decoder.DecoderConfig(vocab_size=20, max_seq_len=8, dim=16, n_heads=2)); "
    "print(m(torch.zeros(1, 4, dtype=torch.long), decoder.KVCache(m.cfg.n_layers, 8)).shape)",
}


@pytest.mark.parametrize("name", sorted(COPY_CHECKS))
def test_component_file_works_copied_alone(name, tmp_path):
    shutil.copy(ROOT / "nanovlm" / name, tmp_path / name)
    module = name.removesuffix(".py")
    code = f"import torch, {module}\n{COPY_CHECKS[name]}"
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("torch.Size")
