"""The notebooks' prose against their own stored outputs: a number written in a markdown cell must be one the
notebook prints (or a constant its code holds), and a chapter named in the text must exist.

nbval checks that code cells still print what is stored; nothing else would notice a markdown cell that
quotes the result of an earlier run. Numbers below 100 (counts, small constants, step sizes) and years are
too common to check, and numbers inside `code spans` are code. Anything else a notebook's prose may state
without printing it (a citation, a figure derived in the text, a name with a number in it) is listed in
NOT_PRINTED with the reason, where a reviewer sees it.
"""

import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9][0-9]_*.ipynb"))
NUMBER = re.compile(r"(?<![\w.])(\d[\d,]*\.?\d*)(?![\w])")
CHAPTER = re.compile(r"\b[Nn]otebooks? ((?:\d\d)(?:(?:, | and | or | to )\d\d)*)\b")

NOT_PRINTED = {  # notebook -> {number as written, without commas: why the prose may state it}
    "07_training": {
        "6.2": "ln 512, the loss of a uniform guess, worked out in the sentence",
        "256": "a 64x64 image cut into 4x4 patches, worked out in the sentence",
    },
    "08_contrastive_pretraining": {"400": "CLIP's 400 million training pairs, a citation"},
    "11_coco": {"256": "SHA-256, the name of the digest"},
}


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def _numbers(text: str) -> set[str]:
    return {m.group(1).rstrip(".,").replace(",", "") for m in NUMBER.finditer(text)}


def _prose(cell: dict) -> str:
    return re.sub(r"`[^`]*`", "", "".join(cell["source"]))


def _stale_numbers(path: Path) -> list[str]:
    cells = _cells(path)
    printed, written = set(), set()
    for cell in cells:
        if cell["cell_type"] != "code":
            continue
        written |= _numbers("".join(cell["source"]))
        for out in cell.get("outputs", []):
            printed |= _numbers("".join(out.get("text", "")) + "".join(out.get("data", {}).get("text/plain", "")))
    values = {float(n) for n in printed | written}
    allowed = NOT_PRINTED.get(path.stem, {})
    stale = []
    for index, cell in enumerate(cells):
        if cell["cell_type"] != "markdown":
            continue
        for n in sorted(_numbers(_prose(cell))):
            if n in allowed or n in printed or n in written or float(n) in values:
                continue
            if "." in n:  # a printed number rounded to the digits the prose gives
                digits = len(n.split(".")[1])
                if any(abs(float(p) - float(n)) <= 0.5 * 10**-digits + 1e-9 for p in printed):
                    continue
            elif int(n) < 100 or 1900 <= int(n) <= 2099:
                continue
            stale.append(f"cell {index}: {n}")
    return stale


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_number_in_the_prose_is_printed_by_the_notebook(path):
    stale = _stale_numbers(path)
    assert not stale, (
        f"{path.name} states numbers that none of its outputs print: {', '.join(stale)}. Re-read the prose "
        "against the outputs of the last run, or list a citation in NOT_PRINTED with its reason"
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_chapter_the_prose_names_exists(path):
    chapters = {p.name[:2] for p in NOTEBOOKS}
    named = set()
    for cell in _cells(path):
        if cell["cell_type"] == "markdown":
            for match in CHAPTER.finditer("".join(cell["source"])):
                named |= set(re.findall(r"\d\d", match.group(1)))
    assert named <= chapters, f"{path.name} names notebooks {sorted(named - chapters)}, which do not exist"


def test_the_check_finds_a_stale_number(tmp_path):
    stale = {
        "cells": [
            {"cell_type": "code", "source": ["print(0.5)"], "outputs": [{"output_type": "stream", "text": "0.512\n"}]},
            {"cell_type": "markdown", "source": ["The loss fell to 0.51, then to 0.43 after 1,200 steps."]},
        ]
    }
    path = tmp_path / "99_test.ipynb"
    path.write_text(json.dumps(stale))
    assert _stale_numbers(path) == ["cell 1: 0.43", "cell 1: 1200"]


def test_the_chapter_check_reads_single_names_and_lists():
    text = "Notebook 07 trains it; notebooks 04 and 05 explain the parts, notebooks 01, 02 or 12 the rest."
    named = {n for match in CHAPTER.finditer(text) for n in re.findall(r"\d\d", match.group(1))}
    assert named == {"07", "04", "05", "01", "02", "12"}
