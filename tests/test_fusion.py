"""The three ways to join an image to the text (prefix, cross, early): each builds, generates, saves and loads,
and cross-attention with shut gates is exactly the text-only language model."""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from nanovlm import bench
from nanovlm.chat import Chat
from nanovlm.config import TrainConfig, apply_overrides, get_preset
from nanovlm.cross_attention import CrossAttentionConfig, GatedCrossAttentionBlock, PerceiverResampler, regions
from nanovlm.decoder import Decoder, DecoderConfig
from nanovlm.pipeline import start_from
from nanovlm.projector import ProjectorConfig
from nanovlm.tokenizer import Tokenizer
from nanovlm.trainer import Trainer
from nanovlm.vit import ViTConfig
from nanovlm.vlm import FUSIONS, VLM, VLMConfig

ROOT = Path(__file__).resolve().parents[1]
V = 280  # the smallest vocabulary a byte-level tokenizer allows, and a few merges
TOK = Tokenizer.train(["what colour is it?", "how many?", "a red circle"] * 3, vocab_size=V)


def tiny_config(fusion: str, vocab_size: int = V, every: int = 1, regions: bool = False) -> VLMConfig:
    """regions: cross fusion as the scenes preset has it, the resampler reading 2 x 2 merged patches into
    latents that start from the image's regions."""
    vit = ViTConfig(image_size=32, patch_size=8, dim=32, n_layers=1, n_heads=4)
    in_dim = vit.patch_size**2 * 3 if fusion == "early" else vit.dim
    cross = CrossAttentionConfig(vision_dim=32, dim=48, n_heads=4, n_latents=5, every=every)
    if regions:
        cross = CrossAttentionConfig(vision_dim=32 * 4, dim=48, n_heads=4, n_latents=4, every=every, pixel_shuffle=2,
                                     region_latents=True)  # fmt: skip
    return VLMConfig(
        vit=vit,
        projector=ProjectorConfig(in_dim=in_dim, out_dim=48, pixel_shuffle=2),
        decoder=DecoderConfig(vocab_size=vocab_size, max_seq_len=40, dim=48, n_layers=3, n_heads=4),
        fusion=fusion,
        cross=cross,
    )


def tiny_model(fusion: str, vocab_size: int = V, every: int = 1, regions: bool = False) -> VLM:
    torch.manual_seed(0)
    model = VLM(tiny_config(fusion, vocab_size, every, regions)).eval()
    if fusion == "cross":  # open the gates, so that the image changes what the text computes
        for block in model.xattn:
            block.attn_gate.data.fill_(0.7)
            block.mlp_gate.data.fill_(-0.4)
    return model


def test_each_fusion_has_its_own_parts_and_sequence():
    shapes = {}
    for fusion in FUSIONS:
        model = tiny_model(fusion)
        assert {name for name, _ in model.named_children()} == set(model.cfg.parts)
        shapes[fusion] = tuple(model.image_tokens(torch.rand(2, 3, 32, 32)).shape)
    assert model.cfg.parts == ("projector", "decoder")  # early: no vision tower
    assert shapes == {"prefix": (2, 4, 48), "early": (2, 4, 48), "cross": (2, 5, 48)}  # 16 patches / 2^2, 5 latents
    assert tiny_config("cross").n_image_tokens == 0 and tiny_config("early").n_image_tokens == 4


@pytest.mark.parametrize("every", [1, 2])
def test_shut_gates_give_exactly_the_text_only_decoder(every):
    torch.manual_seed(0)
    model = VLM(tiny_config("cross", every=every)).eval()  # gates start at 0
    assert len(model.xattn) == (3 if every == 1 else 2)
    ids = torch.randint(V, (2, 9))
    with_image, _ = model(torch.rand(2, 3, 32, 32), ids)
    text_only, _ = model(None, ids)
    decoder = Decoder(model.cfg.decoder)
    decoder.load_state_dict(model.decoder.state_dict())
    assert torch.equal(with_image, text_only)
    assert torch.equal(with_image, decoder(ids))
    # and the image does reach the text once a gate opens
    model.xattn[0].attn_gate.data.fill_(0.5)
    assert not torch.allclose(model(torch.rand(2, 3, 32, 32), ids)[0], text_only)


