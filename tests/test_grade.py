"""The exercise grader: solutions earn full marks, student versions zero, typical mistakes are named.

Wrong answers are the source notebooks' own solutions with one mistake edited in, graded in this process
(fast). The tests of whole submissions go through the separate grading processes, as a teacher's run does.
"""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from nanovlm import grading
from nanovlm.grading import EXERCISES, POINTS
from nanovlm.grading.ex05_loss_mask import reference_join
from nanovlm.grading.ex06_sampling import _nucleus, _tempered
from nanovlm.loader import Loader
from nanovlm.vlm import sample_next

ROOT = Path(__file__).resolve().parents[1]
SOURCE, RELEASE = ROOT / "exercises" / "source", ROOT / "exercises" / "release"
NOTEBOOKS = {
    name: path
    for path in sorted(SOURCE.glob("*.ipynb"))
    for name in grading.find_exercises(grading.read_notebook(path))
}


def test_there_is_one_source_notebook_per_exercise_and_its_student_version():
    assert sorted(NOTEBOOKS) == sorted(EXERCISES)
    assert all("exercise" in path.name for path in NOTEBOOKS.values())
    assert sorted(p.name for p in RELEASE.glob("*.ipynb")) == sorted(p.name for p in NOTEBOOKS.values())


def test_release_is_exactly_the_student_version_of_source(tmp_path):
    for written in grading.make_student_version(SOURCE, tmp_path):
        committed = RELEASE / written.name
        assert written.read_text() == committed.read_text(), (
            f"run: python -m nanovlm grade --make-student {SOURCE} {RELEASE}"
        )


def test_solutions_earn_full_marks_and_untouched_student_versions_zero():
    """Through the grading processes, as `python -m nanovlm grade exercises/source exercises/release` does."""
    for g in grading.grade_notebooks([SOURCE]):
        (result,) = g.results
        assert result.score == POINTS, grading.format_grades([g])
    for g in grading.grade_notebooks([RELEASE]):
        (result,) = g.results
        assert result.score == 0 and result.error.startswith(f"not attempted: {result.exercise} raises NotImplemented")


# ----------------------------------------------------------------------------- typical mistakes


def with_mistake(tmp_path: Path, exercise: str, *edits: tuple[str, str]) -> grading.Result:
    """Grade (in this process) the exercise's source notebook with `edits` (old, new) made to its solution."""
    nb = grading.read_notebook(NOTEBOOKS[exercise])
    cell = nb["cells"][grading.find_exercises(nb)[exercise]]
    source = "".join(cell["source"])
    for old, new in edits:
        assert old in source, f"{old!r} is not in the solution of {exercise}"
        source = source.replace(old, new)
    cell["source"] = source
    path = tmp_path / f"{exercise}.ipynb"
    path.write_text(json.dumps(nb))
    (result,) = grading.grade_notebook(path, isolate=False).results
    return result


