"""The ask command's conversation: a KV cache kept across turns gives the answers of a full recomputation."""

import argparse

import pytest
import torch

from nanovlm import chat
from nanovlm.chat import Chat
from nanovlm.decoder import DecoderConfig
from nanovlm.projector import ProjectorConfig
from nanovlm.tokenizer import Tokenizer
from nanovlm.vit import ViTConfig
from nanovlm.vlm import VLM, VLMConfig

QUESTIONS = ["what colour is the circle?", "how many shapes?", "is the square left of the circle?"]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(QUESTIONS + ["red green blue yes no one two three"] * 3, vocab_size=300)


def tiny_model(tokenizer: Tokenizer, max_seq_len: int = 96) -> VLM:
    torch.manual_seed(0)
    cfg = VLMConfig(
        vit=ViTConfig(image_size=32, patch_size=8, dim=32, n_layers=2, n_heads=4),
        projector=ProjectorConfig(in_dim=32, out_dim=48, pixel_shuffle=2),
        decoder=DecoderConfig(vocab_size=tokenizer.vocab_size, max_seq_len=max_seq_len, dim=48, n_layers=2, n_heads=4),
    )
    return VLM(cfg).eval()


@pytest.fixture
def model(tokenizer) -> VLM:
    model = tiny_model(tokenizer)
    # A random model almost never picks the end token; raising its score where one hidden feature is above 1
    # makes some answers end early and others run to max_new_tokens, so both ways a turn closes are tested.
    # The change depends on the hidden state alone, so a cached and an uncached run see the same scores.
    head = model.decoder.head

    def head_that_sometimes_ends(h: torch.Tensor) -> torch.Tensor:
        logits = head(h)
        logits[..., tokenizer.eot] += 4 * (h[..., 4] - 1)
        return logits

    model.decoder.head = head_that_sometimes_ends
    return model


@pytest.fixture
def image() -> torch.Tensor:
    return torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(1))  # (3, H, W)


def recompute_without_cache(model, tok, image, questions, max_new_tokens) -> tuple[list[int], list[list[int]]]:
    """The conversation's tokens and the answers' tokens when every step re-runs the whole sequence."""
    tokens, answers = [tok.image], []
    for question in questions:
        tokens += [tok.user, *tok.encode(question), tok.assistant]
        prompt = torch.tensor([tokens])
        (answer,) = model.generate(image[None], prompt, max_new_tokens, eot=tok.eot, use_cache=False)
        tokens += [*answer, tok.eot]
        answers.append(answer)
    return tokens, answers


def test_cached_answers_match_recomputing_the_whole_sequence(model, tokenizer, image):
    conversation = Chat(model, tokenizer, image)
    answers = [conversation.ask(q, max_new_tokens=5) for q in QUESTIONS]
    tokens, expected = recompute_without_cache(model, tokenizer, image, QUESTIONS, 5)
    assert conversation.tokens == tokens
    assert answers == [tokenizer.decode(ids).strip() for ids in expected]
    # both ways a turn closes are covered: an end token chosen by the model, and an answer cut at 5 tokens
    lengths = {len(ids) for ids in expected}
    assert 5 in lengths and min(lengths) < 5


def test_image_is_encoded_once_for_the_whole_conversation(model, tokenizer, image):
    calls = []
    encode = model.image_tokens
    model.image_tokens = lambda images: calls.append(images.shape) or encode(images)
    conversation = Chat(model, tokenizer, image[None])  # (1, 3, H, W) works as well as (3, H, W)
    for question in QUESTIONS:
        conversation.ask(question)
    assert calls == [(1, 3, 32, 32)]


def test_later_questions_run_only_their_own_tokens(model, tokenizer, image):
    conversation = Chat(model, tokenizer, image)
    conversation.ask(QUESTIONS[0], max_new_tokens=3)
    seen = []
    hidden = model.decoder.hidden
    model.decoder.hidden = lambda x, cache=None: seen.append(x.size(1)) or hidden(x, cache)
    conversation.ask(QUESTIONS[1], max_new_tokens=3)
    turn = 1 + len(tokenizer.encode(QUESTIONS[1])) + 1  # <|user|> question <|assistant|>
    assert seen[0] in (turn + 1, turn + 2)  # plus what closed the last answer: its end token, or a cut word too
    assert set(seen[1:]) <= {1}


