"""Calling the student's function for a check, and reading what it returned.

The errors here end a check early; a call of the package function the exercise asks for is refused.
"""

import contextlib
import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

SOLUTION_FILE = "<your solution cell>"  # the file name tracebacks show for the student's cell


class StudentError(Exception):
    """The student's function crashed or returned something unusable: the exercise cannot be graded further."""


class NotAttempted(Exception):
    """The function still raises NotImplementedError."""


class UsedReference(Exception):
    """The student's function called the package function it is asked to write."""


@contextlib.contextmanager
def refusing(forbidden: dict[Callable, str]) -> Iterator[None]:
    """While active, calling one of `forbidden` (function -> the name to show) raises UsedReference(name).

    A call is recognised by what it runs (a Python function's code, or the builtin itself) through a profile
    function, so the package's modules stay as they are and a copy imported under another name is caught too.
    """
    codes = {f.__code__: name for f, name in forbidden.items() if hasattr(f, "__code__")}
    builtins = [(f, name) for f, name in forbidden.items() if not hasattr(f, "__code__")]

    def profile(frame, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code in codes:
            raise UsedReference(codes[frame.f_code])
        if event == "c_call":
            for f, name in builtins:
                if arg is f:
                    raise UsedReference(name)

    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        yield
    finally:
        sys.setprofile(previous)


def where_in_solution(error: BaseException) -> str:
    """' (line N of your solution cell)' for the deepest traceback frame in the student's code, else ''."""
    line = None
    tb = error.__traceback__
    while tb is not None:
        name = tb.tb_frame.f_code.co_filename
        if name == SOLUTION_FILE or "ipykernel_" in name:
            line = tb.tb_lineno
        tb = tb.tb_next
    return f" (line {line} of your solution cell)" if line else ""


@dataclass
class Student:
    """The student's function as the checks call it, with the forbidden package functions refused.

    Each call is announced to `report`: the grading process tells its parent, so a time-out can say what ran.
    """

    fn: Callable
    forbidden: dict[Callable, str] = field(default_factory=dict)  # package function -> its name in the feedback
    report: Callable[[str], None] | None = None

    def call(self, what: str, args: tuple, kwargs: dict | None = None, hints: dict[str, str] | None = None) -> Any:
        """Call the function; any exception becomes a StudentError naming the call, the line and a hint."""
        if self.report:
            self.report(f"calling {what}")
        try:
            with refusing(self.forbidden):
                return self.fn(*args, **(kwargs or {}))
        except NotImplementedError:
            name = getattr(self.fn, "__name__", "the function")
            raise NotAttempted(
                f"not attempted: {name} raises NotImplementedError; write your solution in its cell"
            ) from None
        except UsedReference as e:
            raise StudentError(
                f"{what} calls {e}, the very function this exercise asks you to write: write it yourself"
            ) from None
        except Exception as e:
            hint = next((f". {h}" for key, h in (hints or {}).items() if key in str(e)), "")
            raise StudentError(f"{what} raised {type(e).__name__}: {e}{where_in_solution(e)}{hint}") from None


# ----------------------------------------------------------------------------- what came back


def returned_tensor(value: Any, what: str) -> torch.Tensor:
    """The student's return value as a detached tensor, or a StudentError saying what came back instead."""
    if isinstance(value, torch.Tensor):
        return value.detach()
    if value is None:
        raise StudentError(f"{what} returned None: did you forget the `return`?")
    if isinstance(value, tuple):
        raise StudentError(f"{what} returned a tuple of {len(value)} things; return one tensor")
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        raise StudentError(f"{what} returned a {type(value).__name__}; return a torch.Tensor") from None


def shape_of(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-5, rtol: float = 1e-4) -> bool:
    return a.shape == b.shape and torch.allclose(a.double(), b.double(), atol=atol, rtol=rtol)


def largest_difference(got: torch.Tensor, expected: torch.Tensor, dims: str) -> str:
    """'largest difference 0.31 at (batch 0, head 1, position 2)' for two tensors of one shape."""
    diff = (got.double() - expected.double()).abs().nan_to_num(nan=math.inf)
    index = np.unravel_index(int(diff.argmax()), tuple(diff.shape))
    place = ", ".join(f"{name} {i}" for name, i in zip(dims.split(), index, strict=False))
    return f"largest difference {float(diff.max()):.3g} at ({place})"


def listing(items: list, limit: int = 4) -> str:
    shown = ", ".join(str(i) for i in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")