MISTAKES = [  # (exercise, edits to the solution, the part that fails, what its message must say)
    ("patchify", [("(h w)", "(w h)")], "patches in row-by-row order", "numbered the patches column by column"),
    ("patchify", [("(p1 p2 c)", "(c p1 p2)")], "pixel order inside a patch (p1 p2 c)", "one channel after the other"),
    (
        "patchify",
        [("(p1 p2 c)", "p1 p2 c")],
        "output shape (B, N, P*P*C)",
        "shape (2, 16, 4, 4, 3), expected (2, 16, 48)",
    ),
    (
        "causal_attention",
        [(".tril()", ".tril(diagonal=1)")],
        "no position sees a later one",
        "lets position 0 see position 1, position 1 see position 2",
    ),
    (
        "causal_attention",
        [(".tril()", ".tril(diagonal=-1)")],
        "each position sees itself and all earlier ones",
        "position 0 cannot see position 0 (itself)",
    ),
    (
        "causal_attention",
        [(" / math.sqrt(d)", "")],
        "values: softmax(q k^T / sqrt(d) + mask) v",
        "did not divide the scores by sqrt(d)",
    ),
    (
        "causal_attention",
        [('scores.masked_fill(~mask, float("-inf"))', "scores.masked_fill(~mask, 0.0)")],
        "no position sees a later one",
        "to 0, not -inf",
    ),
    (
        "decode_step",
        [("k, v = cache.update(attn.layer, k, v)", "cache.update(attn.layer, k, v)")],
        "one token at a time matches the full pass",
        "never saw the cached positions",
    ),
    (
        "decode_step",
        [('scores.masked_fill(~mask, float("-inf"))', "scores")],
        "a chunk of new tokens: causal, after the cache",
        "position 0 saw position 1",
    ),
    (
        "decode_step",
        [("tril(diagonal=past)", "tril()")],
        "a chunk of new tokens: causal, after the cache",
        "position 4 could not see position 1",
    ),
    (
        "decode_step",
        [("cache.update(attn.layer,", "cache.update(0,")],
        "the cache holds every key and value once",
        "stored under layer 0",
    ),
    ("project", [("F.gelu", "F.relu")], "MLP: fc -> GELU -> proj", "uses ReLU"),
    (
        "project",
        [('"b (h s1 w s2) c -> b (h w) (s1 s2 c)", s1=s, s2=s, h=side // s', '"b (n k) c -> b n (k c)", k=s * s')],
        "pixel shuffle merges s x s squares as (s1 s2 c)",
        "merged s*s consecutive tokens",
    ),
    (
        "join_image_and_text",
        [("(t >= lengths[:, None] - 1) | ", "")],
        "padding is not scored, <|endoftext|> is",
        "the loss counts padding tokens: row 0 has targets at text positions 6, 7, 8",
    ),
    (
        "join_image_and_text",
        [(" | (t < prompt_lengths[:, None] - 1)", "")],
        "the prompt is not scored, the answer is",
        "the loss counts the prompt: row 1 has targets at text positions 0, 1, 2, 3",
    ),
    (
        "join_image_and_text",
        [("torch.full((B, N), IGNORE", "torch.full((B, N), 7")],
        "image positions have target -100",
        "image positions 0, 1, 2, 3 have targets",
    ),
    (
        "join_image_and_text",
        [("tokens[:, 1:]", "tokens[:, :-1]")],
        "targets are the next tokens",
        "the input tokens themselves",
    ),
    (
        "join_image_and_text",
        [("lengths[:, None] - 1)", "lengths[:, None] - 2)")],
        "padding is not scored, <|endoftext|> is",
        "must predict <|endoftext|>",
    ),
    (
        "sample_next",
        [("mass_before >= top_p", "probs.cumsum(dim=-1) > top_p")],
        "top-p keeps the smallest set reaching top_p",
        "dropped the token that crosses top_p. The rule: sort",
    ),
    (
        "sample_next",
        [
            ("    logits = logits / temperature\n", ""),
            ("logits.softmax(dim=-1), 1", "logits.softmax(dim=-1) / temperature, 1"),
        ],
        "temperature divides the logits",
        "temperature has no effect",
    ),
    (
        "clipped_precision",
        [("min(count, most[gram])", "count if gram in most else 0")],
        "matches clipped by the most in one reference",
        "you did not clip",
    ),
    (
        "clipped_precision",
        [("max(0, len(candidate) - n + 1)", "len(candidate) - n + 1")],
        "a caption shorter than n: (0, 0)",
        "expected (0, 0)",
    ),
    (
        "tfidf",
        [("math.log(N / max(1, df[gram]))", "N / max(1, df[gram])")],
        "idf: log(number of images / df)",
        "no log",
    ),
    (
        "tfidf",
        [
            (
                "df.update(set().union(*(ngrams(c) for c in captions)))",
                "df.update(g for c in captions for g in set(ngrams(c)))",
            )
        ],
        "df counts images, not captions",
        "you counted captions",
    ),
    ("tfidf", [("max(1, df[gram])", "df[gram]")], "n-grams in no reference: df = max(1, 0)", "ZeroDivisionError"),
    (
        "train_step",
        [("    optimizer.zero_grad()\n", "")],
        "gradients cleared between steps",
        "call optimizer.zero_grad() once per step",
    ),
    (
        "train_step",
        [("h[:, image.size(1) :]", "h[:, : text.size(1)]")],
        "returns the mean loss over scored text positions",
        "come from the first T positions",
    ),
    (
        "train_step",
        [("ignore_index=-100)", 'reduction="sum") / batch["targets"].numel()')],
        "returns the mean loss over scored text positions",
        "the loss counts padding tokens",
    ),
    (
        "train_step",
        [("    optimizer.step()\n", "")],
        "backward() and optimizer.step() update the weights",
        "call optimizer.step() after loss.backward()",
    ),
    (
        "sincos_2d",
        [("[one_axis(r.reshape(-1)), one_axis(c.reshape(-1))]", "[one_axis(c.reshape(-1)), one_axis(r.reshape(-1))]")],
        "patch (r, c) at row r * cols + c; the row's half first",
        "the row comes first",
    ),
    (
        "sincos_2d",
        [
            (
                "torch.cat([angles.sin(), angles.cos()], dim=1)",
                "torch.stack([angles.sin(), angles.cos()], -1).flatten(1)",
            )
        ],
        "each half: sines, then cosines, w_k = 10000^(-k / (dim/4))",
        "you interleave sin and cos",
    ),
    (
        "sincos_2d",
        [("    if dim % 4:\n", "    if False:\n")],
        "a dim that is not a multiple of 4 raises ValueError",
        "raise",
    ),
    (
        "beam_search",
        [("score + float(row[v])", "float(row[v])")],
        "returns (tokens, score), score the sum of the tokens' log-probs",
        "the score of a beam is the sum of its tokens' log-probs",
    ),
    (
        "beam_search",
        [
            (
                "candidates = [(tokens, score) for tokens, score in beams if tokens and tokens[-1] == eos]",
                "candidates = []",
            )
        ],
        "a beam that ends in eos stops, and competes with its score",
        "a finished beam must stay in the running",
    ),
    (
        "beam_search",
        [("if not tokens or tokens[-1] != eos]", "]"), ("if tokens and tokens[-1] == eos]", "if False]")],
        "a beam that ends in eos stops, and competes with its score",
        "go on after eos",
    ),
    (
        "chair",
        [('(m["color"] is None or o["color"] == m["color"])', 'o["color"] == m["color"]')],
        "CHAIR_i: hallucinated mentions / mentions",
        "fits a circle of any colour",
    ),
    (
        "chair",
        [("mentions += 1", 'mentions += m["count"]')],
        "CHAIR_i: hallucinated mentions / mentions",
        "two mentions",
    ),
    (
        "chair",
        [('        if not caption["parsed"]:\n            continue\n', "")],
        "CHAIR_s: parsed captions with a hallucination / parsed captions",
        "share of the parsed captions",
    ),
    (
        "chair",
        [("if mentions else math.nan", "if mentions else 0.0"), ("if captions else math.nan", "if captions else 0.0")],
        "nothing to measure gives nan",
        "return (nan, nan)",
    ),
    (
        "siglip_loss",
        [("F.normalize(image, dim=-1), F.normalize(text, dim=-1)", "image, text")],
        "embeddings scaled to length 1",
        "scale each to length 1",
    ),  # fmt: skip
    ("siglip_loss", [("log_t.exp() * x", "log_t * x")], "temperature exp(log_t), then the bias b", "t = exp(log_t)"),
    (
        "siglip_loss",
        [("2 * torch.eye(len(x)) - 1", "torch.eye(len(x))")],
        "a binary label per pair: +1 on the diagonal, -1 off it",
        "your labels are 1 and 0",
    ),
    (
        "siglip_loss",
        [(".sum() / len(x)", ".mean()")],
        "summed over all pairs, divided by the batch size",
        "you divide by B^2",
    ),
    (
        "siglip_loss",
        [("labels * logits).sum()", "labels * logits).sum().item()")],
        "a scalar tensor that carries gradients",
        "no gradient",
    ),  # fmt: skip
    (
        "bpe_encode",
        [("_, i = min(candidates)", "_, i = candidates[0]")],
        "the lowest-ranked pair is joined first",
        "you join the first known pair from the left",
    ),
    (
        "bpe_encode",
        [("_, i = min(candidates)", "i = min(candidates, key=lambda c: (c[0], -c[1]))[1]")],
        "the same pair twice: the leftmost first",
        "join the leftmost first",
    ),
    (
        "vqa_accuracy",
        [
            (
                "sum(min(1.0, (sum(matches) - left_out) / 3) for left_out in matches) / len(humans)",
                "min(1.0, sum(matches) / 3)",
            )
        ],
        "min(matches / 3, 1), averaged over the ten leave-one-out sets",
        "averages it over the ten sets of nine humans",
    ),
    (
        "vqa_accuracy",
        [("    if len(set(humans)) > 1:\n", "    if True:\n")],
        "answers normalised when the humans disagree, not when they agree",
        "you normalise even when all humans gave the same string",
    ),
    (
        "media_mask",
        [("image_of[:, None] == latent_image[None, :]", "(image_of[:, None] >= latent_image[None, :])")],
        "each position reads only the last image at or before it",
        "your positions read every image before them",
    ),
    (
        "media_mask",
        [("is_tag.long().cumsum(0) - 1", "is_tag.long().cumsum(0) - 1 - is_tag.long()")],
        "each position reads only the last image at or before it",
        "the image tag's own position must already read its image",
    ),
    (
        "square_image",
        [("left, top = (w - side) // 2, (h - side) // 2", "left, top = 0, 0")],
        "crop keeps the middle square",
        "crop the middle square",
    ),
    (
        "square_image",
        [("out.paste(small, ((size - small.width) // 2, (size - small.height) // 2))", "out.paste(small, (0, 0))")],
        "pad keeps the whole photo, centred on black bars",
        "paste it at ((32 - width) // 2, (32 - height) // 2)",
    ),
]


