"""Draw the whole model once, with the pieces a chapter builds in colour, and put that picture at the top of the
chapter: the map a reader sees on opening each notebook.

    python tools/course_map.py            # redraw every notebooks/NN_*.ipynb's map
    python tools/course_map.py --check    # say which notebooks' maps are missing or name the wrong pieces
    python tools/course_map.py --show 04  # write chapter 04's map to course_map_04.png, to look at

The picture is stored as an attachment of the notebook's first markdown cell (`attachment:course_map.png`), so
it shows in JupyterLab, Colab and GitHub without running anything, and redrawing it changes no code cell or
output. The alt text names the pieces in colour; --check reads it back against PIECES.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
ATTACHMENT = "course_map.png"
MAP_LINE = re.compile(r"^!\[[^\]]*\]\(attachment:course_map\.png\)\n?$")

# name -> (x, y, width, label); every box is 0.8 high, in a 12 x 6.6 canvas
BOXES = {
    "image": (0.2, 4.6, 1.5, "image\n(scenes, COCO)"),
    "patches": (2.2, 4.6, 1.5, "patches\n+ positions"),
    "ViT": (4.2, 4.6, 1.5, "ViT\n(attention)"),
    "projector": (6.4, 4.6, 1.5, "projector\n(pixel shuffle)"),
    "contrastive loss": (8.6, 5.7, 1.6, "contrastive\nloss (CLIP)"),
    "text encoder": (10.5, 5.7, 1.4, "text\nencoder"),
    "resampler + gated cross-attention": (4.0, 2.85, 2.3, "resampler +\ngated cross-attention"),
    "text": (0.2, 1.0, 1.5, "caption or\nquestion"),
    "tokenizer": (2.2, 1.0, 1.5, "tokenizer\n(BPE)"),
    "decoder": (6.4, 1.0, 1.8, "decoder\n(attention, KV cache)"),
    "next token": (8.7, 1.0, 1.5, "next token:\ncaption, answer"),
    "metrics": (10.5, 1.0, 1.4, "metrics"),
}
ARROWS = [  # (from, to, label, arc): arc bends the arrow (matplotlib's arc3 radius)
    ("image", "patches", "", 0),
    ("patches", "ViT", "", 0),
    ("ViT", "projector", "", 0),
    ("projector", "decoder", "image tokens\nfirst", 0),
    ("ViT", "contrastive loss", "", 0),
    ("text encoder", "contrastive loss", "", 0),
    ("ViT", "resampler + gated cross-attention", "", 0),
    ("resampler + gated cross-attention", "decoder", "", 0),
    ("patches", "projector", "early fusion: no ViT", 0.3),
    ("text", "tokenizer", "", 0),
    ("tokenizer", "decoder", "", 0),
    ("decoder", "next token", "", 0),
    ("next token", "metrics", "", 0),
]
TRAINER = "trainer"  # the frame around it all: one loop trains every piece
PIECES = {  # chapter -> the pieces it builds or uses first, in colour on its map
    "01": ["image", "patches"],
    "02": ["text", "tokenizer"],
    "03": ["ViT", "decoder"],
    "04": ["patches", "ViT"],
    "05": ["tokenizer", "decoder", "next token"],
    "06": ["ViT", "projector", "decoder"],
    "07": [TRAINER],
    "08": ["ViT", "contrastive loss", "text encoder"],
    "09": ["next token", "metrics"],
    "10": ["text", "decoder", "next token"],
    "11": ["image", "text", TRAINER],
    "12": ["patches", "projector", "resampler + gated cross-attention", "decoder"],
}
ON, OFF, EDGE = "#f4a259", "#eeeeee", "#555555"


def _edge(name: str, towards: tuple[float, float]) -> tuple[float, float]:
    """The point where the line from the box's centre to `towards` leaves the box."""
    x, y, w, _ = BOXES[name]
    cx, cy = x + w / 2, y + 0.4
    dx, dy = towards[0] - cx, towards[1] - cy
    scale = min(w / 2 / abs(dx) if dx else float("inf"), 0.4 / abs(dy) if dy else float("inf"))
    return cx + dx * scale, cy + dy * scale


def _centre(name: str) -> tuple[float, float]:
    x, y, w, _ = BOXES[name]
    return x + w / 2, y + 0.4


