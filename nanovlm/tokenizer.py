"""Byte-level BPE: trained here on the captions, stored in tiktoken's file format, run by tiktoken.

Byte-pair encoding starts from the 256 single bytes, so any text can be written, and then learns merges:
it counts which two adjacent tokens occur together most often in the corpus, adds their concatenation
as a new token, and repeats until the vocabulary is full. Text is first cut into words by a regex, so
a token never crosses a word boundary. The result is a table `bytes -> rank` ("mergeable ranks"): to
encode a word, tiktoken repeatedly joins the adjacent pair whose concatenation has the lowest rank.
Our trainer follows that same rule while it learns, so tiktoken reproduces its segmentation exactly.

Special tokens (end of text, image, chat markers) come after the ranks and are never produced by plain
text: `encode` treats "<|endoftext|>" typed by a user as ordinary characters.
"""

import base64
import heapq
from collections import Counter, defaultdict
from collections.abc import Iterable
from itertools import pairwise
from pathlib import Path

import regex  # installed with tiktoken; unlike `re` it knows Unicode classes such as \p{L}
import tiktoken

SPECIAL_TOKENS = ["<|endoftext|>", "<|image|>", "<|user|>", "<|assistant|>"]

# How text is cut into words before BPE. It splits exactly as OpenAI's GPT-2 pattern does, so a GPT-2
# vocabulary saved by this file reloads with the splitting it was trained with. Training splits with
# Python's `regex`, tiktoken with Rust's: they agree except on characters so new in Unicode that only one
# of them knows their class (such text still round-trips exactly; only its merges may differ).
SPLIT_PATTERN = "|".join(
    [
        r"'(?:[sdmt]|ll|ve|re)",  # English contractions: it's, I'd, I'm, don't, we'll, we've, you're
        r" ?\p{L}+",  # a run of letters, with the space before it
        r" ?\p{N}+",  # a run of digits, with the space before it
        r" ?[^\s\p{L}\p{N}]+",  # punctuation and symbols, with the space before them
        r"\s+(?!\S)",  # whitespace, leaving its last space to the word that follows
        r"\s+",  # any other whitespace, e.g. a line break before a word
    ]
)


def bpe_segment(parts: list[bytes], ranks: dict[bytes, int]) -> list[bytes]:
    """Join adjacent parts, lowest-ranked concatenation first (leftmost on ties), as tiktoken does."""
    while True:
        best_rank, best_i = None, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and (best_rank is None or rank < best_rank):
                best_rank, best_i = rank, i
        if best_rank is None:
            return parts
        parts = parts[:best_i] + [parts[best_i] + parts[best_i + 1]] + parts[best_i + 2 :]


class BPETrainer:
    """Learns BPE merges over the unique words of a corpus, updating pair counts incrementally.

    A candidate is keyed by the bytes it would create (not by the two parts), because tiktoken only
    looks up concatenated bytes. Counts live in a dict; a heap with lazy deletion finds the most frequent
    candidate (ties go to the smallest bytes, so training is deterministic); `where` maps a candidate to
    the words that may contain it, so a merge only revisits those words.
    """

    def __init__(self, texts: Iterable[str]):
        counts = Counter(word for text in texts for word in regex.findall(SPLIT_PATTERN, text))
        self.words = [word.encode("utf-8") for word in counts]
        self.freqs = list(counts.values())
        self.parts = [[bytes([b]) for b in word] for word in self.words]  # current tokens of each word
        self.ranks = {bytes([b]): b for b in range(256)}
        self.pair_counts: dict[bytes, int] = defaultdict(int)
        self.where: dict[bytes, set[int]] = defaultdict(set)
        for i in range(len(self.words)):
            self._count_pairs(i, +1, None)
        self.heap = [(-count, pair) for pair, count in self.pair_counts.items()]
        heapq.heapify(self.heap)

    def _count_pairs(self, i: int, sign: int, changed: set[bytes] | None) -> None:
        """Add (sign=+1) or remove (sign=-1) the adjacent pairs of word i from the counts."""
        parts = self.parts[i]
        for left, right in pairwise(parts):
            pair = left + right
            self.pair_counts[pair] += sign * self.freqs[i]
            if sign > 0:
                self.where[pair].add(i)
            if changed is not None:
                changed.add(pair)

    def _most_frequent(self) -> bytes | None:
        """Pop heap entries until one matches the current count; None once no pair is left."""
        while self.heap:
            neg_count, pair = heapq.heappop(self.heap)
            if self.pair_counts.get(pair) == -neg_count:
                return pair
        return None

    def _add_token(self, token: bytes) -> None:
        """Give `token` the next rank and re-segment every word that can now use it."""
        self.ranks[token] = len(self.ranks)
        changed: set[bytes] = set()
        for i in self.where.pop(token):
            # The old parts were final for the older ranks, so tiktoken would continue from them.
            new_parts = bpe_segment(self.parts[i], self.ranks)
            if len(new_parts) == len(self.parts[i]):
                continue
            self._count_pairs(i, -1, changed)
            self.parts[i] = new_parts
            self._count_pairs(i, +1, changed)
        for pair in changed:
            count = self.pair_counts[pair]
            if count > 0:
                heapq.heappush(self.heap, (-count, pair))
            else:
                del self.pair_counts[pair]

    def train(self, vocab_size: int) -> dict[bytes, int]:
        """Add merges until there are `vocab_size` ranks (fewer if the corpus runs out of pairs)."""
        while len(self.ranks) < vocab_size:
            token = self._most_frequent()
            if token is None:
                break
            self._add_token(token)
        return dict(self.ranks)

    def segmentation(self) -> dict[str, list[bytes]]:
        """Each unique training word and the tokens it is split into now."""
        return {word.decode("utf-8"): parts for word, parts in zip(self.words, self.parts, strict=True)}


