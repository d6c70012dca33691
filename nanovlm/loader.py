"""Batches for training: token rows and images drawn from a prepared split, deterministic and resumable.

`Loader` turns a `data.PackedSplit` (images packed in a memory map, captions and question/answer pairs) into
batches of images, input ids and targets. Batch k is a pure function of (seed, k), so a resumed run only
needs the step it stopped at to see the very batches it would have seen.
"""

import time

import numpy as np
import torch

from .data import PackedSplit

TASKS = ("caption", "qa", "chat", "text")


def _pack_tokens(seqs: list[list[int]], width: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Sequences cut to `width` in a (n, width) table padded with `pad`, and their kept lengths."""
    table = np.full((len(seqs), width), pad, dtype=np.int32)
    lengths = np.empty(len(seqs), dtype=np.int64)
    for row, seq in enumerate(seqs):
        seq = seq[:width]
        table[row, : len(seq)] = seq
        lengths[row] = len(seq)
    return table, lengths


def _encode_pairs(tok, qa: list[dict]) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of the questions and of the answers, each answer after a space (" red"), as a caption word."""
    return tok.encode_batch([q["question"] for q in qa]), tok.encode_batch([" " + str(q["answer"]) for q in qa])


class Loader:
    """Deterministic, resumable batches from a PackedSplit, forever (epoch after epoch).

    An item is an image ("caption": one of its captions drawn at random, anew each epoch), a caption
    ("text": every caption once per epoch; the batch carries its image too, which the model ignores; with
    pairs, an image whose drawn caption follows another of its captions, so that a decoder trained on text
    alone learns to use what comes before it; with grid, an image whose drawn caption the model reads off a
    map of its objects' words, batch["words"]: see _word_grid),
    a question/answer pair ("qa"), or an image shown either with a caption or with a chat of several of
    its questions ("chat": caption_prob is the chance of a caption, anew each epoch). Epoch e visits the
    items in the order of a permutation drawn from np.random.default_rng((seed, e)); the stream of all
    epochs is cut into global batches of batch_size * world_size items that run across epoch boundaries
    (nothing is dropped), and rank r gets the r-th slice. Batch k is therefore a pure function of (seed, k).

    Token layout: the sequence is <|image|> caption <|endoftext|> (with pairs, <|image|> caption caption
    <|endoftext|>, the first one cut short if both do not fit), or <|image|> followed by turns
    <|user|> question <|assistant|> answer <|endoftext|> (one for "qa", as many as fit for "chat", in an
    order drawn anew each epoch); input_ids are its first T tokens, targets the next T, with -100 on
    padding and on the questions: only captions, answers and the end tokens after them carry a loss.
    Answers are encoded with a leading space (" red"), the form the caption vocabulary learned, so an
    answer is the same token as the word in a caption. first_caption_prob, if set, is the chance of
    drawing caption 0 (scenes put the canonical caption first); the others share the rest evenly.
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
        caption_prob: float = 0.5,
        pairs: bool = False,
        grid: int = 0,
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
        self.split, self.task, self.seed, self.pad = split, task, seed, tokenizer.eot
        self.batch_size, self.max_len, self.rank, self.world_size = batch_size, max_len, rank, world_size
        if not 0.0 <= caption_prob <= 1.0:
            raise ValueError(f"caption_prob={caption_prob} must be in [0, 1]")
        self.first_caption_prob, self.caption_prob = first_caption_prob, caption_prob
        if pairs and task != "text":
            raise ValueError(f"pairs=True puts one caption before another in task 'text', not {task!r}")
        self.pairs = pairs
        if grid and task != "text":
            raise ValueError(f"grid={grid} lays words out for the text stage (task 'text'), not {task!r}")
        self.grid = grid
        # items are images whose caption is drawn anew each epoch; otherwise captions ("text") or questions ("qa")
        self.items_are_images = task in ("caption", "chat") or pairs or bool(grid)
        self.step = 0
        self._epochs: dict[int, tuple] = {}  # epoch -> what _epoch returns
        if task == "qa":
            self._tokenize_qa(tokenizer)
        else:
            self._tokenize_captions(tokenizer)
        if task == "chat":
            self._tokenize_turns(tokenizer)
        if grid:
            self._word_grid(tokenizer, grid)
        self.n_items = len(self.item_rows)
        if self.n_items == 0:
            raise ValueError(f"{split.dir} has nothing to load for task={task!r}")

    def _tokenize_captions(self, tok) -> None:
        """One token row per caption: <|image|> caption <|endoftext|>."""
        counts = np.array([len(c) for c in self.split.captions], dtype=np.int64)
        if (counts == 0).any() and self.task != "chat":  # a chat shows an image without captions with questions
            raise ValueError(f"{self.split.dir}: image {self.split.image_ids[int(np.argmin(counts))]!r} has no caption")
        flat = [c for caps in self.split.captions for c in caps]
        seqs = [[tok.image, *ids, tok.eot] for ids in tok.encode_batch(flat)]
        self.tokens, self.lengths = _pack_tokens(seqs, self.max_len + 1, tok.eot)
        self.prompt_lengths = np.ones(len(seqs), dtype=np.int64)  # just <|image|>
        self.first_caption = np.cumsum(counts) - counts  # token row of each image's caption 0
        self.caption_counts = counts
        if self.items_are_images:
            self.item_rows = np.arange(len(counts))
        else:  # items are captions
            self.item_rows = np.repeat(np.arange(len(counts)), counts)

    def _tokenize_qa(self, tok) -> None:
        """One token row per QA pair: <|image|><|user|> question <|assistant|> answer <|endoftext|>."""
        qa = [q for q in self.split.qa or [] if q["answer"] is not None]  # unanswered: for `ask`, not training
        if not qa:
            raise ValueError(f"{self.split.dir} has no answered questions; use task='caption'")
        questions, answers = _encode_pairs(tok, qa)
        seqs = [[tok.image, tok.user, *q, tok.assistant, *a, tok.eot] for q, a in zip(questions, answers, strict=True)]
        self.tokens, self.lengths = _pack_tokens(seqs, self.max_len + 1, tok.eot)
        self.prompt_lengths = np.array([3 + len(q) for q in questions], dtype=np.int64)
        self.item_rows = np.array([self.split.row_of_id[q["image_id"]] for q in qa], dtype=np.int64)

    def _tokenize_turns(self, tok) -> None:
        """Each question as one chat turn, <|user|> question <|assistant|> answer <|endoftext|>, by image."""
        qa = [q for q in self.split.qa or [] if q["answer"] is not None]
        if not qa:
            raise ValueError(f"{self.split.dir} has no answered questions; use task='caption'")
        rows = np.array([self.split.row_of_id[q["image_id"]] for q in qa], dtype=np.int64)
        by_image = np.argsort(rows, kind="stable")  # the turns of image r are by_image[start[r]:start[r + 1]]
        self.turn_start = np.searchsorted(rows[by_image], np.arange(len(self.split) + 1))
        questions, answers = _encode_pairs(tok, [qa[i] for i in by_image])
        pairs = zip(questions, answers, strict=True)
        self.turns = [np.array([tok.user, *q, tok.assistant, *a, tok.eot]) for q, a in pairs]
        # loss on the answer and its end token only: the question is the user's, not the model's to predict
        self.turn_loss = [np.arange(len(t)) >= len(t) - len(a) - 1 for t, a in zip(self.turns, answers, strict=True)]
        self.image_token = tok.image
        idle = (self.caption_counts == 0) & (np.diff(self.turn_start) == 0)
        if idle.any():
            raise ValueError(
                f"{self.split.dir}: image {self.split.image_ids[int(np.argmax(idle))]!r} has neither a caption nor "
                "an answered question, so a chat has nothing to show with it"
            )

    def _word_grid(self, tok, side: int) -> None:
        """Each image's objects as words on a side x side grid in the image tokens' raster order: the cell that holds
        an object's centre gets the tokens of " size colour shape", the other cells none (-1). A decoder trained to
        caption from this map has learned to read the layout the image tokens will have; the projector then only
        has to write each object's words where it is."""
        if self.split.scenes is None:
            raise ValueError(f"{self.split.dir} has no scene records (scenes.json), which a grid of words is made from")
        size = self.split.image_size
        kinds: dict[tuple[str, str, str], list[int]] = {}  # a few dozen kinds of object, encoded once each
        cells: list[dict[int, list[int]]] = []
        for scene in self.split.scenes:
            here: dict[int, list[int]] = {}
            for obj in scene["objects"]:
                row, col = (int(obj[c] * side / size) for c in ("cy", "cx"))
                if not (0 <= row < side and 0 <= col < side):
                    raise ValueError(
                        f"{self.split.dir}: image {scene['image_id']!r} has an object centred at ({obj['cx']}, "
                        f"{obj['cy']}), outside its {size}px images; pack the scenes at the size they were drawn"
                    )
                kind = (obj["size"], obj["color"], obj["shape"])
                if kind not in kinds:
                    kinds[kind] = tok.encode(" " + " ".join(kind))
                # two centres in one cell: both objects' words
                here.setdefault(row * side + col, []).extend(kinds[kind])
            cells.append(here)
        width = max((len(ids) for here in cells for ids in here.values()), default=1)
        self.words = np.full((len(cells), side * side, width), -1, dtype=np.int64)  # (N_images, cells, K)
        for r, here in enumerate(cells):
            for cell, ids in here.items():
                self.words[r, cell, : len(ids)] = ids

    def _epoch(self, epoch: int) -> tuple[np.ndarray, ...]:
        """(order of items, token row of each item, chat or caption per item, sort key per chat turn, token row
        of the caption read first or -1) for one epoch; the third and fourth are None except for task "chat",
        the last except with pairs. The last two epochs are cached."""
        if epoch not in self._epochs:
            rng = np.random.default_rng((self.seed, epoch))
            order = rng.permutation(self.n_items)
            chat = keys = before = None
            if self.items_are_images:
                rows = self.first_caption + self._draw_captions(rng.random(self.n_items))
            else:
                rows = np.arange(self.n_items)
            if self.pairs:  # the caption read first: any other of the image's captions (none if it has one)
                n = self.caption_counts
                other = (rows - self.first_caption + 1 + (rng.random(self.n_items) * (n - 1)).astype(np.int64)) % n
                before = np.where(n > 1, self.first_caption + other, -1)
            if self.task == "chat":  # drawn after the captions, so a chat run sees the caption run's captions
                has_turns = np.diff(self.turn_start) > 0
                chat = ((rng.random(self.n_items) >= self.caption_prob) | (self.caption_counts == 0)) & has_turns
                keys = rng.random(len(self.turns))
            self._epochs[epoch] = (order, rows, chat, keys, before)
            if len(self._epochs) > 2:  # forget the epoch computed longest ago
                del self._epochs[next(iter(self._epochs))]
        return self._epochs[epoch]

    def _chat(self, image_row: int, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, loss mask) of one chat about an image: its turns in key order, as many as fit in full."""
        first, last = self.turn_start[image_row], self.turn_start[image_row + 1]
        seq, loss = [np.array([self.image_token])], [np.zeros(1, dtype=bool)]
        length = 1
        for t in first + np.argsort(keys[first:last], kind="stable"):
            if length + len(self.turns[t]) > self.max_len + 1 and length > 1:
                break  # a turn cut short would teach a half answer; the first one is kept even if cut
            seq.append(self.turns[t])
            loss.append(self.turn_loss[t])
            length += len(self.turns[t])
        return np.concatenate(seq)[: self.max_len + 1], np.concatenate(loss)[: self.max_len + 1]

    def _pair(self, first: int, row: int) -> np.ndarray:
        """<|image|> caption `first` caption `row` <|endoftext|>: the first one cut short if both do not fit."""
        caption = self.tokens[row, 1 : self.lengths[row]]  # with its end token
        room = max(self.max_len - len(caption), 0)
        before = self.tokens[first, 1 : self.lengths[first] - 1][:room]  # without its end token
        return np.concatenate([self.tokens[row, :1], before, caption])[: self.max_len + 1]

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
        chats = []  # (batch index, image row, turn keys) of the items shown with a chat
        paired = []  # (batch index, token row of the caption read first) with pairs
        for epoch in np.unique(epochs):
            order, rows, chat, keys, before = self._epoch(int(epoch))
            here = epochs == epoch
            items = order[offsets[here]]
            token_rows[here], image_rows[here] = rows[items], self.item_rows[items]
            if chat is not None:
                shown = zip(np.flatnonzero(here), items, strict=True)
                chats += [(i, self.item_rows[item], keys) for i, item in shown if chat[item]]
            if before is not None:
                shown = zip(np.flatnonzero(here), before[items], strict=True)
                paired += [(i, int(row)) for i, row in shown if row >= 0]

        listed = np.ones(self.batch_size, dtype=bool)  # rows whose tokens are a row of the table
        listed[[i for i, _, _ in chats] + [i for i, _ in paired]] = False
        seq = np.full((self.batch_size, self.max_len + 1), self.pad, dtype=np.int64)  # (B, T+1)
        seq[listed] = self.tokens[token_rows[listed]]
        positions = np.arange(self.max_len + 1)
        length, prompt = self.lengths[token_rows[listed], None], self.prompt_lengths[token_rows[listed], None]
        loss = np.zeros(seq.shape, dtype=bool)  # (B, T+1): the tokens the model must predict
        loss[listed] = (positions < length) & (positions >= prompt)
        for i, image_row, keys in chats:
            tokens, mask = self._chat(image_row, keys)
            seq[i, : len(tokens)], loss[i, : len(mask)] = tokens, mask
        for i, first in paired:
            tokens = self._pair(first, token_rows[i])
            seq[i, : len(tokens)], loss[i, 1 : len(tokens)] = tokens, True
        targets = np.where(loss[:, 1:], seq[:, 1:], -100)  # (B, T): position t predicts seq[t + 1]
        pixels = self.split.images[image_rows]  # (B, H, W, 3) uint8, read from the memory map
        # to_tensor's conversion, written in numpy because every training step waits on it: numpy transposes
        # and casts in one pass into a contiguous array, then divides in place, where torch takes separate passes
        images = np.ascontiguousarray(pixels.transpose(0, 3, 1, 2), dtype=np.float32)  # (B, 3, H, W)
        images /= 255.0
        batch = {
            "images": torch.from_numpy(images),  # (B, 3, H, W) in [0, 1]
            "input_ids": torch.from_numpy(np.ascontiguousarray(seq[:, :-1])),  # (B, T)
            "targets": torch.from_numpy(targets),  # (B, T)
        }
        if self.grid:
            batch["words"] = torch.from_numpy(self.words[image_rows])  # (B, N_cells, K) token ids, -1 for none
        return batch

    def __iter__(self):
        while True:
            batch = self.batch(self.step)
            self.step += 1  # counted before yielding, so state_dict() taken after a batch resumes after it
            yield batch

    def state_dict(self) -> dict:
        """Where the stream is, plus what must match for a resume to continue the same stream."""
        state = {
            "step": self.step,
            "seed": self.seed,
            "task": self.task,
            "n_items": self.n_items,
            "global_batch_size": self.batch_size * self.world_size,
        }
        if self.task == "chat":
            state["caption_prob"] = self.caption_prob
        if self.pairs:
            state["pairs"] = True
        if self.grid:
            state["grid"] = self.grid
        return state

    def load_state_dict(self, state: dict) -> None:
        """Continue at batch state["step"] of the same stream; refuse if the stream would differ."""
        mine = self.state_dict()
        for key in mine.keys() | {"pairs", "grid"}:  # either way: a pairs or grid run is refused to a plain one
            if key != "step" and state.get(key) != mine.get(key):
                raise ValueError(
                    f"loader state has {key}={state.get(key)!r} but this loader has {mine.get(key)!r}; "
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