def test_at_step_zero_cross_attention_trains_from_the_text_models_loss():
    # the Flamingo recipe: a decoder trained on text, frozen; only the resampler and the gated layers learn
    model = VLM(tiny_config("cross"))
    ids, targets = torch.randint(V, (4, 9)), torch.randint(V, (4, 9))
    images = torch.rand(4, 3, 32, 32)
    _, text_loss = model(None, ids, targets)
    _, loss = model(images, ids, targets)
    assert abs(loss.item() - text_loss.item()) < 1e-6
    loss.backward()
    gates = [p.grad for block in model.xattn for p in (block.attn_gate, block.mlp_gate)]
    assert all(g is not None for g in gates) and any(g.abs() > 0 for g in gates)  # the gates are what moves first
    assert all(p.grad is None or not p.grad.any() for p in model.xattn[0].attn.parameters())


def test_resampler_gives_the_same_number_of_latents_for_any_number_of_patches():
    resampler = PerceiverResampler(CrossAttentionConfig(vision_dim=12, dim=16, n_heads=2, n_latents=6))
    for n in (1, 7, 64):
        assert resampler(torch.randn(3, n, 12)).shape == (3, 6, 16)


def test_region_latents_start_from_the_image_regions_and_so_know_where_things_are():
    # 16 features of a 4 x 4 grid pooled onto 2 x 2 regions: region 0 is the top left 2 x 2 square
    features = torch.randn(2, 16, 8)
    grid = features.view(2, 4, 4, 8)
    assert torch.allclose(regions(features, 4)[:, 0], grid[:, :2, :2].mean((1, 2)), atol=1e-6)
    assert torch.allclose(regions(features, 4)[:, 3], grid[:, 2:, 2:].mean((1, 2)), atol=1e-6)
    assert torch.equal(regions(features, 16), features)  # one latent per feature: each starts as its own
    # learned latents read the features as a set, so swapping two patches changes nothing; region latents see it
    torch.manual_seed(0)
    swapped = features[:, [15, *range(1, 15), 0]]
    for region_latents, moved in ((False, False), (True, True)):
        cfg = CrossAttentionConfig(vision_dim=8, dim=16, n_heads=2, n_latents=4, region_latents=region_latents)
        resampler = PerceiverResampler(cfg)
        assert (not torch.allclose(resampler(features), resampler(swapped), atol=1e-5)) == moved
    with pytest.raises(ValueError, match=r"region latents need features on a square grid of patches; got 7"):
        resampler(torch.randn(1, 7, 8))
    with pytest.raises(ValueError, match=r"n_latents 8 is not a square"):
        CrossAttentionConfig(n_latents=8, region_latents=True)


def test_cross_pixel_shuffle_merges_patches_before_the_resampler():
    model = tiny_model("cross", regions=True)  # 4 x 4 patches merged 2 x 2: the resampler reads 4 features
    seen = []
    model.resampler.in_proj.register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    assert model.image_tokens(torch.rand(2, 3, 32, 32)).shape == (2, 4, 48)
    assert seen == [(2, 4, 32 * 4)]


def test_gated_block_is_the_identity_with_shut_gates():
    block = GatedCrossAttentionBlock(CrossAttentionConfig(vision_dim=16, dim=16, n_heads=2))
    x = torch.randn(2, 5, 16)
    assert torch.equal(block(x, torch.randn(2, 3, 16)), x)


@pytest.mark.parametrize("fusion", [*FUSIONS, "cross-regions"])
def test_cached_generation_equals_recomputation(fusion):
    model = tiny_model(fusion.removesuffix("-regions"), regions=fusion.endswith("-regions"))
    images, prompt = torch.rand(3, 3, 32, 32), torch.randint(V, (3, 2))
    cached = model.generate(images, prompt, 12, eot=-1)
    assert cached == model.generate(images, prompt, 12, eot=-1, use_cache=False)
    assert all(len(row) == 12 for row in cached)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_a_chat_with_its_cache_answers_as_recomputation_does(fusion):
    questions, tok = ["what colour is it?", "how many?"], TOK
    model, image = tiny_model(fusion), torch.rand(3, 32, 32)
    conversation = Chat(model, tok, image)
    answers = [conversation.ask(q, max_new_tokens=4) for q in questions]
    tokens, expected = [tok.image], []
    for q in questions:
        tokens += [tok.user, *tok.encode(q), tok.assistant]
        (answer,) = model.generate(image[None], torch.tensor([tokens]), 4, eot=tok.eot, use_cache=False)
        tokens += [*answer, tok.eot]
        expected.append(tok.decode(answer).strip())
    assert answers == expected