@pytest.mark.parametrize(
    ("exercise", "edits", "part", "message"), MISTAKES, ids=[f"{m[0]}-{m[2][:20]}" for m in MISTAKES]
)
def test_typical_mistake_is_caught_with_its_own_message(tmp_path, exercise, edits, part, message):
    result = with_mistake(tmp_path, exercise, *edits)
    failed = {p.name: p.message for p in result.parts if p.earned < p.points}
    assert part in failed, grading.format_result(result)
    assert message in failed[part], grading.format_result(result)
    assert 0 < result.score < POINTS or result.score == 0 and result.parts, grading.format_result(result)


def test_every_exercise_has_a_caught_mistake():
    assert {m[0] for m in MISTAKES} == set(EXERCISES)


def test_writing_the_kv_cache_twice_per_step_is_named(tmp_path):
    twice = "cache.update(attn.layer, k, v)\n    k, v = cache.update(attn.layer, k, v)"
    result = with_mistake(tmp_path, "decode_step", ("k, v = cache.update(attn.layer, k, v)", twice))
    assert result.score == 0 and "exceeds the cache's max_len 7" in result.error, grading.format_result(result)
    assert "Call cache.update once per decode step" in result.error


def test_calling_the_package_function_earns_nothing(tmp_path):
    result = with_mistake(
        tmp_path,
        "patchify",
        (
            "return rearrange(",
            "from nanovlm.vit import patchify as p\n    return p(images, patch_size)\n    rearrange(",
        ),
    )
    assert result.score == 0 and "calls nanovlm.vit.patchify" in result.error