def test_a_conversation_longer_than_the_context_is_refused(tokenizer, image):
    conversation = Chat(tiny_model(tokenizer, max_seq_len=32), tokenizer, image)
    conversation.ask(QUESTIONS[1])  # 4 image tokens, <|image|>, a 15-token turn and 8 answer tokens fit in 32
    before = list(conversation.tokens)
    with pytest.raises(ValueError, match=r"longer than the model's context \(32 positions\).*fewer or shorter"):
        conversation.ask(QUESTIONS[0])
    assert conversation.tokens == before  # nothing of the refused question was added


def test_empty_question_is_refused(model, tokenizer, image):
    with pytest.raises(ValueError, match="question is empty"):
        Chat(model, tokenizer, image).ask("  ")


def test_more_than_one_image_is_refused(model, tokenizer):
    with pytest.raises(ValueError, match="one image"):
        Chat(model, tokenizer, torch.rand(2, 3, 32, 32))


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m nanovlm")
    chat.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["ask", *argv])


@pytest.fixture
def saved(tokenizer, tmp_path):
    directory = tmp_path / "ckpt"
    tiny_model(tokenizer).save(directory, tokenizer)
    return directory


def test_ask_prints_each_question_and_its_answer(saved, tmp_path, capsys):
    from PIL import Image

    Image.new("RGB", (40, 30), "red").save(tmp_path / "red.png")
    chat.run(parse(str(tmp_path / "red.png"), *QUESTIONS[:2], "--ckpt", str(saved)))
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4
    assert lines[0] == f"Q: {QUESTIONS[0]}" and lines[2] == f"Q: {QUESTIONS[1]}"
    assert lines[1].startswith("A:") and lines[3].startswith("A:")


def test_ask_names_a_corrupt_image_in_one_line(saved, tmp_path):
    # main() prints these errors as "error: ..." and exits with code 2
    bad = tmp_path / "x.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises((ValueError, OSError)) as error:
        chat.run(parse(str(bad), "what colour?", "--ckpt", str(saved)))
    assert str(bad) in str(error.value) and "\n" not in str(error.value)


def write_trainer_state(directory, stage: str) -> None:
    """A trainer.pt as Trainer.save writes it, as far as training_stage reads it."""
    keys = ("step", "best_val", "samples_seen", "optimizer", "loader", "rng_cpu", "rng_cuda")
    state = {**dict.fromkeys(keys, 0), "train_config": {"stage": stage, "optimizer": "adamw"}}
    torch.save(state, directory / "trainer.pt")


def test_ask_refuses_a_checkpoint_trained_for_captions_only(saved, tmp_path, capsys):
    from PIL import Image

    Image.new("RGB", (32, 32), "blue").save(tmp_path / "blue.png")
    args = parse(str(tmp_path / "blue.png"), "what colour?", "--ckpt", str(saved))
    assert chat.training_stage(saved) is None  # saved by VLM.save alone: the stage is not recorded
    write_trainer_state(saved, "full")
    with pytest.raises(ValueError, match="trained for captions only.*--preset instruct"):
        chat.run(args)
    write_trainer_state(saved, "instruct")
    chat.run(args)
    assert capsys.readouterr().out.startswith("Q: what colour?\nA:")
    torch.save({"step": 1, "train_config": {"stage": "full"}}, saved / "trainer.pt")
    assert chat.training_stage(saved) is None  # not a whole trainer state: the stage is unknown


def test_ask_reports_a_missing_checkpoint_folder(tmp_path):
    from PIL import Image

    Image.new("RGB", (32, 32), "blue").save(tmp_path / "blue.png")
    with pytest.raises(FileNotFoundError, match="missing"):
        chat.run(parse(str(tmp_path / "blue.png"), "what colour?", "--ckpt", str(tmp_path / "nowhere")))