@pytest.mark.parametrize("fusion", [*FUSIONS, "cross-regions"])
def test_save_and_load_rebuild_the_same_fusion(fusion, tmp_path):
    model = tiny_model(fusion.removesuffix("-regions"), regions=fusion.endswith("-regions"))
    tok = TOK
    model.save(tmp_path / "m", tok)
    loaded, _ = VLM.load(tmp_path / "m")
    assert loaded.cfg == model.cfg and loaded.cfg.fusion == fusion.removesuffix("-regions")
    images, ids = torch.rand(2, 3, 32, 32), torch.randint(V, (2, 6))
    assert torch.equal(loaded(images, ids)[0], model(images, ids)[0])


def test_a_folder_saved_before_fusions_existed_loads_as_prefix(tmp_path):
    model = tiny_model("prefix")
    tok = TOK
    model.save(tmp_path / "m", tok)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    del config["fusion"], config["cross"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    loaded, _ = VLM.load(tmp_path / "m")
    assert loaded.cfg.fusion == "prefix"


def test_fusion_flag_builds_each_model_and_checks_its_components():
    for fusion in FUSIONS:
        run = apply_overrides(get_preset("scenes"), {"fusion": fusion})
        assert run.model.fusion == fusion
    cross = apply_overrides(get_preset("scenes"), {"fusion": "cross", "cross-n-latents": "9", "cross-every": "2"})
    assert cross.model.decoder.max_seq_len == cross.data.max_text_len  # the image takes no positions
    early = apply_overrides(get_preset("scenes"), {"fusion": "early"})
    assert early.model.projector.in_dim == 4 * 4 * 3  # raw patches of the preset's 4 px
    with pytest.raises(ValueError, match=r"^--fusion late: fusion 'late' is unknown; choose one of prefix, cross"):
        apply_overrides(get_preset("scenes"), {"fusion": "late"})
    with pytest.raises(ValueError, match=r"train names xattn, which a model with prefix fusion does not have"):
        apply_overrides(get_preset("scenes"), {"train": "xattn"})
    with pytest.raises(ValueError, match=r"^--cross-n-latents 8: region_latents lay the latents on a square grid"):
        apply_overrides(get_preset("scenes"), {"fusion": "cross", "cross-n-latents": "8"})
    with pytest.raises(ValueError, match=r"^--cross-pixel-shuffle 3: pixel_shuffle 3 does not divide the patch grid"):
        apply_overrides(get_preset("scenes"), {"fusion": "cross", "cross-pixel-shuffle": "3"})
    with pytest.raises(ValueError, match=r"--cross-dim 64: --decoder-dim sets it"):
        apply_overrides(get_preset("scenes"), {"fusion": "cross", "cross-dim": "64"})


def test_align_trains_the_bridge_of_each_fusion():
    trainable = {}
    for fusion in FUSIONS:
        model = tiny_model(fusion)
        Trainer(model, None, None, None, TrainConfig(stage="align", out="unused"))
        trainable[fusion] = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"prefix": {"projector"}, "early": {"projector"}, "cross": {"resampler", "xattn"}}


def test_a_checkpoint_of_one_fusion_is_refused_with_flags_of_another(tmp_path):
    tok = TOK
    tiny_model("prefix").save(tmp_path / "prefix", tok)
    with pytest.raises(ValueError, match=r"it holds a model with prefix fusion, this run builds one with cross fusion"):
        start_from(tiny_model("cross"), str(tmp_path / "prefix"))

    class Unread:  # a loader that has handed out no batch yet
        def state_dict(self) -> dict:
            return {}

    cfg = TrainConfig(out=str(tmp_path / "run"))
    Trainer(tiny_model("prefix"), tok, Unread(), None, cfg).save("last")
    trainer = Trainer(tiny_model("cross"), tok, Unread(), None, cfg)
    with pytest.raises(ValueError, match=r"holds a model with prefix fusion, this run builds cross; give --fusion"):
        trainer.resume(tmp_path / "run" / "last")


@pytest.mark.parametrize("fusion", [*FUSIONS, "cross-regions"])
def test_flop_count_equals_torchs_count_of_a_forward_pass(fusion):
    cfg = tiny_config(fusion.removesuffix("-regions"), every=2, regions=fusion.endswith("-regions"))
    model, T = VLM(cfg), 7
    # the math backend writes attention as matmuls, which the counter sees (the fused kernel it does not count)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(torch.rand(1, 3, 32, 32), torch.randint(V, (1, T)))
    assert bench.model_flops_per_sample(cfg, T) == 3 * counter.get_total_flops()  # backward = 2 x forward


