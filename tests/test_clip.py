"""Behaviour of the contrastive dual encoder: the loss, its clamp and its gathering, encoding, save/load."""

import dataclasses
import datetime
import math
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from nanovlm.clip import CLIP, CLIPConfig, clip_logits, clip_loss
from nanovlm.decoder import DecoderConfig
from nanovlm.metrics import retrieval_recall_at_k
from nanovlm.projector import ProjectorConfig
from nanovlm.tokenizer import Tokenizer
from nanovlm.vit import ViTConfig
from nanovlm.vlm import VLM, VLMConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(["a red circle above a blue square", "two green triangles"] * 5, vocab_size=260)


def tiny_config(eot_id: int) -> CLIPConfig:
    return CLIPConfig(
        vit=ViTConfig(image_size=16, patch_size=4, dim=16, n_layers=2, n_heads=2),
        text=DecoderConfig(vocab_size=260, max_seq_len=24, dim=24, n_layers=2, n_heads=2),
        embed_dim=8,
        eot_id=eot_id,
    )


@pytest.fixture
def model(tokenizer) -> CLIP:
    torch.manual_seed(0)
    return CLIP(tiny_config(tokenizer.eot)).eval()


def unit_rows(*shape: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def reference_loss(images: torch.Tensor, texts: torch.Tensor, scale: float) -> float:
    """The docstring's equation with explicit loops and a log-softmax written out, in float64."""
    B = images.size(0)
    total = 0.0
    for a, b in ((images, texts), (texts, images)):
        for i in range(B):
            scores = [scale * float(a[i].double() @ b[j].double()) for j in range(B)]
            top = max(scores)
            log_sum = top + math.log(sum(math.exp(s - top) for s in scores))
            total -= scores[i] - log_sum  # -log softmax_j(scores)_i
    return total / (2 * B)


def test_clip_loss_matches_a_hand_written_reference():
    images, texts = unit_rows(6, 5, seed=1), unit_rows(6, 5, seed=2)
    log_scale = torch.tensor(math.log(1 / 0.07))
    expected = reference_loss(images, texts, 1 / 0.07)
    assert clip_loss(images, texts, log_scale).item() == pytest.approx(expected, rel=1e-5)


def test_clip_loss_is_symmetric_in_images_and_texts():
    images, texts = unit_rows(7, 4, seed=3), unit_rows(7, 4, seed=4)
    log_scale = torch.tensor(2.0)
    assert torch.allclose(clip_loss(images, texts, log_scale), clip_loss(texts, images, log_scale))


def test_logit_scale_is_clamped_where_it_is_used(model):
    x = unit_rows(4, 8, seed=5)
    log_scale = torch.tensor(10.0, requires_grad=True)  # exp(10) would scale the logits by about 22000
    logits, _ = clip_logits(x, x, log_scale, max_logit_scale=100.0)
    assert logits.max().item() == pytest.approx(100.0)  # cosine 1 on the diagonal, times the clamped scale
    clip_loss(x, x, log_scale).backward()
    assert log_scale.grad.item() == 0.0  # above the clamp the parameter gets no gradient to climb further
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    logits, _ = model(torch.rand(3, 3, 16, 16), torch.randint(0, 256, (3, 6)))
    assert logits.abs().max().item() <= model.cfg.max_logit_scale


def test_perfectly_aligned_batch_has_zero_loss_and_full_recall():
    emb = torch.eye(8, 16)[torch.randperm(8, generator=torch.Generator().manual_seed(0))]  # orthogonal unit rows
    loss = clip_loss(emb, emb.clone(), torch.tensor(math.log(100.0)))
    assert loss.item() < 1e-6
    recall = retrieval_recall_at_k((emb @ emb.T).numpy(), ks=(1,))
    assert recall == {"r@1": 1.0}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_loss_and_grads(rank: int, world: int, port: int, out: Path, images, texts, log_scale) -> None:
    """One process of the gather test: half the batch, clip_loss, backward, results written to out."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        B = images.size(0) // world
        img = images[rank * B : (rank + 1) * B].clone().requires_grad_()
        txt = texts[rank * B : (rank + 1) * B].clone().requires_grad_()
        scale = log_scale.clone().requires_grad_()
        loss = clip_loss(img, txt, scale)
        loss.backward()
        torch.save(
            {"loss": loss.detach(), "img": img.grad, "txt": txt.grad, "scale": scale.grad}, out / f"rank{rank}.pt"
        )
        dist.barrier()  # no rank tears the group down while another still talks to it
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_gathering_over_two_processes_equals_one_process_with_the_global_batch(tmp_path):
    world, B = 2, 4
    images, texts = unit_rows(world * B, 6, seed=6), unit_rows(world * B, 6, seed=7)
    log_scale = torch.tensor(2.5)
    mp.spawn(_rank_loss_and_grads, args=(world, _free_port(), tmp_path, images, texts, log_scale), nprocs=world)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]

    img, txt, scale = (t.clone().requires_grad_() for t in (images, texts, log_scale))
    loss = clip_loss(img, txt, scale)
    loss.backward()

    # Each rank's loss is the mean over its B rows of the global batch, so their mean is the global loss.
    assert torch.stack([r["loss"] for r in ranks]).mean().item() == pytest.approx(loss.item(), rel=1e-6)
    # With L = (1/W) Σ_r L_r, the gather's backward sums over ranks, so rank r's slice holds
    # Σ_r' ∂L_r'/∂x = W ∂L/∂x. DDP averages the parameter gradients over ranks, dividing by W: the
    # embedding gradients that reach the encoders are the one-process ones.
    for r, got in enumerate(ranks):
        rows = slice(r * B, (r + 1) * B)
        torch.testing.assert_close(got["img"] / world, img.grad[rows])
        torch.testing.assert_close(got["txt"] / world, txt.grad[rows])
    # the scale is the same parameter on every rank, not gathered: DDP's mean of ∂L_r/∂s is ∂L/∂s
    torch.testing.assert_close(torch.stack([r["scale"] for r in ranks]).mean(), scale.grad)


def test_encoders_give_unit_vectors_of_the_shared_width(model):
    images, ids = torch.rand(3, 3, 16, 16), torch.randint(0, 256, (3, 7))
    img, txt = model.encode_image(images), model.encode_text(ids)
    assert img.shape == (3, 8) and txt.shape == (3, 8)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(3))
    logits, loss = model(images, ids)
    assert logits.shape == (3, 3) and loss.ndim == 0


def test_text_vector_is_read_at_the_first_eot(model, tokenizer):
    eot = tokenizer.eot
    caption = tokenizer.encode("a red circle")
    ids = torch.tensor([caption + [eot, 5, 6, 7], caption + [eot, 9, eot, 8]])
    a, b = model.encode_text(ids)
    torch.testing.assert_close(a, b)  # what follows the first eot does not reach it through the causal mask
    cut = torch.tensor([caption + [5]])  # no eot: the last position stands for the row
    h = model.text.hidden(model.text.embed(cut))[:, -1]
    torch.testing.assert_close(model.encode_text(cut), F.normalize(model.text_proj(h), dim=-1))


def test_save_and_load_give_identical_embeddings(model, tokenizer, tmp_path):
    images, ids = torch.rand(2, 3, 16, 16), torch.randint(0, 256, (2, 5))
    model.save(tmp_path / "clip", tokenizer)
    loaded, tok = CLIP.load(tmp_path / "clip")
    assert loaded.cfg == model.cfg and tok.eot == tokenizer.eot
    assert torch.equal(loaded.encode_image(images), model.encode_image(images))
    assert torch.equal(loaded.encode_text(ids), model.encode_text(ids))
    assert torch.equal(loaded.logit_scale, model.logit_scale)
    assert sorted(p.name for p in (tmp_path / "clip").iterdir()) == sorted(
        ["config.json", "model.safetensors", "tokenizer.tiktoken"]
    )


def test_loading_the_other_kind_of_checkpoint_says_so_in_one_line(model, tokenizer, tmp_path):
    model.save(tmp_path / "clip", tokenizer)
    with pytest.raises(ValueError, match=r"config.json is a contrastive model \(CLIP\), not a captioner") as e:
        VLM.load(tmp_path / "clip")
    assert "\n" not in str(e.value)
    vlm = VLM(
        VLMConfig(
            vit=ViTConfig(image_size=16, patch_size=4, dim=16, n_layers=1, n_heads=2),
            projector=ProjectorConfig(in_dim=16, out_dim=24, pixel_shuffle=2),
            decoder=DecoderConfig(vocab_size=260, max_seq_len=12, dim=24, n_layers=1, n_heads=2),
        )
    )
    vlm.save(tmp_path / "vlm", tokenizer)
    with pytest.raises(ValueError, match=r"is a captioning model \(VLM\), not a contrastive one \(CLIP\)") as e:
        CLIP.load(tmp_path / "vlm")
    assert "\n" not in str(e.value) and "vlm/config.json" in str(e.value)


def test_wrong_image_size_and_empty_text_are_named(model):
    with pytest.raises(ValueError, match=r"16x16 pixels.*got shape \(1, 3, 32, 32\)"):
        model.encode_image(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"T >= 1, got shape \(2, 0\)"):
        model.encode_text(torch.zeros(2, 0, dtype=torch.long))


def test_config_rejects_an_eot_outside_the_vocabulary():
    with pytest.raises(ValueError, match="eot_id 300 is no token"):
        tiny_config(eot_id=300)


def test_clip_file_works_copied_alone_with_vit_and_decoder(tmp_path):
    for name in ("clip.py", "vit.py", "decoder.py"):
        shutil.copy(ROOT / "nanovlm" / name, tmp_path / name)
    code = """
        import sys, torch, clip
        cfg = clip.CLIPConfig(
            vit=clip.ViTConfig(image_size=16, patch_size=4, dim=16, n_layers=1, n_heads=2),
            text=clip.DecoderConfig(vocab_size=20, max_seq_len=8, dim=16, n_layers=1, n_heads=2),
            embed_dim=8, eot_id=19,
        )
        logits, loss = clip.CLIP(cfg)(torch.rand(2, 3, 16, 16), torch.randint(0, 20, (2, 5)))
        loss.backward()
        print(logits.shape, "nanovlm" in sys.modules)
    """
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "torch.Size([2, 2]) False"


def test_a_few_adamw_steps_lower_the_loss_on_a_fixed_batch(tokenizer):
    torch.manual_seed(0)
    model = CLIP(tiny_config(tokenizer.eot)).train()
    images = torch.rand(16, 3, 16, 16)
    ids = torch.randint(0, 256, (16, 8))  # distinct random captions, each ended by its eot
    ids[:, -1] = tokenizer.eot
    assert len({tuple(row) for row in ids.tolist()}) == 16
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(10):
        _, loss = model(images, ids)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses


def test_the_image_vector_pools_the_patch_vectors_by_max_or_mean(tokenizer):
    images = torch.rand(3, 3, 16, 16)
    for pool, reduce in (("max", lambda h: h.amax(dim=1)), ("mean", lambda h: h.mean(dim=1))):
        torch.manual_seed(0)
        model = CLIP(dataclasses.replace(tiny_config(tokenizer.eot), pool=pool)).eval()
        with torch.no_grad():
            expected = F.normalize(model.image_proj(reduce(model.vit(images))), dim=-1)
            torch.testing.assert_close(model.encode_image(images), expected)
    with pytest.raises(ValueError, match="pool must be 'max' or 'mean', got 'attention'"):
        dataclasses.replace(tiny_config(tokenizer.eot), pool="attention")
