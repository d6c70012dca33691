"""Pictures: patch grids, attention maps over the image, captions under images, loss curves, and a
contrastive model's image-text similarities.

Every function returns a matplotlib Figure and, given a path, also writes it there as a PNG (and closes
it, so scripts do not pile up open figures). Images are (H, W, 3) uint8 arrays, as stored in the prepared
data, or (3, H, W) float tensors in [0, 1], as the model reads them.
"""

import json
import math
import textwrap
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib import patheffects
from matplotlib.figure import Figure

from .clip import CLIP
from .clip_eval import embed_images, embed_texts
from .data import PackedSplit, to_tensor
from .tokenizer import Tokenizer
from .vit import patchify
from .vlm import VLM

Image = np.ndarray | torch.Tensor  # (H, W, 3) uint8 or (3, H, W) float in [0, 1]


def as_pixels(image: Image) -> torch.Tensor:
    """The image as the model reads it: a (3, H, W) float tensor in [0, 1]."""
    if isinstance(image, torch.Tensor) and image.ndim == 3 and image.shape[0] == 3:
        return image.detach().float().cpu()
    if isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8:
        return to_tensor(image[None])[0]
    kind = f"{type(image).__name__} of shape {tuple(image.shape)}" if hasattr(image, "shape") else type(image).__name__
    raise TypeError(f"got an image as a {kind}; pass an (H, W, 3) uint8 array or a (3, H, W) float tensor")


def _hwc(pixels: torch.Tensor) -> np.ndarray:
    """(3, H, W) tensor -> (H, W, 3) array for imshow."""
    return pixels.permute(1, 2, 0).clamp(0, 1).numpy()


def _finish(fig: Figure, path: str | Path | None) -> Figure:
    """Write fig to path as a PNG (then close it) if a path is given; return it."""
    if path is not None:
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return fig


# ----------------------------------------------------------------------------- patches: what the ViT reads