def train_bpe(texts: Iterable[str], vocab_size: int) -> dict[bytes, int]:
    """Mergeable ranks learned from `texts`: ranks 0-255 are the single bytes, then one per merge."""
    if vocab_size < 256:
        raise ValueError(f"vocab_size={vocab_size} is too small: byte-level BPE needs at least 256 ranks")
    return BPETrainer(texts).train(vocab_size)


def read_ranks(path: str | Path) -> dict[bytes, int]:
    """Read a tiktoken BPE file (lines of "base64(bytes) rank"), checking it is complete."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"tokenizer file {path} not found; train one with Tokenizer.train(texts, vocab_size).save(path)"
        )
    # Parsed here rather than with tiktoken.load.load_tiktoken_bpe: that function caches files by path
    # name in a temp folder, so re-saving a tokenizer to the same path would reload the old one.
    damaged = f"tokenizer file {path} is damaged or not a tiktoken BPE file"
    try:
        lines = path.read_text(encoding="ascii").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{damaged}: byte {e.start} is not ASCII") from e
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(lines, start=1):
        if not line:
            continue
        try:
            token, rank = line.split()
            token_bytes, rank_number = base64.b64decode(token, validate=True), int(rank)
        except ValueError as e:  # binascii.Error is a ValueError too
            raise ValueError(f"{damaged}: line {number} is {line[:40]!r}, not 'base64 rank' ({e})") from e
        if token_bytes in ranks:
            raise ValueError(f"{damaged}: line {number} repeats the token {token!r}")
        ranks[token_bytes] = rank_number
    if not ranks:
        raise ValueError(f"{damaged}: it holds no tokens")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{damaged}: its {len(ranks)} ranks are not 0..{len(ranks) - 1}, each once")
    lacking = [b for b in range(256) if bytes([b]) not in ranks]
    if lacking:  # tiktoken cannot encode a text with a byte it has no rank for
        raise ValueError(f"{damaged}: it lacks {len(lacking)} of the 256 single bytes, e.g. byte {lacking[0]}")
    return ranks


class Tokenizer:
    """Our BPE ranks plus the special tokens, run by a tiktoken.Encoding."""

    def __init__(self, mergeable_ranks: dict[bytes, int], name: str = "nanovlm"):
        self.mergeable_ranks = mergeable_ranks
        n = len(mergeable_ranks)
        self.special_ids = {token: n + i for i, token in enumerate(SPECIAL_TOKENS)}
        self.encoding = tiktoken.Encoding(
            name,
            pat_str=SPLIT_PATTERN,
            mergeable_ranks=mergeable_ranks,
            special_tokens=self.special_ids,
        )
        self.eot, self.image, self.user, self.assistant = (self.special_ids[t] for t in SPECIAL_TOKENS)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "Tokenizer":
        """Train byte-level BPE so that ranks plus special tokens make `vocab_size` ids."""
        n_special = len(SPECIAL_TOKENS)
        if vocab_size < 256 + n_special:
            raise ValueError(f"vocab_size={vocab_size} is too small: need 256 bytes + {n_special} specials")
        return cls(train_bpe(texts, vocab_size - n_special))

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """Load ranks saved by `save` (any tiktoken BPE file works)."""
        return cls(read_ranks(path))

    @classmethod
    def gpt2(cls) -> "Tokenizer":
        """OpenAI's GPT-2 ranks with our special tokens; tiktoken downloads them once, then caches."""
        try:
            gpt2 = tiktoken.get_encoding("gpt2")
        except OSError as e:  # requests.ConnectionError is an OSError
            raise RuntimeError(
                "Tokenizer.gpt2() needs network access (or tiktoken's cache, TIKTOKEN_CACHE_DIR) to "
                "download OpenAI's GPT-2 BPE files, and the download failed. Offline, train a tokenizer "
                "on your captions instead: Tokenizer.train(captions, vocab_size=8192).save(path), "
                "then Tokenizer.load(path)."
            ) from e
        # tiktoken's README extends an encoding the same way: reuse its ranks, add our special tokens.
        return cls(gpt2._mergeable_ranks, name="gpt2-nanovlm")

    def save(self, path: str | Path) -> None:
        """Write the ranks in tiktoken's format: one "base64(bytes) rank" line per token."""
        by_rank = sorted(self.mergeable_ranks.items(), key=lambda item: item[1])
        Path(path).write_text("".join(f"{base64.b64encode(t).decode('ascii')} {r}\n" for t, r in by_rank))

    @property
    def vocab_size(self) -> int:
        """Number of ids: mergeable ranks plus special tokens."""
        return self.encoding.n_vocab

    def encode(self, text: str) -> list[int]:
        """Encode plain text; special-token strings in it are encoded as ordinary characters."""
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many plain texts (a plain loop: on few cores tiktoken's threaded batch costs more than it saves)."""
        encode = self.encoding.encode_ordinary
        return [encode(text) for text in texts]

    def encode_with_special(self, text: str) -> list[int]:
        """Encode a template we wrote ourselves, where "<|image|>" etc. mean the special tokens."""
        return self.encoding.encode(text, allowed_special="all")

    def decode(self, ids: Iterable[int]) -> str:
        """Text for a list of ids (specials appear as their strings)."""
        return self.encoding.decode([int(i) for i in ids])
