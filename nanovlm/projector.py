"""The projector: the bridge from the vision encoder's space to the language model's.

The ViT speaks in D_vision-wide patch vectors; the decoder reads D_text-wide token embeddings. A small
MLP maps one to the other, so that image patches become "words" the decoder can attend to (LLaVA). Its
linear layers have no biases, like the ViT's and the decoder's.

Optional pixel shuffle first trades sequence length for width: each s x s square of neighbouring patch
vectors is concatenated into one vector, so the decoder reads s^2 times fewer image tokens, each s^2
times wider before the MLP narrows it again (the trick nanoVLM and Idefics3 use to save decoder time).

This file imports only torch and einops, so it can be copied alone into another project.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange


@dataclass
class ProjectorConfig:
    in_dim: int = 128  # width of the vision encoder's outputs
    out_dim: int = 128  # width of the decoder's token embeddings
    pixel_shuffle: int = 1  # s: merge s x s neighbouring patches into one token (1 = off)
    hidden_mult: int = 2  # hidden width of the MLP is hidden_mult * out_dim

    def __post_init__(self) -> None:
        for name in ("in_dim", "out_dim", "pixel_shuffle", "hidden_mult"):
            if getattr(self, name) < 1:
                raise ValueError(f"projector {name} must be at least 1, got {getattr(self, name)}")


def pixel_shuffle(x: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, N, C) patches on a square grid -> (B, N / factor^2, C * factor^2) by merging factor x factor squares."""
    side = math.isqrt(x.size(1))
    if side * side != x.size(1) or side % factor:
        raise ValueError(
            f"pixel shuffle by {factor} needs a square grid whose side divides by it; got {x.size(1)} tokens"
        )
    # the grid is (h s1) rows x (w s2) columns, flattened row by row
    return rearrange(x, "b (h s1 w s2) c -> b (h w) (s1 s2 c)", s1=factor, s2=factor, h=side // factor)


class Projector(nn.Module):
    """Optional pixel shuffle, then Linear -> GELU -> Linear: (B, N, in_dim) -> (B, N / s^2, out_dim)."""

    def __init__(self, cfg: ProjectorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.fc = nn.Linear(cfg.in_dim * cfg.pixel_shuffle**2, cfg.hidden_mult * cfg.out_dim, bias=False)
        self.proj = nn.Linear(cfg.hidden_mult * cfg.out_dim, cfg.out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.pixel_shuffle > 1:
            x = pixel_shuffle(x, self.cfg.pixel_shuffle)
        return self.proj(F.gelu(self.fc(x)))
