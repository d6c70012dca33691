"""Ask an instruction-tuned model several questions about one image, in one conversation.

    python -m nanovlm ask IMAGE "what colour is the circle?" "how many shapes are there?" --ckpt DIR

A conversation is one growing sequence, laid out as the instruct stage trained it:

    [image tokens] <|image|> <|user|> question 1 <|assistant|> answer 1 <|endoftext|> <|user|> question 2 ...

Every position attends only to the positions before it, so the keys and values of the image and of the
turns already asked never change when a new question is appended. `Chat` keeps them in one KVCache for the
whole conversation: the image is encoded once, on the first question, and each later question costs the
decoder work of its own tokens and its answer's, however long the conversation before it.
"""

import argparse
from pathlib import Path

import torch

from .config import device, positive_int
from .decoder import KVCache
from .tokenizer import Tokenizer
from .vlm import VLM


class Chat:
    """A conversation about one image: each ask() appends a turn and greedily generates its answer.

    Without a cache, answering question k would re-run the decoder over the image tokens and all k - 1
    earlier turns before producing a single token of the new answer. Here those positions' keys and values
    are already in self.cache, so the first step of a turn runs only the turn's own prompt tokens (plus the
    end token that closed the previous answer), and each further step runs one token. The answers are the
    same as recomputing the whole sequence at every step (tests/test_chat.py checks it).
    """

    def __init__(self, model: VLM, tokenizer: Tokenizer, image: torch.Tensor) -> None:
        if image.dim() == 3:
            image = image[None]
        if image.dim() != 4 or image.size(0) != 1:
            raise ValueError(f"a chat is about one image of shape (3, H, W) or (1, 3, H, W), got {tuple(image.shape)}")
        self.model, self.tok, self.image = model, tokenizer, image  # image: (1, 3, H, W) in [0, 1]
        cfg = model.cfg.decoder
        self.cache = KVCache(cfg.n_layers, cfg.max_seq_len)
        self.n_image = model.cfg.n_image_tokens  # positions the image takes in the sequence (0 with cross fusion)
        self.image_vectors: torch.Tensor | None = None  # image_tokens(image), computed at the first question
        # every text token of the conversation, fed to the decoder or not yet: the last token of each answer
        # (its end token, or its last token when max_new_tokens cut it) waits for the next turn to be fed
        self.tokens: list[int] = [tokenizer.image]

    @torch.no_grad()
    def ask(self, question: str, max_new_tokens: int = 8) -> str:
        """Append the question as the next turn and return the model's greedy answer to it."""
        if not question.strip():
            raise ValueError("the question is empty; ask something about the image")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        turn = [self.tok.user, *self.tok.encode(question), self.tok.assistant]
        self._check_room(len(turn), max_new_tokens)
        self.tokens += turn
        answer = self._generate(max_new_tokens)
        self.tokens += [*answer, self.tok.eot]  # an answer cut short is closed too, as every trained one was
        return self.tok.decode(answer).strip()  # answers were trained with a leading space

    def _check_room(self, turn: int, max_new_tokens: int) -> None:
        """ValueError unless a turn of `turn` tokens and an answer of max_new_tokens fit after the conversation."""
        limit = self.model.cfg.decoder.max_seq_len
        used = self.n_image + len(self.tokens)
        if used + turn + max_new_tokens > limit:
            raise ValueError(
                f"the conversation is longer than the model's context ({limit} positions): the image and the "
                f"turns so far take {used}, this question {turn} more and its answer up to {max_new_tokens}; "
                "ask fewer or shorter questions, or allow shorter answers"
            )

    def _generate(self, max_new_tokens: int) -> list[int]:
        """Greedy answer tokens (without the end token), feeding the decoder only what the cache lacks."""
        model, decoder = self.model, self.model.decoder
        device = next(model.parameters()).device
        if self.image_vectors is None:  # the first question: the image is read once for the whole chat
            self.image_vectors = model.image_tokens(self.image.to(device))
        fed = max(self.cache.pos - self.n_image, 0)  # text tokens already in the cache
        x = decoder.embed(torch.tensor([self.tokens[fed:]], device=device))  # (1, T_new, D)
        if self.cache.pos == 0:  # prefix and early fusion: the image goes in front, once
            x = model.sequence(self.image_vectors, x)  # (1, N_img + T_new, D)
        answer = []
        for _ in range(max_new_tokens):
            h = model.hidden(x, self.image_vectors, self.cache)  # continues after cache.pos and moves it on
            nxt = int(decoder.head(h[:, -1]).float().argmax(dim=-1))  # the most likely next token
            if nxt == self.tok.eot:
                break
            answer.append(nxt)
            x = decoder.embed(torch.tensor([[nxt]], device=device))  # (1, 1, D): only the new token
        return answer


def training_stage(directory: str | Path) -> str | None:
    """The stage recorded in directory/trainer.pt, or None when the folder holds no readable one.

    The trainer saves its TrainConfig (stage included) next to the weights of every checkpoint it writes;
    a folder written by VLM.save alone has none. trainer.pt only serves to resume training, so a damaged one
    does not stop a model from answering: it only leaves the stage unknown.
    """
    from .trainer import load_trainer_state  # the training machinery only when a checkpoint holds its state

    path = Path(directory) / "trainer.pt"
    if not path.is_file():
        return None
    try:
        return str(load_trainer_state(path, "cpu")["train_config"]["stage"])
    except ValueError:
        return None


# ----------------------------------------------------------------------------- command line


def add_parser(sub) -> None:
    """Register `ask`: questions about one image, answered in one conversation."""
    p = sub.add_parser(
        "ask",
        help="ask an instruction-tuned model questions about an image",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("image", help="an image file (any format Pillow reads)")
    p.add_argument("questions", nargs="+", metavar="question", help="asked in order, in one conversation")
    p.add_argument("--ckpt", required=True, help="a saved instruction-tuned model folder, e.g. runs/instruct/best")
    p.add_argument("--max-new-tokens", type=positive_int, default=8, help="longest answer, in tokens")
    p.add_argument("--device", type=device, default="cpu")


def run(args) -> None:
    """Load the image and the model, ask every question in one chat, print each question and its answer."""
    from .data import load_image, resize_image, to_tensor

    for question in args.questions:
        if not question.strip():
            raise ValueError("one of the questions is empty (''); ask something about the image")
    if Path(args.image).is_dir():
        raise ValueError(f"{args.image} is a directory, not an image file; name one image file")
    picture = load_image(args.image)  # a bad file fails before the model loads
    model, tok = VLM.load(args.ckpt, device=args.device)
    stage = training_stage(args.ckpt)
    if stage is not None and stage != "instruct":
        raise ValueError(
            f"{args.ckpt} was trained for captions only (stage {stage!r}), not to answer questions; "
            "instruction-tune it first with python -m nanovlm train --preset instruct"
        )
    pixels = resize_image(picture, model.cfg.vit.image_size)[None]  # (1, H, W, 3)
    chat = Chat(model, tok, to_tensor(pixels, args.device))
    for question in args.questions:
        answer = chat.ask(question, args.max_new_tokens)
        print(f"Q: {question}\nA: {answer}", flush=True)
