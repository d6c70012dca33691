"""How much of the picture a frozen ViT's tokens still hold: a linear map from each output token to the pixels
of its own patch, fitted on some images of a prepared split and scored (R^2) on the others.

    python tools/pixel_probe.py runs/scenes/best runs/clip/best [--data data/scenes] [--n 1000]

Each folder is a saved captioner or a saved contrastive model; its ViT is read either way. R^2 near 1 means the
tokens keep the pixels, so a trained projector can read anything the image shows from them whether or not the
ViT ever learned to see; that is why a frozen random ViT can do nearly as well as a trained one.
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from nanovlm.clip import CLIP
from nanovlm.data import PackedSplit
from nanovlm.vit import ViT, patchify
from nanovlm.vlm import VLM


def load_vit(folder: str) -> ViT:
    config = json.loads((Path(folder) / "config.json").read_text())
    model = CLIP.load(folder)[0] if config.get("kind") == "clip" else VLM.load(folder)[0]
    return model.vit.eval()


def linear_r2(features: torch.Tensor, targets: torch.Tensor, n_fit: int) -> float:
    """Ridge regression fitted on the first n_fit images, R^2 on the rest; (N, T, F) features -> (N, T, P)."""
    x = torch.cat([features, torch.ones(*features.shape[:-1], 1)], -1)
    fit_x, fit_y = x[:n_fit].flatten(0, 1), targets[:n_fit].flatten(0, 1)
    test_x, test_y = x[n_fit:].flatten(0, 1), targets[n_fit:].flatten(0, 1)
    w = torch.linalg.solve(fit_x.T @ fit_x + 1e-3 * torch.eye(x.shape[-1]), fit_x.T @ fit_y)
    unexplained = ((test_x @ w - test_y) ** 2).sum() / ((test_y - fit_y.mean(0)) ** 2).sum()
    return 1 - unexplained.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+", help="saved captioner or contrastive model folders")
    parser.add_argument("--data", default="data/scenes", help="dataset folder with prepared/test_<size>")
    parser.add_argument("--n", type=int, default=1000, help="test images used; the first 80%% fit the map")
    args = parser.parse_args()
    vits = {folder: load_vit(folder) for folder in args.checkpoints}
    size = next(iter(vits.values())).cfg.image_size
    split = PackedSplit(Path(args.data) / "prepared" / f"test_{size}")
    images = torch.from_numpy(np.array(split.images[: args.n])).permute(0, 3, 1, 2).float() / 255
    print(f"{len(images)} test images of {args.data}; R^2 of a linear map from each token to its patch's pixels")
    for folder, vit in vits.items():
        with torch.no_grad():
            tokens = vit(images)
        pixels = patchify(images * 2 - 1, vit.cfg.patch_size)
        print(f"  {linear_r2(tokens, pixels, int(0.8 * len(images))):.3f}  {folder}")


if __name__ == "__main__":
    main()