def show_patches(image: Image, patch_size: int, path: str | Path | None = None) -> Figure:
    """The image with the patch grid drawn over it and each patch's index (its place in the sequence)."""
    pixels = as_pixels(image)
    _, H, W = pixels.shape
    if H % patch_size or W % patch_size:
        raise ValueError(f"a {H}x{W} image does not cut into {patch_size}x{patch_size} patches; pick a divisor")
    rows, cols = H // patch_size, W // patch_size
    fig, ax = plt.subplots(figsize=(5, 5 * H / W), layout="constrained")
    ax.imshow(_hwc(pixels), extent=(0, W, H, 0))
    for x in range(0, W + 1, patch_size):
        ax.axvline(x, color="white", lw=1)
    for y in range(0, H + 1, patch_size):
        ax.axhline(y, color="white", lw=1)
    for i in range(rows * cols):
        r, c = divmod(i, cols)
        centre = ((c + 0.5) * patch_size, (r + 0.5) * patch_size)
        label = ax.text(*centre, str(i), ha="center", va="center", fontsize=max(5, 80 // cols))
        label.set_path_effects([patheffects.withStroke(linewidth=2, foreground="white")])
    ax.set(xlabel="x (pixels)", ylabel="y (pixels)")
    ax.set_title(f"{rows * cols} patches of {patch_size}x{patch_size} pixels, numbered in reading order")
    return _finish(fig, path)


def patch_grid(image: Image, patch_size: int, cols: int | None = None, path: str | Path | None = None) -> Figure:
    """The patches vit.patchify cuts, drawn apart in sequence order, cols per row (default: as in the image)."""
    pixels = as_pixels(image)
    _, H, W = pixels.shape
    if H % patch_size or W % patch_size:
        raise ValueError(f"a {H}x{W} image does not cut into {patch_size}x{patch_size} patches; pick a divisor")
    patches = patchify(pixels[None], patch_size)[0]  # (N, P*P*3), channels fastest: (p1 p2 c)
    n = patches.size(0)
    cols = cols or W // patch_size
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(max(5, 0.8 * cols), 0.8 * rows + 0.8), squeeze=False, layout="constrained"
    )
    for i, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if i < n:
            ax.imshow(patches[i].view(patch_size, patch_size, 3).clamp(0, 1).numpy())
            ax.set_title(str(i), fontsize=7, pad=2)
    fig.suptitle(f"What the ViT reads: {n} patches of {patch_size}x{patch_size}x3 = {patches.size(1)} numbers")
    fig.supxlabel("patch index = position in the sequence (left to right, then top to bottom)", fontsize=9)
    return _finish(fig, path)


# ----------------------------------------------------------------------------- attention


def attention_matrix(
    weights: torch.Tensor | np.ndarray,
    labels_q: list[str] | None = None,
    labels_k: list[str] | None = None,
    title: str = "Attention weights",
    path: str | Path | None = None,
) -> Figure:
    """Heatmap of one (Tq, Tk) attention matrix: row q is how query q spreads its attention over the keys."""
    w = weights.detach().float().cpu().numpy() if isinstance(weights, torch.Tensor) else np.asarray(weights)
    if w.ndim != 2:
        raise ValueError(f"attention weights of shape {w.shape}; pass one (Tq, Tk) matrix, e.g. weights[0, head]")
    for labels, size, name in ((labels_q, w.shape[0], "labels_q"), (labels_k, w.shape[1], "labels_k")):
        if labels is not None and len(labels) != size:
            raise ValueError(f"{name} has {len(labels)} labels for {size} rows/columns; give one per token")
    fig, ax = plt.subplots(figsize=(2 + 0.25 * w.shape[1], 1.5 + 0.25 * w.shape[0]), layout="constrained")
    im = ax.imshow(w, cmap="viridis", vmin=0)
    fig.colorbar(im, ax=ax, label="attention weight", shrink=0.8)
    if labels_k is not None:
        ax.set_xticks(range(len(labels_k)), labels_k, rotation=90, fontsize=7)
    if labels_q is not None:
        ax.set_yticks(range(len(labels_q)), labels_q, fontsize=7)
    ax.set(xlabel="key (attended to)", ylabel="query (attending)", title=title)
    return _finish(fig, path)


@torch.no_grad()
def word_attention(
    model: VLM, tokenizer: Tokenizer, image: Image, max_new_tokens: int | None = None
) -> tuple[list[str], np.ndarray]:
    """Greedy-caption one image; return its tokens and where each looked: maps (n_layers, n_words, g, g).

    maps[l, i] is the attention, averaged over heads in decoder layer l, from the position that predicted
    word i to every image token, laid out on the g x g token grid. Each map sums to at most 1: the rest
    went to the text before the word. With pixel shuffle s, one image token covers an s x s square of
    patches, so the grid is s times coarser than the patch grid.

    With cross fusion the words read latents, not patches: maps[l, i] is then gated cross-attention layer
    l's weights on the latents, carried to the g x g grid of the features the resampler reads through its last
    attention (each latent's weights on the features: patches, or s x s squares of them with the cross
    pixel_shuffle s), so each map sums to 1 less what the latents gave each other. With region latents
    (latent r starts from region r of a sqrt(L) x sqrt(L) grid) maps[l, i] is the weights on the latents
    themselves, laid out on that grid: which regions' latents the word read, each map summing to 1.
    How much a layer's reading counts is its gate, tanh(attn_gate), which the weights do not show.
    """
    model.eval()
    device = next(model.parameters()).device
    pixels = as_pixels(image).to(device)[None]  # (1, 3, H, W)
    prompt = torch.tensor([[tokenizer.image]], device=device)  # (1, Tp)
    max_new_tokens = max_new_tokens or model.cfg.max_text_len - 1
    new = model.generate(pixels, prompt, max_new_tokens, eot=tokenizer.eot)[0]
    # one exact forward over the image and prompt + caption, keeping every layer's attention weights
    cross = model.cfg.fusion == "cross"
    layers = [block.attn for block in model.xattn] if cross else [block.attn for block in model.decoder.blocks]
    watched = [*layers, model.resampler.blocks[-1].attn] if cross else layers
    try:
        for attn in watched:
            attn.keep_weights = True
        img = model.image_tokens(pixels)  # (1, N, D): image tokens, or latents with cross fusion
        text = model.decoder.embed(torch.cat([prompt, prompt.new_tensor(new).view(1, -1)], dim=1))  # (1, Tp + n, D)
        model.hidden(model.sequence(img, text), img)
    finally:
        for attn in watched:
            attn.keep_weights = False
    first = model.cfg.n_image_tokens + prompt.size(1) - 1  # the position that predicts the first new token
    rows = torch.arange(first, first + len(new), device=device)
    if cross and model.cfg.cross.region_latents:
        N = model.cfg.cross.n_latents
        maps = torch.stack([attn.weights[0].mean(0)[rows] for attn in layers])  # (L_x, n_words, L)
    elif cross:
        N = model.cfg.vit.n_patches // model.cfg.cross.pixel_shuffle**2
        to_patches = model.resampler.blocks[-1].attn.weights[0].mean(0)[:, :N]  # (L, N): each latent's patches
        maps = torch.stack([attn.weights[0].mean(0)[rows] @ to_patches for attn in layers])  # (L_x, n_words, N)
    else:
        N = img.size(1)
        maps = torch.stack([attn.weights[0].mean(0)[rows, :N] for attn in layers])  # (L, n_words, N)
    g = math.isqrt(N)
    words = [tokenizer.decode([t]) for t in new]
    return words, maps.view(len(layers), len(new), g, g).float().cpu().numpy()


def plot_word_attention(
    image: Image,
    words: list[str],
    maps: np.ndarray,
    layer: int | None = None,
    cols: int = 8,
    path: str | Path | None = None,
    cross: bool = False,
) -> Figure:
    """One panel per word: the image with that word's attention over the image tokens laid on top.

    layer=None averages the layers. Every panel shares one colour scale, so panels compare directly.
    cross=True labels maps of a cross-fusion model (word_attention's layers are then its gated layers).
    """
    if maps.ndim != 4 or maps.shape[1] != len(words) or not words:
        raise ValueError(f"maps of shape {maps.shape} for {len(words)} words; pass word_attention's output")
    shown = maps.mean(0) if layer is None else maps[layer]  # (n_words, g, g)
    pixels = _hwc(as_pixels(image))
    H, W, _ = pixels.shape
    cols = min(cols, len(words))
    rows = math.ceil(len(words) / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(1.6 * cols + 0.8, 1.8 * rows + 0.6), squeeze=False, layout="constrained"
    )
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, word, heat in zip(axes.flat, words, shown, strict=False):
        ax.imshow(pixels)
        im = ax.imshow(heat, extent=(0, W, H, 0), cmap="inferno", vmin=0, vmax=shown.max(), alpha=0.6)
        ax.set_title(repr(word.strip() or word), fontsize=9)
    fig.colorbar(im, ax=axes, label="attention weight", shrink=0.8)
    kind = "gated cross-attention layer" if cross else "decoder layer"
    which = "averaged over layers" if layer is None else f"{kind} {layer}"
    fig.suptitle(f"Where each generated word looked in the image ({which}, mean over heads)")
    g = maps.shape[2]
    squares = f"{g}x{g} squares of the image, reached through the latents," if cross else f"{g}x{g} image tokens,"
    fig.supxlabel(f"each square is one of {squares} covering {H // g}x{W // g} pixels", fontsize=9)
    return _finish(fig, path)


# ----------------------------------------------------------------------------- captions under images


def caption_sheet(
    images: np.ndarray,
    captions: list[str],
    references: list[str] | None = None,
    path: str | Path | None = None,
    n: int = 16,
    cols: int = 4,
) -> Figure:
    """The first n images, each with the generated caption (black) and a reference (grey) written under it."""
    if len(captions) != len(images) or (references is not None and len(references) != len(images)):
        refs = "no" if references is None else len(references)
        raise ValueError(
            f"got {len(images)} images, {len(captions)} captions and {refs} references; pass one of each per image"
        )
    n = min(n, len(images))
    if n == 0:
        raise ValueError("caption_sheet got no images; pass at least one")
    texts = [textwrap.fill(c, width=36) for c in captions[:n]]
    refs = [textwrap.fill(f"truth: {r}", width=36) for r in references[:n]] if references is not None else None
    lines = max(t.count("\n") + 1 + (refs[i].count("\n") + 2 if refs else 0) for i, t in enumerate(texts))
    # lay the cells out in inches: an image, then room for the longest text under any image
    img, gap, top, line_pt = 2.4, 0.2, 0.5, 10.0
    text_h = lines * line_pt / 72 + 0.15
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    W, H = gap + cols * (img + gap), top + rows * (img + text_h)
    fig = plt.figure(figsize=(W, H))
    for i in range(n):
        r, c = divmod(i, cols)
        left, bottom = gap + c * (img + gap), H - top - r * (img + text_h) - img
        ax = fig.add_axes((left / W, bottom / H, img / W, img / H))
        ax.imshow(_hwc(as_pixels(images[i])))
        ax.set_axis_off()
        style = dict(xycoords="axes fraction", textcoords="offset points", ha="center", va="top", fontsize=8)
        ax.annotate(texts[i], (0.5, 0), xytext=(0, -4), **style)
        if refs:
            below = -4 - (texts[i].count("\n") + 1.4) * line_pt  # one blank half-line under the caption
            ax.annotate(refs[i], (0.5, 0), xytext=(0, below), color="0.45", **style)
    fig.suptitle("Generated captions" + (" (black) and a reference caption (grey)" if refs else ""), y=1 - 0.15 / H)
    return _finish(fig, path)


# ----------------------------------------------------------------------------- training curves


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl log written by the trainer."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_losses(metrics_path: str | Path, out_path: str | Path | None = None):
    """Training and validation loss against step; saved to out_path if given. Returns the figure."""
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if train:
        ax.plot(*zip(*train, strict=True), label="train", lw=1)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation", ms=3)
    ax.set(xlabel="step", ylabel="loss (nats per token)", yscale="log", title="Training loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    if out_path is not None:
        fig.savefig(out_path, dpi=120)
        plt.close(fig)
    return fig


def plot_gates(metrics_path: str | Path, out_path: str | Path | None = None) -> Figure:
    """tanh(attention gate) of each gated cross-attention layer against step, from a cross-fusion run's log."""
    records = [r for r in read_metrics(metrics_path) if "gates" in r]
    if not records:
        raise ValueError(f"{metrics_path} has no gate values: it is not the log of a model with cross fusion")
    steps = [r["step"] for r in records]
    gates = np.array([r["gates"] for r in records])  # (n_records, n_layers)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for layer in range(gates.shape[1]):
        ax.plot(steps, gates[:, layer], label=f"gated layer {layer}")
    ax.axhline(0, color="0.6", lw=0.8)
    ax.set(xlabel="step", ylabel="tanh(gate)", title="How far each cross-attention gate has opened")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _finish(fig, out_path)


def plot_throughput(rows: list[dict], title: str = "", out_path: str | Path | None = None) -> Figure:
    """Bars of samples/s and MFU for the rows of `python -m nanovlm bench train` (one bar per mode)."""
    names = [f"{'compiled' if r['compile'] else 'eager'}\n{r['dtype']}" for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3.2))
    left.bar(names, [r["samples_per_s"] for r in rows], color="tab:blue")
    left.set(ylabel="samples / s", title="Training throughput")
    right.bar(names, [100 * r["mfu"] for r in rows], color="tab:orange")
    right.set(ylabel="% of the matmul peak", title="MFU (against the peak of its own dtype)")
    for ax, key, fmt in ((left, "samples_per_s", "{:.0f}"), (right, "mfu", "{:.0%}")):
        for x, r in enumerate(rows):
            ax.annotate(fmt.format(r[key]), (x, ax.get_ylim()[1] * 0.02), ha="center", color="white")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return _finish(fig, out_path)


# ----------------------------------------------------------------------------- image-text similarity (CLIP)


def similarity_sheet(
    model: CLIP, tokenizer: Tokenizer, split: PackedSplit, n: int = 8, path: str | Path | None = None
) -> Figure:
    """Cosine similarity of the first n images (columns, drawn on top) with their canonical captions (rows).

    A caption's own image is on the diagonal; white frames mark every cell whose image has that exact
    caption, the pairs a perfect model puts above the rest of their row.
    """
    n = min(n, len(split))
    if n == 0:
        raise ValueError(f"similarity_sheet got an empty split {split.dir}; pass one with images")
    captions = [refs[0] for refs in split.captions[:n]]
    sim = (embed_texts(model, tokenizer, captions) @ embed_images(model, split.images[:n]).T).numpy()  # (n, n)
    fig, ax = plt.subplots(figsize=(4.5 + 0.75 * n, 1.6 + 0.8 * n), layout="constrained")
    im = ax.imshow(sim, cmap="viridis")
    for j in range(n):  # the images, one cell above their column
        ax.imshow(_hwc(as_pixels(split.images[j])), extent=(j - 0.45, j + 0.45, -0.6, -1.5))
    middle = (sim.max() + sim.min()) / 2
    for i, j in np.ndindex(n, n):
        color = "black" if sim[i, j] > middle else "white"
        ax.text(j, i, f"{sim[i, j]:.2f}", ha="center", va="center", fontsize=7, color=color)
        if captions[i] == captions[j]:
            ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="white", lw=2))
    ax.set(xlim=(-0.5, n - 0.5), ylim=(n - 0.5, -1.6))
    ax.set_xticks(range(n), [str(j) for j in range(n)])
    labels = [f"{i}: {textwrap.shorten(c, width=56, placeholder=' ...')}" for i, c in enumerate(captions)]
    ax.set_yticks(range(n), labels, fontsize=7)
    ax.set(xlabel="image", ylabel="canonical caption of image ...")
    fig.colorbar(im, ax=ax, label="cosine similarity", shrink=0.7)
    ax.set_title("Image-caption cosine similarity: each caption should light up its own column")
    return _finish(fig, path)


