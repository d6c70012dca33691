"""Exercise 11, beam_search: keep the best few partial captions instead of the single most likely next token.

nanovlm decodes greedily or by sampling (`vlm.sample_next`); beam search is the decoder captioning papers
report with. The package has none, so the reference is here: `reference_beam_search`. The "model" of the check
is a table of seeded random next-token log-probabilities, one row per prefix, so the best caption is known by
trying every one.
"""

import itertools

import torch

from .results import Part, Parts
from .student import Student, StudentError

FORBIDDEN = ()  # nothing in the package computes it


class TableModel:
    """log_probs(tokens) for a made-up language: each prefix gets its own seeded random distribution."""

    def __init__(self, vocab: int, seed: int, eos: int, eos_bias: float = 0.0) -> None:
        self.vocab, self.seed, self.eos, self.eos_bias = vocab, seed, eos, eos_bias

    def row(self, prefix: tuple[int, ...]) -> torch.Tensor:
        g = torch.Generator().manual_seed(hash((self.seed, prefix)) % 2**31)
        logits = 2.0 * torch.randn(self.vocab, generator=g, dtype=torch.float64)
        logits[self.eos] += self.eos_bias
        return logits.log_softmax(-1)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        if not (isinstance(tokens, torch.Tensor) and tokens.dim() == 2):
            raise TypeError(f"log_probs takes a (beams, T) tensor of token ids, got {type(tokens).__name__} "
                            f"{getattr(tokens, 'shape', '')}")  # fmt: skip
        return torch.stack([self.row(tuple(int(t) for t in prefix)) for prefix in tokens]).float()

    def score(self, start: int, new: list[int]) -> float:
        """The summed log-probability of the new tokens after `start`."""
        prefix, total = (start,), 0.0
        for t in new:
            total += float(self.row(prefix)[t].float())
            prefix += (t,)
        return total


def reference_beam_search(log_probs, start: int, beam_width: int, max_new_tokens: int, eos: int, mistake: str = ""):
    """(new tokens, summed log-prob) of the best beam; `mistake` computes a typical wrong version instead."""
    beams: list[tuple[list[int], float]] = [([], 0.0)]
    for _ in range(max_new_tokens):
        done = [b for b in beams if b[0] and b[0][-1] == eos and mistake != "expands past eos"]
        growing = [b for b in beams if not (b[0] and b[0][-1] == eos) or mistake == "expands past eos"]
        if not growing:
            break
        rows = log_probs(torch.tensor([[start, *tokens] for tokens, _ in growing]))
        candidates = [] if mistake == "drops finished beams" else list(done)
        ranked = [(b, b[1]) for b in candidates]  # (beam, what it is ranked by)
        for (tokens, score), row in zip(growing, rows, strict=True):
            for v in range(row.numel()):
                new = float(row[v])
                ranked.append(((tokens + [v], score + new), new if mistake == "last token only" else score + new))
        beams = [b for b, _ in sorted(ranked, key=lambda r: -r[1])[:beam_width]]
    return max(beams, key=lambda b: b[1])


def _best_by_trying_all(model: TableModel, start: int, length: int) -> tuple[list[int], float]:
    """The most likely caption of at most `length` new tokens (stopping at eos), by trying every one."""
    best = ([], -float("inf"))
    for n in range(1, length + 1):
        for tokens in itertools.product(range(model.vocab), repeat=n):
            if model.eos in tokens[:-1] or (n < length and tokens[-1] != model.eos):
                continue
            score = model.score(start, list(tokens))
            if score > best[1]:
                best = (list(tokens), score)
    return best