def test_bench_train_puts_the_families_side_by_side(capsys):
    bench.cli(["train", "--preset", "tiny", "--fusion", "prefix,cross,early", "--steps", "1", "--warmup", "0",
               "--batch-size", "2", "--threads", "1", "--json"])  # fmt: skip
    rows = json.loads(capsys.readouterr().out)["train"]
    assert [r["fusion"] for r in rows] == ["prefix", "cross", "early"]
    assert all(r["samples_per_s"] > 0 and 0 < r["mfu"] for r in rows)
    assert rows[1]["decoder_positions"] == rows[1]["text_len"] < rows[0]["decoder_positions"]
    with pytest.raises(SystemExit):
        bench.cli(["train", "--fusion", "prefix,late"])


def test_cross_attention_file_works_copied_alone(tmp_path):
    shutil.copy(ROOT / "nanovlm" / "cross_attention.py", tmp_path)
    code = """
        import torch, cross_attention as ca
        cfg = ca.CrossAttentionConfig(vision_dim=8, dim=16, n_heads=2, n_latents=3)
        latents = ca.PerceiverResampler(cfg)(torch.randn(2, 10, 8))
        print(ca.GatedCrossAttentionBlock(cfg)(torch.randn(2, 4, 16), latents).shape)
    """
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "torch.Size([2, 4, 16])"


def test_early_fusion_refuses_images_of_the_wrong_size():
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, 32, 32\), got \(1, 3, 16, 16\)"):
        tiny_model("early").image_tokens(torch.rand(1, 3, 16, 16))


def test_cross_attention_maps_reach_the_patch_grid():
    from nanovlm.viz import word_attention

    model = tiny_model("cross")
    image = (torch.rand(32, 32, 3) * 255).to(torch.uint8).numpy()
    words, maps = word_attention(model, TOK, image, max_new_tokens=4)
    assert maps.shape == (len(model.xattn), len(words), 4, 4)  # one map per gated layer, on the 4 x 4 patch grid
    # each word's weights over the latents sum to 1, and each latent gives part of its weight to the other latents
    assert ((maps.sum(axis=(2, 3)) > 0) & (maps.sum(axis=(2, 3)) <= 1 + 1e-5)).all()
    # with region latents a word's weights on the latents are its map: 4 latents, the image's 2 x 2 regions
    words, maps = word_attention(tiny_model("cross", regions=True), TOK, image, max_new_tokens=4)
    assert maps.shape == (3, len(words), 2, 2) and np.allclose(maps.sum(axis=(2, 3)), 1, atol=1e-5)


def test_the_trainer_logs_the_gates_and_plot_gates_draws_them(tmp_path):
    from nanovlm.bench import Cycle
    from nanovlm.viz import plot_gates

    g = torch.Generator().manual_seed(0)
    batch = {
        "images": torch.rand(4, 3, 32, 32, generator=g),
        "input_ids": torch.randint(V, (4, 6), generator=g),
        "targets": torch.randint(V, (4, 6), generator=g),
    }

    class Batches(Cycle):
        def state_dict(self) -> dict:
            return {}

    for fusion in ("cross", "prefix"):
        cfg = TrainConfig(max_steps=3, log_every=1, eval_every=100, warmup_steps=0, out=str(tmp_path / fusion))
        Trainer(VLM(tiny_config(fusion)), TOK, Batches([batch]), Batches([batch]), cfg).fit()
    records = [json.loads(line) for line in (tmp_path / "cross" / "metrics.jsonl").read_text().splitlines()]
    gates = [r["gates"] for r in records if "gates" in r]
    assert len(gates) == 3 and all(len(g) == 3 for g in gates) and gates[-1] != [0.0, 0.0, 0.0]  # opened at step 1
    assert len(plot_gates(tmp_path / "cross" / "metrics.jsonl").axes[0].lines) == 3 + 1  # a line per layer, and 0
    with pytest.raises(ValueError, match="has no gate values: it is not the log of a model with cross fusion"):
        plot_gates(tmp_path / "prefix" / "metrics.jsonl")


def test_a_prefix_folder_saved_before_fusions_still_matches_the_run_that_made_it(tmp_path):
    # the scenes preset now carries cross settings of its own; for a prefix model they build nothing
    run = get_preset("scenes")
    run.finalize(vocab_size=V)
    model = VLM(run.model)
    model.save(tmp_path / "m", TOK)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    del config["fusion"], config["cross"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    start_from(VLM(run.model), str(tmp_path / "m"), TOK)  # refused before: "another configuration"
    assert VLM.load(tmp_path / "m")[0].cfg == run.model
    cross = apply_overrides(get_preset("scenes"), {"fusion": "cross"}).model
    other = apply_overrides(get_preset("scenes"), {"fusion": "cross", "cross-n-latents": "9"}).model
    assert cross != other  # for cross fusion the settings do count