def test_a_crash_names_the_call_and_the_line(tmp_path):
    result = with_mistake(tmp_path, "project", ("x = rearrange(", "x = x.view(-1) + rearrange("))
    assert result.score == 0
    assert result.error.startswith("project(projector with pixel_shuffle=2, x of shape (2, 16, 8)) raised RuntimeError")
    assert "(line 6 of your solution cell)" in result.error


# ----------------------------------------------------------------------------- whole submissions


def solution_cell(name: str, source: str) -> dict:
    meta = {"grade": False, "grade_id": name, "locked": False, "schema_version": 3, "solution": True, "task": False}
    return {
        "cell_type": "code",
        "id": name,
        "metadata": {"nbgrader": meta},
        "source": source,
        "outputs": [],
        "execution_count": None,
    }


def test_infinite_loop_exit_and_syntax_error_cost_only_their_exercise(tmp_path):
    bleu = grading.read_notebook(NOTEBOOKS["clipped_precision"])
    correct = "".join(bleu["cells"][grading.find_exercises(bleu)["clipped_precision"]]["source"])
    nb = {
        "cells": [
            solution_cell("patchify", "def patchify(images, patch_size):\n    return images.reshape(\n"),
            solution_cell("clipped_precision", correct),
            solution_cell("tfidf", "def tfidf(caption, references, max_n=4):\n    while True:\n        pass\n"),
            solution_cell(
                "sample_next",
                "import os\n\ndef sample_next(logits, temperature=0.0, top_p=None, generator=None):\n    os._exit(3)\n",
            ),
        ],
        "metadata": {},
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    path = tmp_path / "submitted.ipynb"
    path.write_text(json.dumps(nb))
    results = {r.exercise: r for r in grading.grade_notebook(path, timeout=5).results}
    assert results["clipped_precision"].score == POINTS
    assert results["patchify"].score == 0 and results["patchify"].error.startswith(
        "syntax error in your solution cell, line 2"
    )
    assert results["tfidf"].score == 0 and results["tfidf"].error.startswith(
        "timed out: not done after 5 s, while calling tfidf("
    )
    assert (
        results["sample_next"].score == 0
        and "stopped (exit code 3) while calling sample_next(" in results["sample_next"].error
    )


def test_a_notebook_that_lost_its_nbgrader_metadata_is_graded_by_function_name(tmp_path):
    nb = grading.read_notebook(NOTEBOOKS["clipped_precision"])
    for cell in nb["cells"]:
        cell["metadata"] = {}
    path = tmp_path / "no_metadata.ipynb"
    path.write_text(json.dumps(nb))
    (result,) = grading.grade_notebook(path, isolate=False).results
    assert (result.exercise, result.score) == ("clipped_precision", POINTS)


def test_command_line_reports_json_and_survives_files_that_are_not_notebooks(tmp_path, capsys):
    grading.cli(["--make-student", str(NOTEBOOKS["clipped_precision"]), str(tmp_path / "release")])
    (tmp_path / "broken.ipynb").write_text("{not json")
    (tmp_path / "other.ipynb").write_text(json.dumps({"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    capsys.readouterr()
    grading.cli(["--json", str(tmp_path / "release"), str(tmp_path / "broken.ipynb"), str(tmp_path / "other.ipynb")])
    report = json.loads(capsys.readouterr().out)
    assert (report["score"], report["points"]) == (0, POINTS)
    released, broken, other = report["notebooks"]
    assert released["exercises"][0]["error"].startswith("not attempted")
    assert "not a readable notebook" in broken["error"] and "no exercise found" in other["error"]
    with pytest.raises(ValueError, match="name the notebooks to grade"):
        grading.cli([])


def test_a_class_is_graded_per_student_into_a_csv_and_feedback_files(tmp_path, capsys):
    import csv
    import shutil

    subs = tmp_path / "submissions"
    (subs / "alice" / "week1").mkdir(parents=True)
    (subs / "bob" / ".ipynb_checkpoints").mkdir(parents=True)
    shutil.copy(NOTEBOOKS["clipped_precision"], subs / "alice" / "week1" / "07.ipynb")  # the solution
    shutil.copy(RELEASE / NOTEBOOKS["clipped_precision"].name, subs / "bob" / "07.ipynb")  # not attempted
    shutil.copy(NOTEBOOKS["clipped_precision"], subs / "bob" / ".ipynb_checkpoints" / "07.ipynb")  # Jupyter's copy
    (subs / "carol").mkdir()
    (subs / "carol" / "07.ipynb").write_text("{not json")
    table, feedback = tmp_path / "grades.csv", tmp_path / "feedback"
    grading.cli([str(subs), "--csv", str(table), "--feedback", str(feedback), "--jobs", "2"])
    out = capsys.readouterr().out
    assert "per student:" in out and f"total: {POINTS}/{2 * POINTS} over 2 exercise(s) in 3 notebook(s)" in out
    rows = list(csv.DictReader(table.open()))
    assert [(r["student"], r["exercise"], r["score"]) for r in rows] == [
        ("alice", "7", str(POINTS)),
        ("bob", "7", "0"),
        ("carol", "", "0"),
    ]
    assert rows[1]["problem"].startswith("not attempted") and "not a readable notebook" in rows[2]["problem"]
    assert sorted(p.name for p in feedback.iterdir()) == ["alice.txt", "bob.txt", "carol.txt"]
    assert (
        "Feedback for bob" in (feedback / "bob.txt").read_text() and "alice" not in (feedback / "bob.txt").read_text()
    )
    with pytest.raises(FileNotFoundError, match="nobody"):
        grading.cli([str(tmp_path / "nobody")])


# ----------------------------------------------------------------------------- student versions


def test_student_version_clears_solutions_hidden_tests_and_outputs_as_nbgrader_does():
    meta = lambda **kw: {"nbgrader": {"grade": False, "solution": False, "grade_id": "x", **kw}}  # noqa: E731
    nb = {
        "cells": [
            {
                "cell_type": "code",
                "metadata": meta(solution=True),
                "outputs": [{"output_type": "stream"}],
                "execution_count": 3,
                "source": 'def f(x):\n    """Doc."""\n    ### BEGIN SOLUTION\n    return 2 * x\n    ### END SOLUTION\n',
            },
            {
                "cell_type": "code",
                "metadata": meta(solution=True),
                "outputs": [],
                "execution_count": None,
                "source": "y = 1\n",
            },
            {"cell_type": "markdown", "metadata": meta(solution=True), "source": "my answer"},
            {
                "cell_type": "code",
                "metadata": meta(grade=True, points=1),
                "outputs": [],
                "execution_count": None,
                "source": "assert f(1) == 2\n### BEGIN HIDDEN TESTS\nassert f(2) == 4\n### END HIDDEN TESTS\n",
            },
        ]
    }
    cells = grading.student_version(nb)["cells"]
    source = ["".join(c["source"]) for c in cells]
    assert source[0] == 'def f(x):\n    """Doc."""\n    # YOUR CODE HERE\n    raise NotImplementedError()\n'
    assert cells[0]["outputs"] == [] and cells[0]["execution_count"] is None
    assert source[1] == grading.STUB and source[2] == grading.TEXT_STUB
    assert source[3] == "assert f(1) == 2\n"
    assert "BEGIN SOLUTION" in nb["cells"][0]["source"]  # the source notebook is left alone


@pytest.mark.parametrize(
    ("source", "metadata", "error"),
    [
        ("### BEGIN SOLUTION\nx = 1\n", {"solution": True}, "without an END SOLUTION"),
        ("### BEGIN SOLUTION\nx = 1\n### END SOLUTION\n", {}, "not marked as a solution cell"),
        ("### BEGIN HIDDEN TESTS\nassert 1\n### END HIDDEN TESTS\n", {}, "not marked as an autograded test cell"),
    ],
)
def test_student_version_refuses_badly_marked_regions(source, metadata, error):
    nb = {"cells": [{"cell_type": "code", "metadata": {"nbgrader": metadata}, "source": source}]}
    with pytest.raises(ValueError, match=error):
        grading.student_version(nb, "bad.ipynb")


# ----------------------------------------------------------------------------- the checks follow the package


class ToyTokenizer:
    """Just enough of nanovlm.tokenizer.Tokenizer for a Loader: special ids and one id per character."""

    eot, image, user, assistant = 0, 1, 2, 3

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [[10 + ord(ch) % 50 for ch in text] for text in texts]


@pytest.mark.parametrize("task", ["caption", "qa"])
def test_the_checks_target_rule_is_the_loaders(task):
    split = SimpleNamespace(
        captions=[["ab", "a longer caption"], ["caption that runs past the window"]],
        qa=[
            {"image_id": 7, "question": "what?", "answer": "red"},
            {"image_id": 8, "question": "q", "answer": "a long answer"},
        ],
        images=np.zeros((2, 4, 4, 3), dtype=np.uint8),
        row_of_id={7: 0, 8: 1},
        image_ids=[7, 8],
        dir=Path("toy"),
    )
    loader = Loader(split, ToyTokenizer(), batch_size=2, max_len=10, task=task)
    batch = loader.batch(0)
    for input_ids, targets in zip(batch["input_ids"], batch["targets"], strict=True):
        row = next(r for r in range(len(loader.tokens)) if (loader.tokens[r, :-1] == input_ids.numpy()).all())
        tokens = torch.from_numpy(loader.tokens[row : row + 1].astype(np.int64))
        lengths, prompts = (
            torch.tensor(loader.lengths[row : row + 1]),
            torch.tensor(loader.prompt_lengths[row : row + 1]),
        )
        _, expected = reference_join(torch.zeros(1, 0, 1), torch.zeros(1, 10, 1), tokens, lengths, prompts)
        assert expected[0].tolist() == targets.tolist()


def test_the_checks_top_p_rule_is_the_package_sample_next():
    probs = torch.tensor([0.05, 0.4, 0.1, 0.25, 0.2])
    for temperature, top_p in [(1.0, 0.6), (1.0, 0.9), (0.5, 0.8), (2.0, 0.7)]:
        g = torch.Generator().manual_seed(0)
        drawn = set(sample_next(probs.log().expand(4000, 5), temperature, None, top_p, g).tolist())
        kept = _nucleus(_tempered(probs, temperature), top_p)
        assert drawn == set(torch.where(kept)[0].tolist())


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "0", "soon"])
def test_grade_timeout_must_be_a_finite_positive_number_of_seconds(value):
    result = subprocess.run(
        [sys.executable, "-m", "nanovlm", "grade", "x.ipynb", "--timeout", value], capture_output=True, text=True
    )
    assert result.returncode == 2 and "argument --timeout" in result.stderr and "Traceback" not in result.stderr