def check_beam_search(student: Student) -> list[Part]:
    """beam_search(log_probs, start, beam_width, max_new_tokens, eos) -> (tokens, score), mistakes named."""
    parts = Parts(
        ("returns (tokens, score), score the sum of the tokens' log-probs", 2),
        ("beam_width 1 is greedy decoding", 2),
        ("keeps the beam_width best of all beams' continuations", 4),
        ("a beam that ends in eos stops, and competes with its score", 2),
    )
    start = 9

    def run(model: TableModel, width: int, steps: int) -> tuple[list[int], float]:
        what = f"beam_search(log_probs, start={start}, beam_width={width}, max_new_tokens={steps}, eos={model.eos})"
        out = student.call(what, (model, start, width, steps, model.eos))
        if not (isinstance(out, tuple | list) and len(out) == 2):
            raise StudentError(f"{what} returned {type(out).__name__}; return a pair (tokens, score)")
        tokens, score = out
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.tolist()
        if not (isinstance(tokens, list) and all(isinstance(t, int) for t in tokens)):
            raise StudentError(f"{what} returned tokens {tokens!r}; return the new tokens as a list of ints")
        return tokens, float(score)

    never_eos = [TableModel(5, seed, eos=0, eos_bias=-30.0) for seed in range(6)]
    problem = None
    for model in never_eos[:3]:
        tokens, score = run(model, 3, 4)
        if tokens[:1] == [start]:
            problem = f"your tokens {tokens} start with the start token {start}; return only the new tokens"
            break
        if abs(score - model.score(start, tokens)) > 1e-3:
            problem = (
                f"you return score {score:.4f} for tokens {tokens}, whose log-probs sum to "
                f"{model.score(start, tokens):.4f}: the score of a beam is the sum of its tokens' log-probs"
            )
            break
    parts.judge("returns (tokens, score), score the sum of the tokens' log-probs", problem)
    if problem:
        return parts.finish("not checked: fix what you return first")

    problem = None
    for model in never_eos[:3]:
        tokens, _ = run(model, 1, 5)
        expected, _ = reference_beam_search(model, start, 1, 5, model.eos)
        if tokens != expected:
            problem = (
                f"with beam_width 1 you return {tokens}; greedy decoding (the top token each step) gives {expected}"
            )
            break
    parts.judge("beam_width 1 is greedy decoding", problem)

    problem = None
    for model, width, steps in [(never_eos[3], 3, 5), (never_eos[4], 2, 6), (never_eos[5], 4, 4)]:
        tokens, score = run(model, width, steps)
        expected, best = reference_beam_search(model, start, width, steps, model.eos)
        if tokens != expected:
            last, _ = reference_beam_search(model, start, width, steps, model.eos, "last token only")
            if tokens == last:
                problem = (
                    "you rank continuations by the new token's log-prob alone; rank them by the whole beam's score, "
                    "the old score plus the new token's log-prob"
                )
            else:
                problem = (
                    f"beam_width {width}, {steps} steps: you return {tokens} (score {score:.3f}), expected {expected} "
                    f"(score {best:.3f}). Each step: extend every beam by every token, then keep the {width} best of "
                    "all those continuations together"
                )
            break
    if problem is None:  # a beam as wide as all captions finds the best one, as trying every caption does
        model = TableModel(4, 11, eos=0)
        tokens, _ = run(model, 4**3, 3)
        expected, best = _best_by_trying_all(model, start, 3)
        if tokens != expected:
            problem = (
                f"with a beam as wide as every possible caption (64 for 4 tokens and 3 steps) you return {tokens}; "
                f"trying every caption finds {expected} (log-prob {best:.3f})"
            )
    parts.judge("keeps the beam_width best of all beams' continuations", problem)

    problem = None
    for seed in range(3):
        model = TableModel(5, 100 + seed, eos=0, eos_bias=1.5)
        tokens, score = run(model, 3, 6)
        expected, best = reference_beam_search(model, start, 3, 6, model.eos)
        if tokens == expected:
            continue
        if model.eos in tokens[:-1]:
            problem = f"your tokens {tokens} go on after eos ({model.eos}); a beam that ends in eos is finished"
        elif tokens == reference_beam_search(model, start, 3, 6, model.eos, "drops finished beams")[0]:
            problem = (
                f"you return {tokens} (score {score:.3f}); {expected} scores {best:.3f}: a finished beam must stay in "
                "the running with its score, not be dropped"
            )
        else:
            problem = (
                f"you return {tokens} (score {score:.3f}), expected {expected} (score {best:.3f}): keep finished beams "
                "among the candidates with their scores, unchanged, and stop once every kept beam has finished"
            )
        break
    parts.judge("a beam that ends in eos stops, and competes with its score", problem)
    return parts.finish()