def retrieve_sheet(
    model: CLIP,
    tokenizer: Tokenizer,
    split: PackedSplit,
    query: str,
    k: int = 8,
    path: str | Path | None = None,
    limit: int | None = None,
) -> Figure:
    """The k images (of the first `limit`) most similar to a typed caption, best first, with their similarity."""
    n = min(limit or len(split), len(split))
    if n == 0 or k < 1:
        raise ValueError(f"retrieve_sheet: k={k} of {n} images; ask for at least 1 of a split with images")
    sim = (embed_images(model, split.images[:n]) @ embed_texts(model, tokenizer, [query])[0]).numpy()  # (n,)
    top = np.argsort(-sim, kind="stable")[:k]
    cols = min(4, len(top))
    rows = math.ceil(len(top) / cols)
    # inches per cell: the image, its title above and up to four lines of caption below
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 3.6 * rows + 0.6), squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.set_axis_off()
    for rank, (ax, i) in enumerate(zip(axes.flat, top, strict=False), start=1):
        ax.set_axis_on()
        ax.imshow(_hwc(as_pixels(split.images[i])))
        ax.set(xticks=[], yticks=[], title=f"#{rank}  cosine {sim[i]:.3f}")
        caption = textwrap.shorten(split.captions[i][0], width=130, placeholder=" ...")
        ax.set_xlabel(textwrap.fill(caption, width=34), fontsize=7, color="0.4")
    fig.suptitle(f"The {len(top)} of {n} images nearest to: {textwrap.shorten(query, width=90, placeholder=' ...')}")
    fig.supxlabel("grey: each image's canonical caption", fontsize=8)
    return _finish(fig, path)
