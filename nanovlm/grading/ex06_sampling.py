"""Exercise 6, sample_next: greedy, temperature and top-p decoding, against nanovlm.vlm.sample_next's rule."""

import torch

from .. import vlm
from .results import Part, Parts
from .student import Student, StudentError, returned_tensor, shape_of

# the package functions the student's code may not call, as (module or class, name)
FORBIDDEN = ((vlm, "sample_next"),)


def _tempered(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(log(probs) / temperature): the distribution sampling with that temperature follows."""
    return (probs.log() / temperature).softmax(-1)


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """(V,) bool, the tokens top-p keeps: most likely first, while the mass ranked above a token is below top_p."""
    order = probs.argsort(descending=True)
    mass_before = probs[order].cumsum(0) - probs[order]
    keep = torch.zeros(probs.shape, dtype=torch.bool)
    keep[order[mass_before < top_p]] = True
    return keep


def _fmt(probs: torch.Tensor) -> str:
    return "[" + ", ".join(f"{p:.3g}" for p in probs.tolist()) + "]"


def _frequencies(student: Student, probs: torch.Tensor, temperature: float, top_p: float | None, seed: int):
    """How often sample_next draws each token, over 3000 rows of the same logits: (V,) fractions."""
    n = 3000
    logits = probs.log().expand(n, -1).contiguous()
    what = f"sample_next(logits of {n} rows with probabilities {_fmt(probs)}, temperature={temperature}, top_p={top_p})"
    kwargs = {"temperature": temperature, "top_p": top_p, "generator": torch.Generator().manual_seed(seed)}
    out = returned_tensor(student.call(what, (logits,), kwargs), what)
    if shape_of(out) != (n,) or out.is_floating_point() or out.min() < 0 or out.max() >= probs.numel():
        raise StudentError(
            f"{what} returned {shape_of(out)} {out.dtype}; expected ({n},) token ids in 0..{probs.numel() - 1}"
        )
    return torch.bincount(out.long(), minlength=probs.numel()).double() / n


def _tv(a: torch.Tensor, b: torch.Tensor) -> float:
    """Total variation distance between two distributions."""
    return 0.5 * float((a.double() - b.double()).abs().sum())


def check_sample_next(student: Student) -> list[Part]:
    """sample_next(logits, temperature, top_p, generator) -> (B,) token ids, against nanovlm.vlm.sample_next's rule.

    Sampling is checked by drawing 3000 times and comparing how often each token comes out with the
    distribution the rule gives, so any correct way of sampling passes. Diagnoses: greedy not the argmax,
    temperature with no effect (applied after the softmax), multiplied instead of divided, top-p dropping the
    token that crosses the threshold or keeping one too many, top-p before the temperature, the nucleus mapped
    back to the wrong token ids, draws inside the nucleus not in proportion.
    """
    parts = Parts(
        ("greedy: temperature 0 picks the argmax", 2),
        ("temperature divides the logits", 3),
        ("top-p keeps the smallest set reaching top_p", 3),
        ("draws inside the nucleus follow the probabilities", 2),
    )
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(5, 11, generator=g) * 3
    for kwargs in ({"temperature": 0.0}, {"temperature": 0.0, "top_p": 0.5}):
        what = f"sample_next(logits of shape (5, 11), {', '.join(f'{k}={v}' for k, v in kwargs.items())})"
        out = returned_tensor(
            student.call(what, (logits,), {**kwargs, "generator": torch.Generator().manual_seed(0)}), what
        )
        problem = None
        if shape_of(out) != (5,):
            squeeze = " (one token id per row: squeeze the last dimension)" if shape_of(out) == (5, 1) else ""
            problem = f"{what} returned shape {shape_of(out)}, expected (5,){squeeze}"
        elif out.is_floating_point():
            problem = f"{what} returned {out.dtype}; token ids are integers (argmax and multinomial give torch.long)"
        elif not torch.equal(out.long(), logits.argmax(-1)):
            r = int(torch.where(out.long() != logits.argmax(-1))[0][0])
            problem = (
                f"greedy decoding must pick the highest-scoring token: {what} gave {int(out[r])} in row {r}, expected "
                f"{int(logits[r].argmax())}"
                + (" (with temperature 0, top_p does not matter)" if "top_p" in kwargs else "")
            )
        if problem:
            parts.judge("greedy: temperature 0 picks the argmax", problem)
            return parts.finish("not checked: fix greedy decoding first")
    parts.judge("greedy: temperature 0 picks the argmax", None)

    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    rules = {
        "right": lambda t: _tempered(probs, t),
        "no effect": lambda t: probs,
        "multiplied": lambda t: _tempered(probs, 1 / t),
        "probabilities divided": lambda t: (probs / t).softmax(-1),
    }
    drawn = {t: _frequencies(student, probs, t, None, seed=60 + i) for i, t in enumerate((0.5, 2.0))}
    matched = [name for name, rule in rules.items() if all(_tv(f, rule(t)) < 0.04 for t, f in drawn.items())]
    messages = {
        "no effect": "your temperature has no effect: the draws follow the untempered probabilities. Dividing the "
        "probabilities (after the softmax) by T changes nothing once they are renormalised; divide the logits by T "
        "before the softmax",
        "multiplied": "you multiplied the logits by the temperature; divide them (T < 1 sharpens, T > 1 flattens)",
        "probabilities divided": "you divided the probabilities by T and took a softmax of them; divide the logits "
        "(before the only softmax)",
    }
    problem = None
    if "right" not in matched:
        problem = messages.get(matched[0]) if matched else None
        problem = problem or (
            f"with temperature 0.5 and probabilities {_fmt(probs)} your draws came out as {_fmt(drawn[0.5])}, expected "
            f"about {_fmt(_tempered(probs, 0.5))} = softmax(logits / T)"
        )
    parts.judge("temperature divides the logits", problem)
    if problem:
        return parts.finish("not checked: fix the temperature first")

    mixed = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])[torch.randperm(6, generator=g)]
    cases = [(probs, 1.0, 0.7), (mixed, 1.0, 0.6), (mixed, 1.0, 0.85), (probs, 2.0, 0.7), (probs, 1.0, 0.4)]
    problem = proportion_problem = None
    for i, (p, t, top_p) in enumerate(cases):
        tempered = _tempered(p, t)
        keep = _nucleus(tempered, top_p)
        freq = _frequencies(student, p, t, top_p, seed=70 + i)
        if not torch.equal(freq > 0, keep):
            problem = _top_p_problem(p, t, top_p, tempered, keep, freq > 0)
            break
        expected = tempered * keep / (tempered * keep).sum()
        if proportion_problem is None and _tv(freq, expected) > 0.04:
            proportion_problem = (
                f"with probabilities {_fmt(tempered)} and top_p {top_p} your draws came out as {_fmt(freq)}, expected "
                f"about {_fmt(expected)}: inside the nucleus, draw in proportion to the probabilities (renormalised)"
            )
    parts.judge("top-p keeps the smallest set reaching top_p", problem)
    if problem:
        return parts.finish("not checked: fix top-p first")
    parts.judge("draws inside the nucleus follow the probabilities", proportion_problem)
    return parts.finish()


def _top_p_problem(probs, temperature, top_p, tempered, keep, drawn) -> str:
    """Explain how the set of tokens the student's top-p drew from differs from the rule's."""
    order = tempered.argsort(descending=True)
    k = int(keep.sum())
    running = tempered[order].cumsum(0)
    rule = (
        f"The rule: sort the tokens by probability and keep them until their total reaches top_p, including the one "
        f"that makes it reach. With probabilities {_fmt(tempered)}"
        + (f" (after temperature {temperature})" if temperature != 1 else "")
        + f" and top_p {top_p}, keep tokens {order[:k].tolist()} (total {running[k - 1]:.3g} >= {top_p}"
        + (f", while {running[k - 2]:.3g} < {top_p})" if k > 1 else ")")
        + f"; you kept {torch.where(drawn)[0].tolist()}."
    )
    crossing = order[k - 1]
    one_less, one_more = keep.clone(), keep.clone()
    one_less[crossing] = False
    if k < len(order):
        one_more[order[k]] = True
    if temperature != 1 and torch.equal(drawn, _nucleus(probs, top_p)):
        return "you chose the nucleus before applying the temperature: divide the logits by T first. " + rule
    if torch.equal(drawn, one_less):
        return "you dropped the token that crosses top_p. " + rule
    if k < len(order) and torch.equal(drawn, one_more):
        return "you kept one token too many (the one after the token that crosses top_p). " + rule
    if drawn.all():
        return "top-p removed nothing. " + rule
    if int(drawn.sum()) == k:
        return (
            f"you kept {k} tokens, but not the most likely ones: after sorting, map the kept positions back to token "
            "ids (scatter or index with the sort order). " + rule
        )
    return rule
