"""The seventeen exercises, and grading one function in this process.

An exercise names the function the student writes, its check (in exNN_*.py) and the package functions the
student's code may not call. Each check takes the student's function (wrapped in a Student) and returns the
graded parts. Inputs are seeded, so a student's grade does not change between runs; they are drawn afresh by
the check, so fitting the visible tests of a notebook does not help.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from . import ex01_patchify as ex01
from . import ex02_causal_attention as ex02
from . import ex03_kv_cache as ex03
from . import ex04_projector as ex04
from . import ex05_loss_mask as ex05
from . import ex06_sampling as ex06
from . import ex07_bleu as ex07
from . import ex08_cider as ex08
from . import ex09_train_step as ex09
from . import ex10_sincos_2d as ex10
from . import ex11_beam_search as ex11
from . import ex12_chair as ex12
from . import ex13_siglip_loss as ex13
from . import ex14_bpe_encode as ex14
from . import ex15_vqa_accuracy as ex15
from . import ex16_media_mask as ex16
from . import ex17_square_image as ex17
from .results import POINTS, Part, Result, format_result
from .student import NotAttempted, Student, StudentError


@dataclass(frozen=True)
class Exercise:
    """One exercise: the function asked for, how it is checked, and what the student may not call."""

    number: int
    name: str  # the function the student writes, and the grade_id of the cell it is written in
    title: str
    check: Callable[[Student], list[Part]]
    forbidden: tuple[tuple[Any, str], ...] = ()  # (module or class, name) of the package functions refused

    def failed(self, error: str) -> Result:
        """A zero for this exercise, with the reason nothing could be graded."""
        return Result(self.name, self.number, self.title, POINTS, 0, [], error)

    def student(self, fn: Callable, report: Callable[[str], None] | None = None) -> Student:
        """The student's function, ready for this exercise's check (which refuses the forbidden functions)."""
        forbidden = {getattr(owner, name): f"{owner.__name__}.{name}" for owner, name in self.forbidden}
        return Student(fn, forbidden, report)


EXERCISES: dict[str, Exercise] = {
    e.name: e
    for e in [
        Exercise(1, "patchify", "cut images into patches", ex01.check_patchify, ex01.FORBIDDEN),
        Exercise(2, "causal_attention", "attention with a causal mask", ex02.check_causal_attention, ex02.FORBIDDEN),
        Exercise(3, "decode_step", "one KV-cache decode step", ex03.check_decode_step, ex03.FORBIDDEN),
        Exercise(4, "project", "the projector: pixel shuffle and MLP", ex04.check_project, ex04.FORBIDDEN),
        Exercise(
            5,
            "join_image_and_text",
            "join image and text tokens, with the loss mask",
            ex05.check_join_image_and_text,
            ex05.FORBIDDEN,
        ),
        Exercise(6, "sample_next", "greedy, temperature and top-p decoding", ex06.check_sample_next, ex06.FORBIDDEN),
        Exercise(
            7, "clipped_precision", "BLEU's clipped n-gram precision", ex07.check_clipped_precision, ex07.FORBIDDEN
        ),
        Exercise(8, "tfidf", "CIDEr's tf-idf weights", ex08.check_tfidf, ex08.FORBIDDEN),
        Exercise(9, "train_step", "a captioning training step", ex09.check_train_step, ex09.FORBIDDEN),
        Exercise(10, "sincos_2d", "2-D sine-cosine position embeddings", ex10.check_sincos_2d, ex10.FORBIDDEN),
        Exercise(11, "beam_search", "beam search decoding", ex11.check_beam_search, ex11.FORBIDDEN),
        Exercise(12, "chair", "the CHAIR hallucination scores", ex12.check_chair, ex12.FORBIDDEN),
        Exercise(13, "siglip_loss", "SigLIP's sigmoid contrastive loss", ex13.check_siglip_loss, ex13.FORBIDDEN),
        Exercise(14, "bpe_encode", "encoding a word with BPE merges", ex14.check_bpe_encode, ex14.FORBIDDEN),
        Exercise(15, "vqa_accuracy", "the VQA accuracy of one answer", ex15.check_vqa_accuracy, ex15.FORBIDDEN),
        Exercise(16, "media_mask", "Flamingo's mask for several images", ex16.check_media_mask, ex16.FORBIDDEN),
        Exercise(17, "square_image", "a photo made square: crop or pad", ex17.check_square_image, ex17.FORBIDDEN),
    ]
}


def exercise_named(name: str) -> Exercise:
    if name not in EXERCISES:
        raise ValueError(f"no exercise named {name!r}; the exercises are {', '.join(EXERCISES)}")
    return EXERCISES[name]


def check_function(exercise: str, fn: Callable, report: Callable[[str], None] | None = None) -> Result:
    """Grade one function in this process, with no time limit (the notebooks' check cells and the tests use it).

    `report` is told what runs (the grading process passes it on to its parent).
    """
    ex = exercise_named(exercise)
    if not callable(fn):
        return ex.failed(f"{ex.name} is a {type(fn).__name__}, not a function")
    try:
        with torch.random.fork_rng(devices=[]):
            parts = ex.check(ex.student(fn, report))
    except (NotAttempted, StudentError) as e:
        return ex.failed(str(e))
    except Exception as e:  # a return value so odd that the check itself tripped: grade it zero, don't crash
        return ex.failed(f"the check could not make sense of your function's output ({type(e).__name__}: {e})")
    return Result(ex.name, ex.number, ex.title, POINTS, sum(p.earned for p in parts), parts)


def check(exercise: str, fn: Callable) -> None:
    """Print the feedback on one function; raise AssertionError unless it earns full marks (for test cells)."""
    result = check_function(exercise, fn)
    print(format_result(result))
    if not result.full_marks:
        raise AssertionError(f"{result.score}/{result.points} points for {exercise}: see the feedback above")
