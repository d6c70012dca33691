"""Batches for training: token rows and images drawn from a prepared split, deterministic and resumable.

`Loader` turns a `data.PackedSplit` (images packed in a memory map, captions and question/answer pairs) into
batches of images, input ids and targets. Batch k is a pure function of (seed, k), so a resumed run only
needs the step it stopped at to see the very batches it would have seen.
"""

import time

import numpy as np
import torch

from .data import PackedSplit

TASKS = ("caption", "qa", "text")


def _pack_tokens(seqs: list[list[int]], width: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Sequences cut to `width` in a (n, width) table padded with `pad`, and their kept lengths."""
    table = np.full((len(seqs), width), pad, dtype=np.int32)
    lengths = np.empty(len(seqs), dtype=np.int64)
    for row, seq in enumerate(seqs):
        seq = seq[:width]
        table[row, : len(seq)] = seq
        lengths[row] = len(seq)
    return table, lengths


class Loader:
    """Deterministic, resumable batches from a PackedSplit, forever (epoch after epoch).

    An item is an image ("caption": one of its captions drawn at random, anew each epoch), a caption
    ("text": every caption once per epoch; the batch carries its image too, which the model ignores),
    or a question/answer pair ("qa"). Epoch e visits the items in the order of a permutation drawn from
    np.random.default_rng((seed, e)); the stream of all epochs is cut into global batches of
    batch_size * world_size items that run across epoch boundaries (nothing is dropped), and rank r
    gets the r-th slice. Batch k is therefore a pure function of (seed, k).

    Token layout: the sequence is <|image|> caption <|endoftext|> (or <|image|><|user|> question
    <|assistant|> answer <|endoftext|>); input_ids are its first T tokens, targets the next T, with -100
    on padding and on the question part. first_caption_prob, if set, is the chance of drawing caption 0
    (scenes put the canonical caption first); the others share the rest evenly.
    """

    def __init__(
        self,
        split: PackedSplit,
        tokenizer,
        batch_size: int,
        max_len: int,
        task: str = "caption",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        first_caption_prob: float | None = None,
    ):
        if task not in TASKS:
            raise ValueError(f"task={task!r}; use one of {TASKS}")
        if not 0 <= rank < world_size or batch_size < 1 or max_len < 2:
            raise ValueError(
                f"need 0 <= rank < world_size, batch_size >= 1, max_len >= 2 (got rank={rank}, "
                f"world_size={world_size}, batch_size={batch_size}, max_len={max_len})"
            )
        if first_caption_prob is not None and not 0.0 <= first_caption_prob <= 1.0:
            raise ValueError(f"first_caption_prob={first_caption_prob} must be in [0, 1] (or None: uniform)")
        self.split, self.task, self.seed = split, task, seed
        self.batch_size, self.max_len, self.rank, self.world_size = batch_size, max_len, rank, world_size
        self.first_caption_prob = first_caption_prob
        self.step = 0
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        if task == "qa":
            self._tokenize_qa(tokenizer)
        else:
            self._tokenize_captions(tokenizer)
        self.n_items = len(self.item_rows)
        if self.n_items == 0:
            raise ValueError(f"{split.dir} has nothing to load for task={task!r}")

    def _tokenize_captions(self, tok) -> None:
        """One token row per caption: <|image|> caption <|endoftext|>."""
        counts = np.array([len(c) for c in self.split.captions], dtype=np.int64)
        if (counts == 0).any():
            raise ValueError(f"{self.split.dir}: image {self.split.image_ids[int(np.argmin(counts))]!r} has no caption")
        flat = [c for caps in self.split.captions for c in caps]
        seqs = [[tok.image, *ids, tok.eot] for ids in tok.encode_batch(flat)]
        self.tokens, self.lengths = _pack_tokens(seqs, self.max_len + 1, tok.eot)
        self.prompt_lengths = np.ones(len(seqs), dtype=np.int64)  # just <|image|>
        self.first_caption = np.cumsum(counts) - counts  # token row of each image's caption 0
        self.caption_counts = counts
        if self.task == "caption":  # items are images; their caption is drawn per epoch
            self.item_rows = np.arange(len(counts))
        else:  # items are captions
            self.item_rows = np.repeat(np.arange(len(counts)), counts)

    def _tokenize_qa(self, tok) -> None:
        """One token row per QA pair: <|image|><|user|> question <|assistant|> answer <|endoftext|>."""
        qa = self.split.qa
        if not qa:
            raise ValueError(f"{self.split.dir} has no question/answer pairs (scenes_*.json); use task='caption'")
        questions = tok.encode_batch([q["question"] for q in qa])
        answers = tok.encode_batch([str(q["answer"]) for q in qa])
        seqs = [[tok.image, tok.user, *q, tok.assistant, *a, tok.eot] for q, a in zip(questions, answers, strict=True)]
        self.tokens, self.lengths = _pack_tokens(seqs, self.max_len + 1, tok.eot)
        self.prompt_lengths = np.array([3 + len(q) for q in questions], dtype=np.int64)
        self.item_rows = np.array([self.split.row_of_id[q["image_id"]] for q in qa], dtype=np.int64)

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(order of items, token row of each item) for one epoch; the last two epochs are cached."""
        if epoch not in self._epochs:
            rng = np.random.default_rng((self.seed, epoch))
            order = rng.permutation(self.n_items)
            if self.task == "caption":
                self._epochs[epoch] = (
                    order,
                    self.first_caption + self._draw_captions(rng.random(self.n_items)),
                )
            else:
                self._epochs[epoch] = (order, np.arange(self.n_items))
            if len(self._epochs) > 2:  # forget the epoch computed longest ago
                del self._epochs[next(iter(self._epochs))]
        return self._epochs[epoch]

    def _draw_captions(self, u: np.ndarray) -> np.ndarray:
        """Caption index per image from uniforms u in [0, 1): uniform, or 0 with first_caption_prob."""
        n = self.caption_counts
        p = self.first_caption_prob
        if p is None:
            return np.minimum((u * n).astype(np.int64), n - 1)
        if p >= 1.0:
            return np.zeros_like(n)
        rest = 1 + ((u - p) / (1 - p) * (n - 1)).astype(np.int64)  # uniform over captions 1..n-1
        return np.where((u < p) | (n == 1), 0, np.minimum(rest, n - 1))

    def batch(self, k: int) -> dict[str, torch.Tensor]:
        """This rank's slice of global batch k."""
        start = k * self.batch_size * self.world_size + self.rank * self.batch_size
        epochs, offsets = np.divmod(np.arange(start, start + self.batch_size), self.n_items)
        token_rows = np.empty(self.batch_size, dtype=np.int64)
        image_rows = np.empty(self.batch_size, dtype=np.int64)
        for epoch in np.unique(epochs):
            order, rows = self._epoch(int(epoch))
            here = epochs == epoch
            items = order[offsets[here]]
            token_rows[here], image_rows[here] = rows[items], self.item_rows[items]

        seq = self.tokens[token_rows].astype(np.int64)  # (B, T+1)
        positions = np.arange(self.max_len)  # target position t predicts seq[t + 1]
        targets = seq[:, 1:].copy()  # (B, T)
        length, prompt = self.lengths[token_rows, None], self.prompt_lengths[token_rows, None]  # (B, 1)
        targets[(positions >= length - 1) | (positions < prompt - 1)] = -100  # padding | question part
        pixels = self.split.images[image_rows]  # (B, H, W, 3) uint8, read from the memory map
        # to_tensor's conversion, written in numpy because every training step waits on it: numpy transposes
        # and casts in one pass into a contiguous array, then divides in place, where torch takes separate passes
        images = np.ascontiguousarray(pixels.transpose(0, 3, 1, 2), dtype=np.float32)  # (B, 3, H, W)
        images /= 255.0
        return {
            "images": torch.from_numpy(images),  # (B, 3, H, W) in [0, 1]
            "input_ids": torch.from_numpy(np.ascontiguousarray(seq[:, :-1])),  # (B, T)
            "targets": torch.from_numpy(targets),  # (B, T)
        }

    def __iter__(self):
        while True:
            batch = self.batch(self.step)
            self.step += 1  # counted before yielding, so state_dict() taken after a batch resumes after it
            yield batch

    def state_dict(self) -> dict:
        """Where the stream is, plus what must match for a resume to continue the same stream."""
        return {
            "step": self.step,
            "seed": self.seed,
            "task": self.task,
            "n_items": self.n_items,
            "global_batch_size": self.batch_size * self.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue at batch state["step"] of the same stream; refuse if the stream would differ."""
        for key, value in self.state_dict().items():
            if key != "step" and state.get(key) != value:
                raise ValueError(
                    f"loader state has {key}={state.get(key)!r} but this loader has {value!r}; "
                    "resuming would not continue the same batches"
                )
        self.step = int(state["step"])


def loader_benchmark(
    split: PackedSplit,
    tokenizer,
    batch_size: int = 128,
    max_len: int = 32,
    task: str = "caption",
    batches: int = 50,
) -> float:
    """Samples per second of Loader iteration on a prepared split (tokenizing once is not counted)."""
    loader = Loader(split, tokenizer, batch_size, max_len, task=task)
    stream = iter(loader)
    next(stream)  # warm-up: first epoch permutation, first pages of the memory map
    start = time.perf_counter()
    for _ in range(batches):
        next(stream)
    return batches * batch_size / (time.perf_counter() - start)