def draw(chapter: str):
    """The map for one chapter (its two-digit number); returns the matplotlib Figure."""
    lit = set(PIECES[chapter])
    fig, ax = plt.subplots(figsize=(9.6, 5.3), dpi=80)
    ax.set_xlim(0, 12.1)
    ax.set_ylim(0.3, 6.9)
    ax.axis("off")
    frame = FancyBboxPatch(
        (0.05, 0.55), 11.95, 6.2, boxstyle="round,pad=0,rounding_size=0.2", fill=TRAINER in lit,
        facecolor="#fde8d4", edgecolor=ON if TRAINER in lit else "#bbbbbb", linestyle="--", linewidth=2,
    )  # fmt: skip
    ax.add_patch(frame)
    ax.text(0.25, 6.45, "trainer: one loop trains every piece", fontsize=9, color=EDGE, style="italic")
    for start, end, label, arc in ARROWS:
        a, b = _edge(start, _centre(end)), _edge(end, _centre(start))
        if arc:  # a bent arrow leaves and enters through the boxes' bottoms
            a, b = (a[0], BOXES[start][1]), (b[0], BOXES[end][1])
        arrow = FancyArrowPatch(
            a, b, arrowstyle="-|>", mutation_scale=12, color="#888888", shrinkA=2, shrinkB=2,
            connectionstyle=f"arc3,rad={arc}", linewidth=1.2,
        )  # fmt: skip
        ax.add_patch(arrow)
        if label:
            if arc:  # under the bent arrow's start, clear of the arrows in the middle
                ax.text(a[0] + 0.5, a[1] - 0.5, label, fontsize=7.5, color=EDGE, ha="right", va="center")
            else:
                ax.text((a[0] + b[0]) / 2 + 0.1, (a[1] + b[1]) / 2, label, fontsize=7.5, color=EDGE, va="center")
    for name, (x, y, w, label) in BOXES.items():
        box = FancyBboxPatch(
            (x, y), w, 0.8, boxstyle="round,pad=0.02,rounding_size=0.1", facecolor=ON if name in lit else OFF,
            edgecolor=EDGE, linewidth=1.5 if name in lit else 0.8,
        )  # fmt: skip
        ax.add_patch(box)
        ax.text(x + w / 2, y + 0.4, label, ha="center", va="center", fontsize=8.5,
                weight="bold" if name in lit else "normal")  # fmt: skip
    ax.set_title(f"Notebook {chapter}: the pieces in colour", fontsize=11)
    fig.tight_layout()
    return fig


def png(chapter: str) -> bytes:
    fig = draw(chapter)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()


def alt_text(chapter: str) -> str:
    return f"Where notebook {chapter} sits in the model: {', '.join(PIECES[chapter])} in colour"


def map_line(chapter: str) -> str:
    return f"![{alt_text(chapter)}](attachment:{ATTACHMENT})\n"


def _first_markdown(nb: dict) -> dict:
    return next(cell for cell in nb["cells"] if cell["cell_type"] == "markdown")


def embed(path: Path) -> None:
    """Put the chapter's map under the title of the notebook's first markdown cell (replacing an older map)."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    chapter = path.name[:2]
    cell = _first_markdown(nb)
    lines = [line for line in "".join(cell["source"]).splitlines(keepends=True) if not MAP_LINE.match(line)]
    title, rest = lines[0].rstrip("\n") + "\n", lines[1:]
    while rest and not rest[0].strip():
        rest.pop(0)
    cell["source"] = [title, "\n", map_line(chapter), "\n", *rest]
    cell["attachments"] = {ATTACHMENT: {"image/png": base64.b64encode(png(chapter)).decode("ascii")}}
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def problems(path: Path) -> list[str]:
    """What is wrong with a notebook's map: missing, not a PNG, or an alt text that names other pieces."""
    chapter = path.name[:2]
    if chapter not in PIECES:
        return [f"{path.name}: no chapter {chapter} in PIECES"]
    cell = _first_markdown(json.loads(path.read_text(encoding="utf-8")))
    data = cell.get("attachments", {}).get(ATTACHMENT, {}).get("image/png")
    if data is None:
        return [f"{path.name}: its first markdown cell has no {ATTACHMENT} attachment"]
    found = []
    if not base64.b64decode(data).startswith(b"\x89PNG\r\n\x1a\n"):
        found.append(f"{path.name}: the {ATTACHMENT} attachment is not a PNG")
    if map_line(chapter) not in "".join(cell["source"]).splitlines(keepends=True):
        found.append(f"{path.name}: the map's line is missing or names other pieces than {PIECES[chapter]}")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report notebooks whose map is missing or stale")
    parser.add_argument("--show", metavar="NN", help="write one chapter's map to course_map_NN.png")
    args = parser.parse_args(argv)
    if args.show:
        if args.show not in PIECES:
            parser.error(f"--show {args.show}: no such chapter; the chapters are {', '.join(PIECES)}")
        Path(f"course_map_{args.show}.png").write_bytes(png(args.show))
        print(f"wrote course_map_{args.show}.png")
        return 0
    paths = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if args.check:
        found = [p for path in paths for p in problems(path)]
        print("\n".join(found) or f"every map is in place ({len(paths)} notebooks)")
        return 1 if found else 0
    for path in paths:
        embed(path)
        print(f"drew the map of {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
